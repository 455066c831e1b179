"""Fixtures for the SMS tests: simulated modems on real pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.channels.sms.modem import Modem, Timing
from otpd.channels.sms.settings import ModemSettings
from otpd.channels.sms.simulator import ModemSimulator
from otpd.delivery.channel import Job, Outcome, Retry

FAST = Timing(not_ready=2.0, cpin_grace=0.3, sync=0.3)


def fast_settings(name: str, port: Path | str, **kw: Any) -> ModemSettings:
    """Modem settings with timeouts short enough for tests."""
    kw.setdefault("command_timeout", 0.5)
    kw.setdefault("prompt_timeout", 1.0)
    kw.setdefault("send_timeout", 1.0)
    return ModemSettings(name=name, port=str(port), **kw)


@pytest.fixture
async def sims(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await sims("m1", profile=...)`` -> a started simulator, stopped after the test."""
    started: list[ModemSimulator] = []
    seeds = itertools.count(1)

    async def make(name: str, **kw: Any) -> ModemSimulator:
        kw.setdefault("seed", next(seeds))
        sim = ModemSimulator(tmp_path / name, name=name, **kw)
        await sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def modems() -> AsyncIterator[Callable[..., Modem]]:
    """Modem drivers closed after the test."""
    made: list[Modem] = []

    def make(settings: ModemSettings, **kw: Any) -> Modem:
        kw.setdefault("timing", FAST)
        modem = Modem(settings, **kw)
        made.append(modem)
        return modem

    yield make
    for modem in made:
        await modem.close()


class FakeSource:
    """A tiny stand-in for the delivery engine: a queue of jobs and a log of outcomes."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[Job, float]] = {}  # id -> (job, not before)
        self.reserved: set[int] = set()
        self.outcomes: list[tuple[Job, Outcome]] = []
        self.changed = asyncio.Event()
        self._ids = itertools.count(1)

    def add(self, receiver: str, text: str, *, lifetime: float = 60.0) -> Job:
        now = time.time()
        job = Job(next(self._ids), "sms", receiver, "", text, now + lifetime, 0, now)
        self.pending[job.id] = (job, 0.0)
        self.changed.set()
        return job

    async def take(self, accept: Callable[[Job], bool] | None = None) -> Job:
        while True:
            now = time.monotonic()
            for job_id in sorted(self.pending):
                job, not_before = self.pending[job_id]
                if job_id in self.reserved or not_before > now:
                    continue
                if accept is None or accept(job):
                    self.reserved.add(job_id)
                    return job
            self.changed.clear()
            # Short wait: a delayed Retry becomes due without a wake(). Not wait_for():
            # on Python 3.11 it can swallow the cancellation that stops the pool.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self.changed.wait()

    async def finish(self, job: Job, outcome: Outcome) -> None:
        self.outcomes.append((job, outcome))
        self.reserved.discard(job.id)
        if isinstance(outcome, Retry):
            again = Job(job.id, job.channel, job.receiver, job.subject, job.text,
                        job.expires_at, job.attempts + 1, job.created_at)
            self.pending[job.id] = (again, time.monotonic() + outcome.delay)
        else:
            del self.pending[job.id]
        self.changed.set()

    def wake(self) -> None:
        self.changed.set()

    def final(self, job: Job) -> Outcome | None:
        """The Delivered/Failed outcome of ``job``, if any yet."""
        for done, outcome in self.outcomes:
            if done.id == job.id and not isinstance(outcome, Retry):
                return outcome
        return None
