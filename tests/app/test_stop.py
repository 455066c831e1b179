"""Stopping in a bounded time, whatever a library does with a cancellation.

Python 3.11's ``asyncio.wait_for`` returns a result that arrives in the same
loop iteration as a cancellation and drops the cancellation. aiosmtplib reads
every SMTP reply through it, so an SMTP worker cancelled by ``stop()`` just as
the server answered went back for more work, and the daemon never stopped
(the fault suite's hang). These tests reproduce that race on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from otpd.aio import bounded, cancel_and_wait, raise_if_cancel_requested, within
from otpd.app.settings import SmtpAccount
from otpd.channels.email import SmtpChannel
from otpd.delivery.channel import Delivered, Job, Outcome
from otpd.delivery.engine import DeliveryEngine, Result
from otpd.sealing import Sealer
from otpd.store import Inserted, NewMessage, SqliteStore
from otpd.wire.codes import Code


async def swallowed_cancel(answer: asyncio.Future[str]) -> str:
    """What aiosmtplib does per reply on 3.11; the test answers and cancels in
    one loop iteration. On 3.12+ the cancellation is not lost."""
    return await asyncio.wait_for(answer, 10)  # noqa: TID251 - the race under test


async def lost_cancellation(task: asyncio.Task[object], answer: asyncio.Future[str]) -> None:
    """Answer the task's pending wait and cancel the task in the same iteration."""
    answer.set_result("250 OK")
    task.cancel()
    await asyncio.sleep(0)


async def test_a_swallowed_cancellation_is_delivered_again(
        caplog: pytest.LogCaptureFixture) -> None:
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    second = asyncio.Event()

    async def worker() -> None:
        await swallowed_cancel(answer)
        await second.wait()  # where the SMTP worker went back for the next job

    task = asyncio.create_task(worker(), name="worker")
    await asyncio.sleep(0.01)
    caplog.set_level(logging.WARNING)
    log = logging.getLogger("test")
    await lost_cancellation(task, answer)
    assert await cancel_and_wait([task], "the worker", log, bound=5.0)
    assert task.cancelled()


async def test_a_task_that_never_ends_is_left_after_the_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    stubborn_now = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not stubborn_now:
                    raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with caplog.at_level(logging.WARNING):
            ok = await cancel_and_wait([task], "stubborn things", logging.getLogger("test"),
                                       bound=1.5)
        assert not ok
        assert loop.time() - started < 3.0
        assert "still waiting after" in caplog.text and "stubborn (test_stop.py:" in caplog.text
        assert "stopping stubborn things: gave up after 1.5 s" in caplog.text
    finally:
        stubborn_now = False
        assert await cancel_and_wait([task], "stubborn things", logging.getLogger("test"))


async def test_bounded_step_reports_and_returns(caplog: pytest.LogCaptureFixture) -> None:
    async def slow() -> str:
        await asyncio.sleep(1.3)
        return "done"

    with caplog.at_level(logging.WARNING):
        assert await bounded(slow(), "a slow step", logging.getLogger("test"), bound=5) == "done"
    # The step is named, with the line it waits on (the seconds vary with the load).
    assert "stopping a slow step: still waiting after" in caplog.text
    assert "(a slow step (test_stop.py:" in caplog.text
    # A gathering future (not a task) as the step, as Daemon.stop() passes.
    both = await bounded(asyncio.gather(slow(), slow()), "both", logging.getLogger("test"),
                         bound=5)
    assert both is not None and list(both) == ["done", "done"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert await bounded(slow(), "a hung step", logging.getLogger("test"),
                             bound=1.2) is None
    assert "stopping a hung step: still waiting after" in caplog.text


async def test_raise_if_cancel_requested_stops_a_loop_after_a_lost_cancellation() -> None:
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    rounds = 0

    async def loop_worker() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await swallowed_cancel(answer)
            raise_if_cancel_requested()

    task = asyncio.create_task(loop_worker())
    await asyncio.sleep(0.01)
    await lost_cancellation(task, answer)
    with pytest.raises(asyncio.CancelledError):
        await within(2, task)
    assert rounds == 1


async def test_within_times_out_and_passes_results() -> None:
    assert await within(1, asyncio.sleep(0, "x")) == "x"
    with pytest.raises(TimeoutError):
        await within(0.05, asyncio.sleep(5))


class SwallowingSmtp(SmtpChannel):
    """An SMTP channel whose library swallows the cancellation stop() sends while
    a message is in flight, and returns the server's answer instead (what 3.11's
    ``asyncio.wait_for`` does when the 250 and the cancellation arrive together)."""

    def __init__(self) -> None:
        account = SmtpAccount(name="local", host="127.0.0.1", port=1, security="none",
                              username="", password="", sender="otp@example.org",
                              timeout=5.0, validate_certs=True)
        super().__init__((account,), workers=2, retry_base=1.0, retry_max=2.0)
        self.in_flight = asyncio.Event()
        self.swallowed = 0

    async def deliver(self, job: Job) -> Outcome:
        self.in_flight.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1
        return Delivered(via="local")


async def test_engine_stops_when_the_smtp_library_swallows_the_cancellation(
        tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "otpd.db")
    sealer = Sealer(os.urandom(32))
    channel = SwallowingSmtp()
    engine = DeliveryEngine(store, {"email": channel}, sealer)
    await engine.start()
    now = time.time()
    receiver = "someone@example.org"
    msg = NewMessage(command="send-email", channel="email", receiver=receiver, subject="s",
                     sealed=sealer.seal("text", receiver), created_at=now, expires_at=now + 60)
    inserted = await store.insert_message(msg)
    assert isinstance(inserted, Inserted)
    job = Job(id=inserted.id, channel="email", receiver=receiver, subject="s", text="text",
              expires_at=now + 60, attempts=0, created_at=now)
    result = await engine.submit(job)
    await within(5, channel.in_flight.wait())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await within(10, engine.stop())
    assert loop.time() - started < 2.0  # no second cancellation round was needed
    assert channel.swallowed == 1
    # The answer that came back instead was recorded: the message is not sent again
    # after a restart.
    assert (await result) == Result("sent", Code.SUCCESS, "", "local")
    assert await store.pending_messages() == []
    await store.close()
