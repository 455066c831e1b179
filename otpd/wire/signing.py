"""HMAC signatures on broker envelopes (pure: no I/O), an otpd extension.

A broker ACL mistake must not let anyone who can publish to the topic send SMS
from the Pi, so a consumer may require every command to be signed
(``require_signature = true`` with ``signing_key``). The scheme, for
publishers in any language:

1. Build the envelope as usual (``command``, ``data``, ``callback_topic``...).
2. Add a top-level ``"timestamp"``: the current time as integer unix seconds.
   (Top-level rather than ``data.date_time`` so that the signature covers a
   field otpd controls the meaning of; ``date_time`` stays whatever the app
   puts there.)
3. ``canonical`` = the JSON of the whole envelope *without* ``"signature"``,
   keys sorted at every level, separators ``,`` and ``:`` with no spaces,
   non-ASCII characters written as themselves (not ``\\uXXXX``), ``/`` not
   escaped, encoded as UTF-8. Python:
   ``json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``;
   PHP: ``json_encode`` of a recursively ``ksort``-ed array with
   ``JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES``. Use integers and
   strings only (no floats: their text differs between languages).
4. ``"signature"`` = lowercase hex of ``HMAC-SHA256(key, canonical)`` where
   ``key`` is the UTF-8 bytes of the shared ``signing_key``.

otpd re-serialises the parsed JSON the same way, compares in constant time
and refuses a timestamp more than ``max_skew`` (300 s) away from its clock.
Within that window a captured command can be replayed, which is harmless:
sends are deduplicated by ``id``/``reference``, a verify-otp replay meets an
already consumed OTP, and block/unblock are idempotent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from typing import Any

MAX_SKEW = 300.0
SIGNATURE_FIELD = "signature"
TIMESTAMP_FIELD = "timestamp"


class SignatureError(Exception):
    """Why an envelope's signature is refused (never contains the key)."""


def canonical_bytes(envelope: dict[str, Any]) -> bytes:
    """The bytes that are signed: the envelope without ``signature``."""
    body = {k: v for k, v in envelope.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def compute_signature(envelope: dict[str, Any], key: str | bytes) -> str:
    return hmac.new(_key_bytes(key), canonical_bytes(envelope), hashlib.sha256).hexdigest()


def sign(envelope: dict[str, Any], key: str | bytes, now: float | None = None) -> dict[str, Any]:
    """A copy of ``envelope`` with ``timestamp`` (now) and ``signature`` set."""
    signed = {k: v for k, v in envelope.items() if k != SIGNATURE_FIELD}
    signed[TIMESTAMP_FIELD] = int(time.time() if now is None else now)
    signed[SIGNATURE_FIELD] = compute_signature(signed, key)
    return signed


def verify(envelope: dict[str, Any], key: str | bytes, now: float | None = None,
           max_skew: float = MAX_SKEW) -> None:
    """Raise :class:`SignatureError` unless the envelope is signed with ``key``
    and its timestamp is within ``max_skew`` seconds of ``now``."""
    signature = envelope.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not signature:
        raise SignatureError("signature: missing")
    stamp = envelope.get(TIMESTAMP_FIELD)
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise SignatureError("timestamp: missing or not a number")
    try:
        expected = compute_signature(envelope, key)
    except (TypeError, ValueError):
        raise SignatureError("envelope cannot be canonicalised") from None
    # Compare as ASCII bytes: compare_digest refuses non-ASCII str.
    given = signature.strip().lower().encode("utf-8", "replace")
    if not hmac.compare_digest(given, expected.encode("ascii")):
        raise SignatureError("signature: does not match")
    clock = time.time() if now is None else now
    if abs(clock - stamp) > max_skew:
        raise SignatureError(f"timestamp: more than {int(max_skew)} s from the gateway's clock")
