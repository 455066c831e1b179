"""What the modem pool needs from a SIM quota (SMS parts per SIM per day/month).

The pool only asks and records; the daemon hands it an implementation (kept in
the store, see otpd.limits.SimQuota) that reports its failures as QuotaError,
so that the channel never depends on the store or the limits module.
"""

from __future__ import annotations

from typing import Protocol


class QuotaError(Exception):
    """The quota could not be read or recorded (its store is unavailable)."""


class SimQuota(Protocol):
    async def wait(self, sim: str, now: float) -> float:
        """Seconds until this SIM may send again (0 = it may now)."""
        ...

    async def record(self, sim: str, parts: int, now: float) -> float:
        """Count sent parts; returns the wait before the next send (0 = none)."""
        ...
