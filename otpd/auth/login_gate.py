"""The login gate: password checks that hold under concurrency (in memory, per process).

A password check (bcrypt) is slow and the only thing a credential-stuffing
client wants; so every check passes this gate, which

- **reserves before checking**: an address group whose failures in the window,
  plus its checks in flight, reach ``max_failures`` gets no further check (the
  caller answers 429 with the returned ``retry_after``); a success forgives its
  own reservation, a failure stays in the window;
- **caps checks in flight**: at most ``per_address`` per address group and
  ``slots`` in all (the users file's bcrypt slots); the rest wait in a queue
  of ``max_waiting`` per group (beyond it: refused for a second) served
  round-robin across groups, so a flood from one address delays another
  client's login by one check at most, not by the flood's length;
- **groups addresses** (:func:`address_group`): IPv4 by address, IPv6 by /64
  (one customer's allocation), IPv4-mapped IPv6 as IPv4;
- **logs every failed login** (address and user name, never the password), at
  most ``log_lines`` lines a minute, then one line with the count left out.

Usage (the REST API and ``otpd broker``)::

    gate = LoginGate(max_failures=10, window=900)
    ticket = await gate.reserve(peer_address)
    if not isinstance(ticket, Ticket):
        refuse(retry_after=ticket)          # 429 / CONNACK refused: nothing was checked
    ok = False
    try:
        ok = await users.verify_async(user, password)
    finally:
        delay = ticket.release(ok, user)    # exactly once, also on errors
    if not ok:
        await asyncio.sleep(delay)          # growing delay before the refusal

The gate is per process; a store-backed window (``otpd.limits``) is what
several nodes share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from otpd.netutil import address_group

log = logging.getLogger("otpd.auth.login")

# The users file's concurrent bcrypt checks (otpd.auth.htpasswd._BCRYPT_SLOTS):
# the gate never lets more through, so no check queues behind a semaphore it
# does not schedule fairly.
DEFAULT_SLOTS: Final = 2
# Below the global slots: one address never holds every slot.
DEFAULT_PER_ADDRESS: Final = 1
DEFAULT_MAX_WAITING: Final = 256
QUEUE_FULL_RETRY: Final = 1.0
LOG_PERIOD: Final = 60.0
_SWEEP_EVERY: Final = 1024  # reserves between sweeps of idle groups
_MAX_USER_SHOWN: Final = 64
_KEEP_UNLIMITED: Final = 16  # failures kept per group without a limit (for the delay)


@dataclass
class _Group:
    failures: deque[float] = field(default_factory=deque)  # times, oldest first
    inflight: int = 0
    waiters: deque[asyncio.Future[float]] = field(default_factory=deque)


class Ticket:
    """One reserved password check; :meth:`release` it exactly once."""

    __slots__ = ("_gate", "_released", "address", "group")

    def __init__(self, gate: LoginGate, group: str, address: str) -> None:
        self._gate = gate
        self._released = False
        self.address = address  # as the caller gave it (logged)
        self.group = group  # what it is limited under (address_group)

    def release(self, ok: bool, user: str) -> float:
        """Settle the check: ``ok`` forgives the reservation, a failure stays in the
        group's window and is logged with ``user``. Returns the seconds the caller
        should wait before answering a failure (growing with the group's
        failures; 0 on success). A second call does nothing and returns 0."""
        if self._released:
            return 0.0
        self._released = True
        return self._gate._settle(self, ok, user)


class LoginGate:
    """See the module docstring. ``max_failures=None``: no failure limit (the
    in-flight caps, the fair queue and the log still apply)."""

    def __init__(self, *, max_failures: int | None = 10, window: float = 900.0,
                 per_address: int = DEFAULT_PER_ADDRESS, slots: int = DEFAULT_SLOTS,
                 max_waiting: int = DEFAULT_MAX_WAITING, log_lines: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_address < 1 or slots < 1 or max_waiting < 0 or log_lines < 0:
            raise ValueError("per_address and slots must be >= 1, max_waiting and"
                             " log_lines >= 0")
        if max_failures is not None and max_failures < 1:
            raise ValueError("max_failures must be >= 1 (or None)")
        self.max_failures = max_failures
        self.window = window
        self.per_address = per_address
        self.slots = slots
        self.max_waiting = max_waiting
        self.log_lines = log_lines
        self.clock = clock
        self._groups: dict[str, _Group] = {}
        self._queue: OrderedDict[str, None] = OrderedDict()  # groups with waiters, round-robin
        self._inflight = 0
        self._reserves = 0
        # Failed-login log budget: lines in the current period, and what was left out.
        self._log_period_end = 0.0
        self._log_count = 0
        self._log_suppressed = 0
        self._log_refused = 0
        self._log_flush: asyncio.TimerHandle | None = None

    # -- the API -------------------------------------------------------------
    async def reserve(self, address: str) -> Ticket | float:
        """A :class:`Ticket` once this address may run a password check (waiting
        for a slot if need be), or the seconds to wait (> 0) when refused."""
        key = address_group(address)
        now = self.clock()
        self._sweep(now)
        group = self._groups.setdefault(key, _Group())
        self._expire(group, now)
        refused = self._locked_for(group, now)
        if refused > 0:
            self._note_refused()
            return refused
        if not group.waiters and self._may_start(group):
            self._start(group)
            return Ticket(self, key, address)
        if len(group.waiters) >= self.max_waiting:
            self._note_refused()
            return QUEUE_FULL_RETRY
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        group.waiters.append(waiter)
        self._queue[key] = None
        try:
            retry_after = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() == 0:
                self._finish(key, group)  # granted, but the caller is gone: free the slot
            else:
                with contextlib.suppress(ValueError):
                    group.waiters.remove(waiter)
                if not group.waiters:
                    self._queue.pop(key, None)
                    self._forget_if_idle(key, group)
            raise
        if retry_after > 0:
            self._note_refused()
            return retry_after
        return Ticket(self, key, address)

    def retry_after(self, address: str) -> float:
        """Seconds before this address may try again (0 = it may now), without
        reserving anything."""
        group = self._groups.get(address_group(address))
        if group is None:
            return 0.0
        now = self.clock()
        self._expire(group, now)
        return self._locked_for(group, now)

    @property
    def inflight(self) -> int:
        """Password checks running now (all groups)."""
        return self._inflight

    def waiting(self, address: str | None = None) -> int:
        """Callers waiting for a slot: all, or those of ``address``'s group."""
        if address is not None:
            group = self._groups.get(address_group(address))
            return len(group.waiters) if group is not None else 0
        return sum(len(g.waiters) for g in self._groups.values())

    # -- scheduling ------------------------------------------------------------
    def _locked_for(self, group: _Group, now: float) -> float:
        """Seconds until the group's failures alone allow another check (0 = they do)."""
        if self.max_failures is None or len(group.failures) < self.max_failures:
            return 0.0
        # Allowed again once enough of the oldest failures have left the window.
        oldest = group.failures[len(group.failures) - self.max_failures]
        return max(oldest + self.window - now, 0.001)

    def _may_start(self, group: _Group) -> bool:
        if self._inflight >= self.slots or group.inflight >= self.per_address:
            return False
        # A check in flight counts as a failure until it ends (the reservation).
        return self.max_failures is None or (
            len(group.failures) + group.inflight < self.max_failures)

    def _start(self, group: _Group) -> None:
        group.inflight += 1
        self._inflight += 1

    def _finish(self, key: str, group: _Group) -> None:
        group.inflight -= 1
        self._inflight -= 1
        self._dispatch()
        self._forget_if_idle(key, group)

    def _dispatch(self) -> None:
        """Hand free slots to waiting groups, one check per group in turn."""
        now = self.clock()
        progress = True
        while progress and self._inflight < self.slots and self._queue:
            progress = False
            for key in list(self._queue):
                group = self._groups[key]
                _drop_gone(group.waiters)
                self._expire(group, now)
                refused = self._locked_for(group, now)
                if refused > 0:  # failures filled the window meanwhile: refuse them all
                    while group.waiters:
                        group.waiters.popleft().set_result(refused)
                        _drop_gone(group.waiters)
                elif group.waiters and self._may_start(group):
                    self._start(group)
                    group.waiters.popleft().set_result(0.0)
                    _drop_gone(group.waiters)
                    progress = True
                    self._queue.move_to_end(key)  # the next turn is another group's
                if not group.waiters:
                    del self._queue[key]
                    self._forget_if_idle(key, group)
                if progress:
                    break

    def _settle(self, ticket: Ticket, ok: bool, user: str) -> float:
        group = self._groups[ticket.group]
        now = self.clock()
        delay = 0.0
        if not ok:
            group.failures.append(now)
            self._expire(group, now)
            self._log_failure(ticket.address, user, now)
            # As before: 0.1 s after the first failure, doubling, at most 3 s.
            delay = min(0.05 * 2 ** min(len(group.failures), 10), 3.0)
        self._finish(ticket.group, group)
        return delay

    def _expire(self, group: _Group, now: float) -> None:
        since = now - self.window
        failures = group.failures
        while failures and failures[0] <= since:
            failures.popleft()
        # Only the newest max_failures matter (and 10 for the delay): bounded memory.
        keep = self.max_failures if self.max_failures is not None else _KEEP_UNLIMITED
        while len(failures) > keep:
            failures.popleft()

    def _forget_if_idle(self, key: str, group: _Group) -> None:
        if not group.inflight and not group.waiters and not group.failures:
            self._groups.pop(key, None)

    def _sweep(self, now: float) -> None:
        """Drop groups whose failures have all left the window (bounded memory
        under a spray of addresses)."""
        self._reserves += 1
        if self._reserves % _SWEEP_EVERY:
            return
        for key, group in list(self._groups.items()):
            self._expire(group, now)
            self._forget_if_idle(key, group)

    # -- the failed-login log ---------------------------------------------------
    def _log_failure(self, address: str, user: str, now: float) -> None:
        self._roll_log_period(now)
        if self._log_count < self.log_lines:
            self._log_count += 1
            shown = user if len(user) <= _MAX_USER_SHOWN else user[:_MAX_USER_SHOWN] + "..."
            log.warning("failed login from %s as user %r", address, shown)
            return
        self._log_suppressed += 1
        self._schedule_flush(now)

    def _note_refused(self) -> None:
        # Refusals (429) are counted in the summary line, never logged one by one.
        now = self.clock()
        self._roll_log_period(now)
        self._log_refused += 1
        self._schedule_flush(now)

    def _roll_log_period(self, now: float) -> None:
        if now >= self._log_period_end:
            self.flush_log()
            self._log_period_end = now + LOG_PERIOD
            self._log_count = 0

    def _schedule_flush(self, now: float) -> None:
        if self._log_flush is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): flushed at the next event instead
        self._log_flush = loop.call_later(max(self._log_period_end - now, 0.0),
                                          self.flush_log)

    def flush_log(self) -> None:
        """Log the count of failed logins left out of the log (if any) now."""
        if self._log_flush is not None:
            self._log_flush.cancel()
            self._log_flush = None
        if self._log_suppressed or self._log_refused:
            log.warning("failed logins: %d more not logged one by one, %d attempt(s)"
                        " refused unchecked (429), in the last %g s",
                        self._log_suppressed, self._log_refused, LOG_PERIOD)
        self._log_suppressed = 0
        self._log_refused = 0


def _drop_gone(waiters: deque[asyncio.Future[float]]) -> None:
    """Drop waiters whose caller was cancelled (their future is done already)."""
    while waiters and waiters[0].done():
        waiters.popleft()


__all__ = ["LoginGate", "Ticket", "address_group"]
