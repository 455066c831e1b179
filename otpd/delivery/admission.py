"""How much work a node takes from a shared queue (pure: no I/O, no clock of its own).

Several nodes on one queue each take only what their own senders can send
soon: a node *holds* (commands being stored plus its local outbox of that
channel) at most what its ready senders send within ``horizon`` seconds, at
the send time it observed. A node whose channel cannot send (no sender ready,
or its last sends all failed) takes nothing; one message is let through every
``probe_after`` seconds so that a node whose sends failed finds out when they
work again. The transports apply :func:`gate` with their broker's own flow
control; the engine applies :func:`late` to what it already holds and hands
back what it would send too late.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from otpd.delivery.channel import Capacity


@dataclass(frozen=True)
class AdmissionSettings:
    horizon: float = 5.0  # s of sending a node takes ahead
    max_backlog: int = 256  # messages of one channel a node holds at most
    default_send_time: float = 2.0  # s per message before one was observed
    failures_to_stop: int = 3  # failed sends in a row (per ready sender) that stop the intake
    probe_after: float = 30.0  # s after the last failure before one message is tried again
    handover_after: float = 5.0  # s a channel cannot send before what it holds is handed back
    margin: float = 2.0  # s: a message is late if it would be sent this close to its expiry


@dataclass(frozen=True)
class Observed:
    """What the engine measured of a channel's sends."""

    send_time: float | None = None  # s per delivered message (moving average)
    failures: int = 0  # failed sends since the last delivered one
    last_failure: float = 0.0  # monotonic time of the last failed send


@dataclass(frozen=True)
class Gate:
    """The policy's answer for one channel of one node."""

    taking: bool
    target: int  # messages this node may hold
    room: int  # how many more it may take now
    reason: str  # why it is not taking ("" when it is)


def send_time(cap: Capacity, seen: Observed, s: AdmissionSettings) -> float:
    """Seconds one message takes on one sender: observed, else the channel's, else a guess."""
    for t in (seen.send_time, cap.send_time):
        if t is not None and t > 0:
            return t
    return s.default_send_time


def failing(cap: Capacity, seen: Observed, s: AdmissionSettings) -> bool:
    """The last sends all failed: as many in a row as ``failures_to_stop`` per ready sender."""
    return seen.failures >= s.failures_to_stop * max(cap.ready, 1)


def target(cap: Capacity, seen: Observed, s: AdmissionSettings) -> int:
    """Messages the node may hold: what its ready senders send within the horizon
    (at least one each, so that no free sender waits on the broker), bounded."""
    if cap.ready <= 0:
        return 0
    per_sender = max(1, math.floor(s.horizon / send_time(cap, seen, s)))
    return min(s.max_backlog, cap.ready * per_sender)


def gate(cap: Capacity, seen: Observed, held: int, now: float,
         s: AdmissionSettings) -> Gate:
    """May this node take more of this channel? ``held``: messages it holds
    (being stored or waiting in its outbox); ``now``: monotonic seconds."""
    if cap.ready <= 0:
        return Gate(False, 0, 0, cap.reason or "no sender ready")
    if failing(cap, seen, s):
        if now - seen.last_failure < s.probe_after:
            return Gate(False, 0, 0, f"the last {seen.failures} sends failed")
        # Half open: one message at a time, until one is delivered.
        room = max(0, 1 - held)
        return Gate(room > 0, 1, room, "" if room else "probing: one message at a time")
    full = target(cap, seen, s)
    room = max(0, full - held)
    return Gate(room > 0, full, room, "" if room else f"backlog full ({held} held)")


def wait_time(cap: Capacity, seen: Observed, position: int, s: AdmissionSettings) -> float | None:
    """Seconds until a message with ``position`` messages ahead of it is sent
    (None: no sender ready, unknown)."""
    if cap.ready <= 0:
        return None
    return math.ceil((position + 1) / cap.ready) * send_time(cap, seen, s)


def late(cap: Capacity, seen: Observed, position: int, left: float,
         s: AdmissionSettings) -> bool:
    """Would a message with ``position`` messages ahead of it, expiring in
    ``left`` seconds, be sent too late on this node (or not at all)?"""
    if failing(cap, seen, s):
        return True
    wait = wait_time(cap, seen, position, s)
    return wait is None or wait + s.margin > left
