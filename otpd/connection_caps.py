"""Caps on open connections per client address group and in total, and throttled
log lines: pure bookkeeping shared by the REST listener (``otpd.transports``) and
``otpd broker``, free of sockets, of asyncio and of any server library.

The caps keep a listener below the process's descriptor limit, so that one client
cannot exhaust it. Everything here takes the time as an argument, so the rules are
tested without a socket or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Descriptors kept for everything but the capped connections: in the daemon modems,
# SQLite (database, WAL, shared memory), broker and SMTP connections, the control
# socket, logs; in the broker its files and logs.
HEADROOM_MIN = 64
# More connections than this cost a Pi memory for nothing (about 10 kB each).
TOTAL_DEFAULT_MAX = 1024
PER_ADDRESS_DEFAULT_MAX = 64


@dataclass(frozen=True)
class ConnectionLimits:
    total: int
    per_address: int
    notes: tuple[str, ...] = ()  # what was derived or clamped, for the start-up log


def connection_limits(nofile: int, total: int | None = None,
                      per_address: int | None = None) -> ConnectionLimits:
    """The caps for a process allowed ``nofile`` descriptors: the configured values
    (None: derived) kept below the limit minus headroom for everything else."""
    headroom = max(HEADROOM_MIN, nofile // 4)
    budget = max(1, nofile - headroom)
    notes: list[str] = []
    if total is None:
        total = min(TOTAL_DEFAULT_MAX, budget)
    elif total > budget:
        notes.append(f"max_connections {total} lowered to {budget}: the process may open"
                     f" {nofile} descriptors and keeps {headroom} for modems, the store,"
                     " brokers and SMTP")
        total = budget
    if per_address is None:
        per_address = max(1, min(PER_ADDRESS_DEFAULT_MAX, total // 4))
    elif per_address > total:
        notes.append(f"max_connections_per_address {per_address} lowered to"
                     f" max_connections ({total})")
        per_address = total
    return ConnectionLimits(total, per_address, tuple(notes))


class Slot:
    """One admitted connection's place in the caps; released once, however often
    ``release`` is called (the handshake and the connection may both end it)."""

    __slots__ = ("_caps", "group")

    def __init__(self, caps: ConnectionCaps, group: str) -> None:
        self._caps: ConnectionCaps | None = caps
        self.group = group

    def release(self) -> None:
        caps, self._caps = self._caps, None
        if caps is not None:
            caps._release(self.group)


class Refusal(enum.Enum):
    PER_ADDRESS = "per-address"
    TOTAL = "total"


class ConnectionCaps:
    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._groups: dict[str, int] = {}  # only groups with open connections: bounded
        self.refused = {Refusal.PER_ADDRESS: 0, Refusal.TOTAL: 0}

    def acquire(self, group: str) -> Slot | Refusal:
        held = self._groups.get(group, 0)
        # The per-address cap first: the refusal then names the address that is at fault.
        if held >= self.per_address:
            refusal = Refusal.PER_ADDRESS
        elif self.open >= self.total:
            refusal = Refusal.TOTAL
        else:
            self._groups[group] = held + 1
            self.open += 1
            return Slot(self, group)
        self.refused[refusal] += 1
        return refusal

    def held(self, group: str) -> int:
        return self._groups.get(group, 0)

    def _release(self, group: str) -> None:
        left = self._groups.get(group, 0) - 1
        if left > 0:
            self._groups[group] = left
        else:
            self._groups.pop(group, None)
        self.open -= 1


class Throttled:
    """A recurring event worth a log line, but not one line each: the first is
    reported at once, later ones at most once per ``interval`` with their count."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.total = 0
        self._unreported = 0
        self._last: float | None = None

    def hit(self, now: float) -> int:
        """Count one; the number to report now (0: stay quiet)."""
        self.total += 1
        self._unreported += 1
        if self._last is None or now - self._last >= self.interval:
            return self.flush(now)
        return 0

    def flush(self, now: float) -> int:
        """The count not reported yet (and it is now)."""
        count, self._unreported = self._unreported, 0
        if count:
            self._last = now
        return count
