"""Building the wire envelopes OTP-Publisher sends (pure: no I/O).

``date_time`` is the current unix time in seconds and ``expiration`` is
``date_time + lifetime``, both integers, as OTP-Publisher sends them. When a
signing key is configured, every envelope is signed as
:mod:`otpd.wire.signing` describes (after ``callback_topic`` is set, so
the signature covers it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from otpd.wire.signing import sign

PARAM_COUNT = 4

Params = tuple[str, str, str, str]


def normalise_params(params: Sequence[str | int]) -> Params:
    """Up to four parameters as strings (padded with ""), as the daemon reads them."""
    if isinstance(params, str | bytes):
        raise TypeError("params must be a sequence of up to 4 strings, not a string")
    if len(params) > PARAM_COUNT:
        raise ValueError(f"params: at most {PARAM_COUNT} values (param1..param4)")
    values: list[str] = []
    for i, value in enumerate(params, 1):
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"params: param{i} must be a string or an integer")
        values.append(str(value).strip())
    values += [""] * (PARAM_COUNT - len(values))
    return (values[0], values[1], values[2], values[3])


def param_fields(params: Params) -> dict[str, str]:
    return {f"param{i}": value for i, value in enumerate(params, 1)}


def envelope(command: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"command": command, "data": data}


def encode(env: dict[str, Any], *, callback_topic: str | None = None, callback_delay: int = 0,
           signing_key: str = "", now: float | None = None) -> bytes:
    """The bytes to publish: ``callback_topic`` / ``callback_delay`` added, then signed."""
    out = dict(env)
    if callback_topic:
        out["callback_topic"] = callback_topic
        if callback_delay > 0:
            out["callback_delay"] = callback_delay
    if signing_key:
        out = sign(out, signing_key, now)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
