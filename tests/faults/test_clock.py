"""The wall clock jumps (NTP after a boot without RTC, a manual ``date``), as a
user sees it.

Expirations are absolute unix seconds (the wire protocol says so), and the
delivery engine, the service (OTP expiry, rate limits) and the modem pool
read the wall clock. Here the daemon runs in-process with all three built on
a clock the test can jump (``DeliveryEngine(clock=...)``, ``Service(clock=...)``,
``ModemPool(clock=...)``); everything else (asyncio timers, the simulated
modem, the SMTP server) keeps real time, as it would on the Pi.

Forward jump: what is pending past its expiration is dropped (1101 with no
modem, 1102/1203 for email) and never sent, and OTPs expire (1203).
Backward jump: nothing is sent twice, a verified-before OTP stays consistent,
and nothing waits for the clock to catch up (retries, a restart's resumed
messages, rate-limit windows).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import otpd.app.daemon
import otpd.channels.sms.pool
from otpd.channels.sms.pool import ModemPool
from otpd.channels.sms.simulator import ModemSimulator
from otpd.delivery.engine import DeliveryEngine
from otpd.service import Service
from tests.faults.helpers import modem
from tests.support.daemon import (
    SMS_FAST,
    free_port,
    modems_ready,
    start_daemon,
    write_config,
)
from tests.support.gateway import FakeClock, Gateway
from tests.support.mail import SmtpServer, SmtpSink, body_text, tag_of, tagged
from tests.support.waiting import wait_until

HOUR = 3600.0
NUMBER = "08127770001"
RCPT = "clock@example.org"
STUCK = 6.0  # s: longer than any retry delay or sweep interval configured here


@pytest.fixture
async def clocked(tmp_path: Path, session: aiohttp.ClientSession,
                  monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Gateway]:
    """A daemon on a jumpable clock, its SMTP server and modem both stopped."""
    clock = FakeClock()
    monkeypatch.setattr(otpd.app.daemon, "DeliveryEngine", functools.partial(DeliveryEngine,
                                                                      clock=clock))
    monkeypatch.setattr(otpd.app.daemon, "Service", functools.partial(Service, clock=clock))
    monkeypatch.setattr(otpd.channels.sms.pool, "ModemPool",
                        functools.partial(ModemPool, clock=clock))
    limits: str = getattr(request, "param", "enabled = false")  # [limits] table
    sink = SmtpSink(clock=clock)
    smtp = SmtpServer(sink, free_port())
    sim = ModemSimulator(tmp_path / "m1", name="m1", seed=7)
    config = write_config(tmp_path, modem("m1", tmp_path / "m1") + SMS_FAST,
                          smtp_port=smtp.port, wait=0, limits=limits)
    run = await start_daemon(config, session)
    gw = Gateway(run, smtp, sim, clock=clock)
    try:
        yield gw
    finally:
        await gw.close()
        smtp.stop()


async def modem_ready(gw: Gateway) -> None:
    await modems_ready(gw.run)


def sms(tag: str, expiration: float | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": tag, "receiver": NUMBER, "message": tagged(tag)}
    if expiration is not None:
        data["expiration"] = int(expiration)
    return data


def email(tag: str, expiration: float | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": tag, "receiver": RCPT, "subject": "clock",
                            "message": tagged(tag)}
    if expiration is not None:
        data["expiration"] = int(expiration)
    return data


def code_for(sink: SmtpSink, reference_tag: str) -> str:
    for message in sink.messages:
        text = body_text(message)
        if tag_of(text) == reference_tag:
            match = re.search(r"\b(\d{6})\b", text)
            assert match, text
            return match.group(1)
    raise AssertionError(f"no mail for {reference_tag}")


# -- forward ----------------------------------------------------------------------------


async def test_forward_jump_drops_what_expired_unsent(clocked: Gateway) -> None:
    gw = clocked
    now = gw.clock()
    # Pending: no modem yet, the SMTP server is down.
    for name, data in (("send-sms", sms("s-short", now + 60)),
                       ("send-email", email("e-short", now + 60)),
                       ("send-email", email("e-long", now + 900))):
        body = await gw.call(name, data)
        assert body["response_code"] == "1111", body
    body = await gw.call("request-otp", {"receiver": NUMBER, "reference": "o-short",
                                         "message": "Code %s [[o-short]]",
                                         "expiration": int(now + 60)})
    assert body["response_code"] == "1111", body

    gw.clock.jump(120)  # past the short ones' expiration, not the long one's

    async def dropped() -> bool:
        status, _ = await gw.outcome("send-sms", sms("s-short"))
        return status == "expired"

    async with asyncio.timeout(STUCK):  # at most one sweep interval
        while not await dropped():
            await asyncio.sleep(0.1)
    assert await gw.outcome("send-sms", sms("s-short")) == ("expired", "1101")
    status, code = await gw.outcome("send-email", email("e-short"))
    assert status == "expired" and code in ("1102", "1203"), (status, code)
    # The OTP of a message that never went out is gone, expired or not.
    body = await gw.call("verify-otp", {"receiver": NUMBER, "reference": "o-short",
                                        "otp": "123456"})
    assert body["response_code"] == "1202", body
    # An expiration that the jumped clock has passed is refused at once.
    body = await gw.call("send-email", email("e-late", time.time() + 60))
    assert body["response_code"] == "1203", body

    # The modem and the SMTP server come back: only the long-lived one goes out.
    await gw.sim.start()
    gw.smtp.start()
    await modem_ready(gw)
    await wait_until(lambda: gw.delivered()["e-long"], 10, "the long-lived mail")
    await asyncio.sleep(1.0)
    assert gw.delivered() == Counter({"e-long": 1})


async def test_forward_jump_during_handover_is_recorded_as_expired(clocked: Gateway) -> None:
    gw = clocked
    await gw.sim.start()
    await modem_ready(gw)
    store = gw.run.daemon.store
    assert store is not None
    real_mark = store.mark_attempt

    async def mark_then_jump(message_id: int, now: float) -> None:
        await real_mark(message_id, now)
        gw.clock.jump(120)  # between the hand-over and the modem's own expiry check

    store.mark_attempt = mark_then_jump  # type: ignore[method-assign]
    body = await gw.call("send-sms", sms("handover", gw.clock() + 60))
    assert body["response_code"] in ("1111", "1203"), body
    await asyncio.sleep(0.5)
    assert not gw.sim.sent  # never sent after its expiration
    status, code = await gw.outcome("send-sms", sms("handover"))
    assert code == "1203", (status, code)
    assert status == "expired", (status, code)  # as the sweeper would have recorded it


async def test_forward_jump_expires_otps(clocked: Gateway) -> None:
    gw = clocked
    gw.smtp.start()
    for ref in ("otp-a", "otp-b"):
        body = await gw.call("request-otp", {"receiver": RCPT, "reference": ref,
                                             "message": f"Code %s [[{ref}]]"})
        assert body["response_code"] in ("0000", "1111"), body
    await wait_until(lambda: {"otp-a", "otp-b"} <= set(gw.sink.tags()), 10, "the OTP mails")
    body = await gw.call("verify-otp", {"receiver": RCPT, "reference": "otp-b",
                                        "otp": code_for(gw.sink, "otp-b")})
    assert body["response_code"] == "0000", body
    gw.clock.jump(301)  # past the default lifetime (300 s)
    body = await gw.call("verify-otp", {"receiver": RCPT, "reference": "otp-a",
                                        "otp": code_for(gw.sink, "otp-a")})
    assert body["response_code"] == "1203", body


# -- backward -------------------------------------------------------------------------------


async def test_backward_jump_sends_nothing_twice(clocked: Gateway) -> None:
    gw = clocked
    gw.smtp.start()
    await gw.sim.start()
    await modem_ready(gw)
    tags = [f"b-{i}" for i in range(6)]
    for i, tag in enumerate(tags):
        name, data = ("send-sms", sms(tag)) if i % 2 else ("send-email", email(tag))
        assert (await gw.call(name, data))["response_code"] in ("0000", "1111")
    body = await gw.call("request-otp", {"receiver": RCPT, "reference": "otp-back",
                                         "message": "Code %s [[otp-back]]"})
    assert body["response_code"] in ("0000", "1111"), body
    await wait_until(lambda: set(tags) | {"otp-back"} <= set(gw.delivered()), 10,
                   "everything delivered")

    gw.clock.jump(-HOUR)
    await asyncio.sleep(1.5)  # sweeps and workers run on the jumped clock
    # A repeated id is still a duplicate, and nothing went out again.
    assert await gw.outcome("send-email", email("b-0")) == ("sent", "0000")
    body = await gw.call("send-sms", sms("after"))
    assert body["response_code"] in ("0000", "1111"), body
    await wait_until(lambda: gw.delivered()["after"], 10, "a message sent after the jump")
    await asyncio.sleep(0.5)
    assert {t: n for t, n in gw.delivered().items() if n != 1} == {}
    # The OTP is still valid (its expiry is absolute), and single use.
    code = code_for(gw.sink, "otp-back")
    body = await gw.call("verify-otp", {"receiver": RCPT, "reference": "otp-back",
                                        "otp": code})
    assert body["response_code"] == "0000", body
    body = await gw.call("verify-otp", {"receiver": RCPT, "reference": "otp-back",
                                        "otp": code})
    assert body["response_code"] == "1202", body


async def test_backward_jump_does_not_stall_retries(clocked: Gateway) -> None:
    gw = clocked
    await gw.sim.start()
    await modem_ready(gw)
    gw.sim.set_fault("error", code=38)  # the only modem fails each send: retry later
    assert (await gw.call("send-email", email("r-mail", gw.clock() + 900)))[
        "response_code"] == "1111"
    assert (await gw.call("send-sms", sms("r-sms", gw.clock() + 900)))[
        "response_code"] == "1111"
    await asyncio.sleep(0.6)  # each failed at least once and waits for its retry
    assert not gw.delivered()
    gw.clock.jump(-HOUR)
    gw.smtp.start()
    gw.sim.clear_fault()
    await wait_until(lambda: gw.delivered()["r-mail"] and gw.delivered()["r-sms"], STUCK,
                   "the retried messages (the user would wait an hour)")


async def test_restart_after_backward_jump_resumes_at_once(
        clocked: Gateway, session: aiohttp.ClientSession) -> None:
    gw = clocked
    body = await gw.call("send-email", email("resume", gw.clock() + 900))
    assert body["response_code"] == "1111", body
    await asyncio.sleep(0.4)  # failed once (server down): the retry time is on disk
    await gw.run.daemon.stop()
    gw.clock.jump(-HOUR)  # e.g. the Pi rebooted without RTC, then NTP
    gw.smtp.start()
    gw.run = await start_daemon(gw.config, session)
    await wait_until(lambda: gw.delivered()["resume"], STUCK,
                   "the resumed message (the user would wait an hour)")


@pytest.mark.parametrize("clocked", ["enabled = true\nreceiver_cooldown = 1\n"
                                     "receiver_max = 100\nreceiver_daily_max = 100"],
                         indirect=True, ids=["cooldown-1s"])
async def test_backward_jump_does_not_extend_rate_limits(clocked: Gateway) -> None:
    gw = clocked
    gw.smtp.start()
    assert (await gw.call("send-email", email("rl-1")))["response_code"] in ("0000", "1111")
    body = await gw.call("send-email", email("rl-2"))
    assert body["response_code"] == "1401", body  # the 1 s cooldown works
    gw.clock.jump(-HOUR)
    await asyncio.sleep(1.2)  # the cooldown has passed in real time
    # At most one more window (the limiter cannot know how long ago, in real
    # time, an event stamped in the future happened), never the size of the jump.
    body = await gw.call("send-email", email("rl-3"))
    if body["response_code"] == "1401":
        assert body["data"]["retry_after"] <= 1, body
        await asyncio.sleep(body["data"]["retry_after"] + 0.2)
        body = await gw.call("send-email", email("rl-3"))
    assert body["response_code"] in ("0000", "1111"), body


# -- stopping ------------------------------------------------------------------------------

STOP_LIMIT = 5.0  # s: otpd.aio.STOP_BOUND per step, and nothing here needs a second round


async def timed_stop(gw: Gateway, jump_during: float = 0.0) -> float:
    loop = asyncio.get_running_loop()
    if jump_during:
        loop.call_soon(gw.clock.jump, jump_during)  # while stop() is under way
    started = loop.time()
    await gw.run.daemon.stop()
    return loop.time() - started


async def test_stop_is_bounded_whatever_the_clock_does(
        clocked: Gateway, session: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    """Work pending in every channel (a failing modem, an SMTP server that holds
    the DATA answer, an OTP), the clock stepped forward and back around stops."""
    gw = clocked
    await gw.sim.start()
    await modem_ready(gw)
    gw.sim.set_fault("error", code=38)  # each SMS fails and waits for its retry
    gw.sink.delay = 30.0  # the server takes the mail and holds its 250: in flight at stop
    gw.smtp.start()
    for i in range(3):
        assert (await gw.call("send-sms", sms(f"p-sms-{i}", gw.clock() + 900)))[
            "response_code"] == "1111"
        assert (await gw.call("send-email", email(f"p-mail-{i}", gw.clock() + 900)))[
            "response_code"] == "1111"
    body = await gw.call("request-otp", {"receiver": NUMBER, "reference": "p-otp",
                                         "message": "Code %s [[p-otp]]",
                                         "expiration": int(gw.clock() + 900)})
    assert body["response_code"] == "1111", body
    await wait_until(lambda: gw.sink.tags(), 10, "a mail in flight")
    await asyncio.sleep(0.3)  # the SMS failed at least once

    caplog.set_level(logging.WARNING, logger="otpd")
    gw.clock.jump(120)  # forward, short of every expiration
    assert await timed_stop(gw) < STOP_LIMIT
    gw.clock.jump(-2 * HOUR)  # back while it was down
    gw.sink.delay = 0.0
    gw.run = await start_daemon(gw.config, session)
    await asyncio.sleep(0.5)  # the resumed messages are being tried again
    assert await timed_stop(gw, jump_during=-HOUR) < STOP_LIMIT
    gw.clock.jump(3 * HOUR - 120 - 600)  # forward again during the pause, still unexpired
    gw.run = await start_daemon(gw.config, session)
    assert await timed_stop(gw, jump_during=HOUR / 4) < STOP_LIMIT
    assert "gave up" not in caplog.text
    # Nothing was lost on the way: the pending SMS are still pending, the mails went out
    # (the one in flight at the first stop may twice: the server had it, no 250 came).
    gw.run = await start_daemon(gw.config, session)
    for i in range(3):
        status, _ = await gw.outcome("send-sms", sms(f"p-sms-{i}"))
        assert status == "pending", (i, status)
    await wait_until(lambda: {f"p-mail-{i}" for i in range(3)} <= set(gw.sink.tags()), 10,
                   "the pending mails")
