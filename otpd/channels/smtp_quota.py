"""What the email channel needs from a provider quota (messages per account per
minute and per day).

The channel only reserves and counts; the daemon hands it an implementation
kept in the store (``otpd.email_quota``, so the caps hold across restarts and
nodes) that reports its failures as QuotaError, so that the channel never
depends on the store or the limits modules.
"""

from __future__ import annotations

from typing import Protocol


class QuotaError(Exception):
    """The quota could not be read or recorded (its store is unavailable)."""


class SendQuota(Protocol):
    async def reserve(self, account: str, per_minute: int, per_day: int, now: float) -> float:
        """Count one message for ``account`` and return 0, or count nothing and
        return the seconds until a cap allows it (0 caps = none)."""
        ...

    async def sent_day(self, account: str, now: float) -> int:
        """Messages counted for ``account`` in the last 24 hours (by every node)."""
        ...
