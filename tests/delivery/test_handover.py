"""A message handed back to the shared queue crosses the broker sealed: no
broker account can read the OTP in it, re-address it, extend it or make one."""

from __future__ import annotations

import json
import time

import pytest

from otpd.delivery.channel import Job
from otpd.delivery.handover import handover_context, handover_envelope
from otpd.sealing import Sealer, SealError

TEXT = "Your code is 481516"


def job(to: str, **changes: object) -> Job:
    now = time.time()
    fields: dict[str, object] = {"id": 7, "channel": "email", "receiver": to, "subject": "Code",
                                 "text": TEXT, "expires_at": now + 60, "attempts": 1,
                                 "created_at": now}
    fields.update(changes)
    return Job(**fields)  # type: ignore[arg-type]


def test_the_text_is_sealed_and_bound_to_its_envelope() -> None:
    sealer = Sealer(b"k" * 32)
    envelope = handover_envelope(job("a@example.org"), sealer.seal_handover)
    data = envelope["data"]
    assert envelope["command"] == "handover" and "481516" not in json.dumps(envelope)
    context = handover_context(data["channel"], data["receiver"], data["subject"],
                               data["expiration"], data["id"])
    assert sealer.open_handover(data["sealed"], context) == TEXT
    for changed in ({"receiver": "attacker@example.org"}, {"expiration": data["expiration"] + 1},
                    {"subject": "Other"}, {"id": "handover-8-1"}):
        other = {**data, **changed}
        with pytest.raises(SealError):
            sealer.open_handover(other["sealed"], handover_context(
                other["channel"], other["receiver"], other["subject"], other["expiration"],
                other["id"]))
    with pytest.raises(SealError):  # another node key: not one of ours
        Sealer(b"x" * 32).open_handover(data["sealed"], context)
    with pytest.raises(SealError):
        sealer.open_handover("not base64!", context)
