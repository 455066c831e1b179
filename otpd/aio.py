"""asyncio helpers that hold on Python 3.11 (pure asyncio; imports nothing from otpd).

Python 3.11's ``asyncio.wait_for`` returns the awaited result when it arrives
in the same loop iteration as a cancellation, and drops the cancellation
(fixed in 3.12). Libraries otpd calls use it (aiosmtplib reads every SMTP
reply through it), so a task asked to stop can get a normal return instead of
``CancelledError`` and carry on waiting for more work. Hence:

- loops around such library calls check :func:`raise_if_cancel_requested`;
- shutdown uses :func:`cancel_and_wait`, which delivers a lost cancellation
  again, says what it is waiting for, and never waits without bound;
- otpd's own code never calls ``asyncio.wait_for`` (ruff bans it): use
  :func:`within` (``asyncio.timeout`` underneath) instead.

Every duration here is on the event loop's clock (monotonic): a wall-clock
step, forward or back, changes none of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

STOP_BOUND = 3.0  # s one part of the daemon may take to stop before it is left behind
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
_REPORT_EVERY = 1.0  # s between "still waiting for ..." lines (and repeated cancellations)


def raise_if_cancel_requested() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop and a
    library swallowed that request (see the module docstring)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def within(seconds: float | None, aw: Awaitable[T]) -> T:
    """``await aw`` with a time limit (``TimeoutError``); unlike 3.11's
    ``asyncio.wait_for`` it never drops a cancellation."""
    async with asyncio.timeout(seconds):
        return await aw


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Capped exponential backoff with jitter: uniform in [cap/2, cap] (at least ``low``)."""
    cap: float = min(high, low * (2 ** min(attempt, 30)))
    return random.uniform(max(low, cap / 2), cap)


def where(task: asyncio.Future[Any]) -> str:
    """The task's name and the innermost line it waits on (for stop logs)."""
    if not isinstance(task, asyncio.Task):
        return repr(task)
    coro: object = task.get_coro()
    place = ""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and not frame.f_code.co_filename.startswith(_ASYNCIO_DIR):
            place = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"{task.get_name()} ({place})" if place else task.get_name()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[T]], what: str, log: logging.Logger,
                          bound: float = STOP_BOUND) -> bool:
    """Cancel ``tasks`` and wait until they end, at most ``bound`` seconds.

    Every second that some are still running it logs which (and where they
    wait) and cancels them again: a cancellation a library dropped is
    delivered anew. Returns False (logged as an error) if some outlived the
    bound; they are left to the event loop. Exceptions of the tasks are
    retrieved, never raised here.
    """
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The caller may be cancelled again while it waits here (its own stopper
    # repeats cancellations too): it finishes this cleanup first, within the
    # bound, then passes the cancellation on. Unlike asyncio.TaskGroup, which
    # cancels its children once, a repeated request here reaches them every time.
    interrupted = False
    try:
        while pending:
            left = bound - (loop.time() - started)
            if left <= 0:
                log.error("stopping %s: gave up after %.1f s; still running: %s", what, bound,
                          ", ".join(sorted(where(t) for t in pending)))
                return False
            try:
                _, pending = await asyncio.wait(pending, timeout=min(_REPORT_EVERY, left))
            except asyncio.CancelledError:
                interrupted = True
                pending = {t for t in pending if not t.done()}
            if pending and loop.time() - started < bound:
                log.warning("stopping %s: still waiting after %.1f s for %s", what,
                            loop.time() - started, ", ".join(sorted(where(t) for t in pending)))
                for task in pending:
                    task.cancel()
        return True
    finally:
        if interrupted:
            raise asyncio.CancelledError


async def bounded(aw: Awaitable[T], what: str, log: logging.Logger,
                  bound: float = STOP_BOUND) -> T | None:
    """Run one stop step (``aw``) in its own task, saying every second what it
    still waits for; after ``bound`` seconds it is cancelled (see
    :func:`cancel_and_wait`) and None returned. Its exception, if any, is logged."""
    async def step() -> T:
        return await aw

    task = asyncio.create_task(step(), name=what)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not task.done():
        left = bound - (loop.time() - started)
        if left <= 0:
            await cancel_and_wait([task], what, log, bound=_REPORT_EVERY)
            return None
        done, _ = await asyncio.wait({task}, timeout=min(_REPORT_EVERY, left))
        if not done:
            log.warning("stopping %s: still waiting after %.1f s (%s)", what,
                        loop.time() - started, where(task))
    if task.cancelled():
        return None
    exc = task.exception()
    if exc is not None:
        log.error("stopping %s failed: %s", what, exc, exc_info=exc)
        return None
    return task.result()
