"""Handing a stored message back to the shared queue (pure).

A node that acknowledged a message it can no longer send in time re-publishes
it as a ``handover`` command with a hand-over id of its own: derived from the
local row, so a second hand-over of the same row (after a crash between
publishing and recording) is suppressed by the shared store's duplicate
check, and the node that restarts can tell from that store whether another
node already accepted it.

The text (an OTP message holds the clear code) crosses the broker sealed with
the key every node derives from the shared ``otp.key_file``
(:meth:`otpd.sealing.Sealer.seal_handover`), bound to :func:`handover_context`:
a broker account can neither read it nor make one, and the receiving node
neither counts it against the receiver's limits again (the first node did)
nor lets it outlive the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from otpd.delivery.channel import Job

HANDOVER_PREFIX = "handover-"


def handover_id(job: Job) -> str:
    """Stable across restarts; unique across nodes (row id + creation microsecond)."""
    return f"{HANDOVER_PREFIX}{job.id}-{int(job.created_at * 1_000_000)}"


def dedupe_key(job: Job) -> str:
    """The shared store's duplicate key of the hand-over (as otpd.service builds it)."""
    return f"{handover_id(job)}|{job.receiver}"


def handover_context(channel: str, receiver: str, subject: str, expiration: int,
                     handover: str) -> str:
    """What the seal binds the text to: a copy cannot be re-addressed or extended."""
    return "\n".join(("otpd-handover/v1", channel, receiver, subject, str(expiration), handover))


def handover_envelope(job: Job, seal: Callable[[str, str], str]) -> dict[str, Any]:
    """The command that sends ``job`` again from whichever node takes it;
    ``seal(text, context)`` seals the text for the other nodes."""
    expiration = math.floor(job.expires_at)  # rounded down: never outlives the original
    subject = job.subject if job.channel == "email" else ""
    ident = handover_id(job)
    context = handover_context(job.channel, job.receiver, subject, expiration, ident)
    return {"command": "handover", "data": {
        "id": ident, "channel": job.channel, "receiver": job.receiver, "subject": subject,
        "expiration": expiration, "sealed": seal(job.text, context),
    }}
