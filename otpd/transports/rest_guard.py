"""Bookkeeping of the REST listener's connection guard, free of sockets and of aiohttp.

Slow or idle clients must not hold the listener: each connection has one deadline
at a time (the request head within ``header`` seconds, its body within ``body``
seconds, the next request within ``keepalive`` seconds of an answer), and the
number of open connections is capped per client address and in total, below the
process's descriptor limit. ``otpd.transports.rest_listener`` applies these rules
to real connections; everything here takes the time as an argument, so the
rules are tested without a socket or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Descriptors kept for everything but REST connections: modems, SQLite (database,
# WAL, shared memory), broker and SMTP connections, the control socket, logs.
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


@dataclass(frozen=True)
class Timeouts:
    header: float = 10.0  # connection (or first byte after an idle spell) -> complete request head
    body: float = 20.0  # request head -> complete body
    keepalive: float = 15.0  # answer -> first byte of the next request


class Expiry(enum.Enum):
    HEADER = "header"
    BODY = "body"
    IDLE = "idle"


# Timers may fire this early (the event loop's clock resolution).
_SLACK = 0.001


class ConnectionClock:
    """The one deadline of a connection, from what happened on it.

    A head with an incomplete body sets the body deadline, which holds until that
    body is complete (pipelined or not, lingering or not). While a request is in
    the handler and no body is missing, nothing expires: the handler has its own
    limit (delivery.wait). Otherwise the connection waits for a request: the
    header deadline runs from its start or from the first byte after an answer,
    the keep-alive deadline from the last answer.
    """

    def __init__(self, timeouts: Timeouts, now: float) -> None:
        self.timeouts = timeouts
        self.pending = 0  # heads received, not answered yet
        self._head: float | None = now + timeouts.header
        self._body: float | None = None
        self._idle: float | None = None

    def data(self, now: float) -> None:
        """Bytes arrived (before the parser looked at them)."""
        if self.pending == 0 and self._head is None:
            self._head = now + self.timeouts.header

    def heads(self, now: float, count: int, body_complete: bool) -> None:
        """``count`` complete request heads parsed; the last one's body complete or not."""
        self.pending += count
        self._head = None
        self._idle = None
        self._body = None if body_complete else now + self.timeouts.body

    def body_complete(self) -> None:
        self._body = None

    def answered(self, now: float) -> None:
        """A response was sent."""
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self._head = None
            self._idle = now + self.timeouts.keepalive

    def deadline(self) -> tuple[float, Expiry] | None:
        if self._body is not None:
            return self._body, Expiry.BODY
        if self.pending:
            return None
        if self._head is not None:
            return self._head, Expiry.HEADER
        if self._idle is not None:
            return self._idle, Expiry.IDLE
        return None

    def expired(self, now: float) -> Expiry | None:
        found = self.deadline()
        if found is not None and now + _SLACK >= found[0]:
            return found[1]
        return None


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


class Backoff:
    """Pauses of the accept loop after an error such as EMFILE: short at first,
    doubling up to ``high``, back to ``low`` after a successful accept."""

    def __init__(self, low: float = 0.05, high: float = 1.0) -> None:
        self.low, self.high = low, high
        self._next = low

    def next(self) -> float:
        pause, self._next = self._next, min(self.high, self._next * 2)
        return pause

    def reset(self) -> None:
        self._next = self.low
