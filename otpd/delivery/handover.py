"""Handing a stored message back to the shared queue (pure).

A node that acknowledged a message it can no longer send in time re-publishes
it to the queue it came from as a plain ``send-sms``/``send-email`` with a
hand-over id of its own: derived from the local row, so a second hand-over of
the same row (after a crash between publishing and recording) is suppressed
by the shared store's duplicate check, and the node that restarts can tell
from that store whether another node already accepted it.
"""

from __future__ import annotations

import math
from typing import Any

from otpd.delivery.channel import Job

HANDOVER_PREFIX = "handover-"


def handover_id(job: Job) -> str:
    """Stable across restarts; unique across nodes (row id + creation microsecond)."""
    return f"{HANDOVER_PREFIX}{job.id}-{int(job.created_at * 1_000_000)}"


def dedupe_key(job: Job) -> str:
    """The shared store's duplicate key of the hand-over (as otpd.service builds it)."""
    return f"{handover_id(job)}|{job.receiver}"


def handover_envelope(job: Job) -> dict[str, Any]:
    """The command that sends ``job`` again from whichever node takes it."""
    data: dict[str, Any] = {
        "receiver": job.receiver,
        "message": job.text,
        # Rounded down: the copy never outlives the original.
        "expiration": math.floor(job.expires_at),
        "id": handover_id(job),
    }
    if job.channel == "email":
        data["subject"] = job.subject
        return {"command": "send-email", "data": data}
    return {"command": "send-sms", "data": data}
