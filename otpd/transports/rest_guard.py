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

# The caps and log throttling are shared with ``otpd broker``: re-exported here.
from otpd.connection_caps import (
    HEADROOM_MIN,
    PER_ADDRESS_DEFAULT_MAX,
    TOTAL_DEFAULT_MAX,
    ConnectionCaps,
    ConnectionLimits,
    Refusal,
    Slot,
    Throttled,
    connection_limits,
)

__all__ = [
    "HEADROOM_MIN", "PER_ADDRESS_DEFAULT_MAX", "TOTAL_DEFAULT_MAX", "Backoff",
    "ConnectionCaps", "ConnectionClock", "ConnectionLimits", "Expiry", "Refusal", "Slot",
    "Throttled", "Timeouts", "connection_limits",
]


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
