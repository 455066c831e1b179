"""Pending jobs of one channel, with costs that stay flat as the backlog grows (pure).

A modem that is down for an hour can leave thousands of messages queued;
taking, delaying and expiring one of them must not scan all the others.
``ready`` keeps due jobs in arrival order, ``delayed`` and ``expiry`` are
heaps with lazy deletion (stale entries are skipped when they surface).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from otpd.delivery.channel import Job

# How many ready jobs a taker whose filter refuses them looks at before it
# waits: bounds the cost of routing filters with a large backlog.
SCAN_LIMIT = 512


@dataclass
class Pending:
    job: Job
    due: float  # on the caller's due timeline (the engine's: monotonic)
    reserved: bool = False
    last_error: str = ""


class JobQueue:
    def __init__(self) -> None:
        self.pending: dict[int, Pending] = {}
        self._ready: dict[int, None] = {}  # insertion-ordered set of due job ids
        self._delayed: list[tuple[float, int]] = []
        self._expiry: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def __iter__(self) -> Iterator[Pending]:
        return iter(self.pending.values())

    def add(self, job: Job, due: float, now: float) -> Pending:
        p = Pending(job, due)
        self.pending[job.id] = p
        self._schedule(p, now)
        return p

    def _schedule(self, p: Pending, now: float) -> None:
        if p.due <= now:
            self._ready[p.job.id] = None
        else:
            heapq.heappush(self._delayed, (p.due, p.job.id))
        heapq.heappush(self._expiry, (p.job.expires_at, p.job.id))

    def _promote(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            due, job_id = heapq.heappop(self._delayed)
            p = self.pending.get(job_id)
            if p is not None and not p.reserved and p.due == due:
                self._ready[job_id] = None

    def reserve(self, now: float, accept: Callable[[Job], bool] | None,
                mono: float | None = None) -> Pending | None:
        """The oldest due, unexpired job that ``accept`` allows, now reserved.
        ``now`` (wall clock) judges expirations; ``mono`` (default: ``now``) is the
        timeline of the ``due`` times given to add() and release()."""
        self._promote(now if mono is None else mono)
        for scanned, job_id in enumerate(self._ready):
            if scanned >= SCAN_LIMIT:
                break
            p = self.pending[job_id]
            if p.job.expires_at <= now:
                continue  # the sweeper drops it
            if accept is None or accept(p.job):
                del self._ready[job_id]
                p.reserved = True
                return p
        return None

    def next_due(self) -> float | None:
        """When the next delayed job becomes due (None: nothing delayed)."""
        while self._delayed:
            due, job_id = self._delayed[0]
            p = self.pending.get(job_id)
            if p is not None and not p.reserved and p.due == due:
                return due
            heapq.heappop(self._delayed)
        return None

    def release(self, p: Pending, due: float, now: float) -> None:
        """Back in the queue after a failed try (or a crashed channel)."""
        p.reserved = False
        p.due = due
        self._schedule(p, now)

    def remove(self, job_id: int) -> Pending | None:
        self._ready.pop(job_id, None)
        return self.pending.pop(job_id, None)

    def pop_expired(self, now: float) -> list[Pending]:
        """Unreserved jobs whose expiration has come (a channel that holds one decides itself)."""
        out: list[Pending] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, job_id = heapq.heappop(self._expiry)
            p = self.pending.get(job_id)
            if p is None or p.reserved:
                continue
            self.remove(job_id)
            out.append(p)
        return out

    def next_expiry(self) -> float | None:
        while self._expiry:
            expires_at, job_id = self._expiry[0]
            p = self.pending.get(job_id)
            if p is not None and not p.reserved:
                return expires_at
            heapq.heappop(self._expiry)
        return None
