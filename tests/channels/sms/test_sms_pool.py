"""The modem pool (the "sms" channel) with simulated modems and a small fake engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from otpd.channels.sms.pool import ModemPool
from otpd.channels.sms.settings import ModemSettings, SmsSettings, parse_sms_settings
from otpd.channels.sms.simulator import ModemSimulator
from otpd.delivery.channel import Delivered, Failed, Job, Outcome, Retry
from otpd.msisdn import mask
from otpd.settings_reader import Section
from otpd.wire.codes import Code
from tests.support.waiting import wait_until as eventually

from .conftest import FakeSource, fast_settings

Sims = Callable[..., Any]


def pool_settings(*modems: ModemSettings, **kw: Any) -> SmsSettings:
    kw.setdefault("retry_delay", 0.1)
    kw.setdefault("probe_interval", 0.1)
    kw.setdefault("max_probe_interval", 0.3)
    kw.setdefault("refresh_interval", 0.2)
    kw.setdefault("not_ready_timeout", 1.0)
    kw.setdefault("cpin_grace", 0.3)
    return SmsSettings(modems=modems, **kw)


@asynccontextmanager
async def running(pool: ModemPool, source: FakeSource) -> AsyncIterator[None]:
    task = asyncio.create_task(pool.run(source))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def state(pool: ModemPool, name: str) -> str:
    return next(str(m["state"]) for m in pool.status()["modems"] if m["name"] == name)


async def until_ready(pool: ModemPool, *names: str) -> None:
    await eventually(lambda: all(state(pool, n) == "ready" for n in names), what=f"{names} ready")


async def test_delivers_through_all_modems(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", delay=0.05)
    b: ModemSimulator = await sims("b", delay=0.05)
    pool = ModemPool(pool_settings(fast_settings("a", a.link), fast_settings("b", b.link)))
    source = FakeSource()
    assert pool.configured() and not pool.usable()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        assert pool.usable()
        jobs = [source.add(f"+62812000000{i}", f"code {i}") for i in range(6)]
        await eventually(lambda: all(source.final(j) for j in jobs), what="all delivered")
    sent = {(m.receiver, m.text) for m in a.sent + b.sent}
    assert sent == {(j.receiver, j.text) for j in jobs}
    assert a.sent and b.sent  # both workers took jobs while the other was busy
    vias = {o.via for _, o in source.outcomes if isinstance(o, Delivered)}
    assert vias == {"a", "b"}


async def test_failover_to_another_modem(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    b: ModemSimulator = await sims("b")
    a.set_fault("error", code=38)
    pool = ModemPool(pool_settings(
        fast_settings("a", a.link, prefixes=("+62812",)), fast_settings("b", b.link)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        job = source.add("+628121234567", "fail over")
        await eventually(lambda: source.final(job) is not None, what="delivery")
    first, second = (o for _, o in source.outcomes)
    assert isinstance(first, Retry) and "38" in first.reason and first.delay == 0.0
    assert second == Delivered(via="b", detail=second.detail)  # type: ignore[union-attr]
    assert a.sent == [] and [m.text for m in b.sent] == ["fail over"]


async def test_hung_modem_times_out_is_taken_out_and_probed_back(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    b: ModemSimulator = await sims("b")
    pool = ModemPool(pool_settings(
        fast_settings("a", a.link, prefixes=("+62812",), prompt_timeout=0.3, send_timeout=0.3),
        fast_settings("b", b.link)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        a.set_fault("hang")
        job = source.add("+628121234567", "hung")
        await eventually(lambda: source.final(job) is not None, what="delivery")
        assert isinstance(source.outcomes[0][1], Retry)
        assert source.final(job) == Delivered(via="b", detail="mr=1")
        await eventually(lambda: state(pool, "a") == "down", what="a out of rotation")
        resets_before = a.resets
        a.clear_fault()
        await until_ready(pool, "a")  # probed back in
        assert a.resets > resets_before  # re-initialised with ATZ
        again = source.add("+628129999999", "routed to a again")
        await eventually(lambda: source.final(again) is not None, what="second delivery")
    assert source.final(again) == Delivered(via="a", detail="mr=1")
    assert [m.text for m in a.sent] == ["routed to a again"]


async def test_vanished_port_is_reopened_when_it_returns(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    pool = ModemPool(pool_settings(fast_settings("a", a.link)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        a.vanish()
        await eventually(lambda: state(pool, "a") == "down", what="unplug noticed")
        assert not pool.usable()
        job = source.add("+628121234567", "while unplugged")
        await asyncio.sleep(0.3)
        assert source.outcomes == []  # nothing can take it; the engine decides on expiry
        a.reappear()
        await eventually(lambda: source.final(job) is not None, what="delivery after replug")
    assert [m.text for m in a.sent] == ["while unplugged"]
    assert "lost" in pool.status()["modems"][0]["last_error"] or state(pool, "a") == "ready"


async def test_wrong_pin_fails_the_modem_and_is_never_retried(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", pin="1234")
    pool = ModemPool(pool_settings(fast_settings("a", a.link, pin="0000")))
    source = FakeSource()
    async with running(pool, source):
        await eventually(lambda: state(pool, "a") == "failed", what="failed state")
        await asyncio.sleep(0.5)  # several probe intervals: nothing may retry the PIN
        assert state(pool, "a") == "failed"
        assert pool.configured() and not pool.usable()
    assert a.pin_attempts == 1
    status = pool.status()["modems"][0]
    assert "PIN" in status["last_error"]
    assert "0000" not in json.dumps(pool.status())


async def test_prefix_routing_with_fallback(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    b: ModemSimulator = await sims("b")
    errors: list[str] = []
    root = Section({"modem": [
        {"name": "a", "port": str(a.link), "prefixes": ["0812", "0813"]},
        {"name": "b", "port": str(b.link), "prefixes": ["+62857"]},
    ]}, "", errors)
    parsed = parse_sms_settings(root.sections("modem"), None, "62")
    assert errors == [] and parsed.modems[0].prefixes == ("+62812", "+62813")
    pool = ModemPool(pool_settings(*(
        fast_settings(m.name, m.port, prefixes=m.prefixes) for m in parsed.modems)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        jobs = [source.add(r, "routed") for r in
                ("+628121111111", "+628572222222", "+628133333333", "+628575555555")]
        await eventually(lambda: all(source.final(j) for j in jobs), what="routed delivery")
        assert {m.receiver for m in a.sent} == {"+628121111111", "+628133333333"}
        assert {m.receiver for m in b.sent} == {"+628572222222", "+628575555555"}
        # b unplugged: its prefix falls back to any usable modem.
        b.vanish()
        await eventually(lambda: state(pool, "b") == "down", what="b down")
        fallback = source.add("+628579999999", "fallback")
        other = source.add("+14155550000", "no prefix matches")
        await eventually(lambda: bool(source.final(fallback) and source.final(other)),
                         what="fallback delivery")
    assert source.final(fallback) == Delivered(via="a", detail=source.final(fallback).detail)  # type: ignore[union-attr]
    assert {m.receiver for m in a.sent} >= {"+628579999999", "+14155550000"}


async def test_permanent_errors_fail_the_job(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    b: ModemSimulator = await sims("b")
    pool = ModemPool(pool_settings(fast_settings("a", a.link, max_parts=2),
                                   fast_settings("b", b.link, max_parts=2)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        too_long = source.add("+628121234567", "x" * 400)
        await eventually(lambda: source.final(too_long) is not None, what="too long")
        a.set_fault("error", code=1)
        b.set_fault("error", code=1)
        bad_number = source.add("+628120000000", "unassigned")
        await eventually(lambda: source.final(bad_number) is not None, what="bad number")
        expired = source.add("+628121234567", "late", lifetime=-1)
        await eventually(lambda: source.final(expired) is not None, what="expired")
    assert isinstance(source.final(too_long), Failed)
    assert "at most 2" in source.final(too_long).reason  # type: ignore[union-attr]
    failed = source.final(bad_number)
    assert isinstance(failed, Failed) and "unassigned" in failed.reason
    assert len(source.outcomes) == 3  # no retries for permanent errors
    assert source.final(expired) == Failed("expired before it could be sent", Code.EXPIRED)
    assert a.sent == [] and b.sent == []


async def test_repeated_failures_reset_the_modem(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    pool = ModemPool(pool_settings(fast_settings("a", a.link), max_failures_before_reset=2,
                                   retry_delay=0.05))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        resets = a.resets
        a.set_fault("error", code=41)
        job = source.add("+628121234567", "eventually")
        await eventually(lambda: a.resets > resets, what="reset after failures")
        a.clear_fault()
        await eventually(lambda: source.final(job) is not None, what="delivery after reset")
    retries = [o for _, o in source.outcomes if isinstance(o, Retry)]
    assert len(retries) >= 2 and all(r.delay == 0.05 for r in retries)  # no other modem
    assert source.final(job) == Delivered(via="a", detail=source.final(job).detail)  # type: ignore[union-attr]
    assert pool.status()["modems"][0]["failed"] == len(retries)


async def test_status_is_json_and_secret_free(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", profile="huawei", pin="2468")
    pool = ModemPool(pool_settings(fast_settings("a", a.link, pin="2468"),
                                   fast_settings("off", "/dev/null", enabled=False)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        job = source.add("+628121234567", "status")
        await eventually(lambda: source.final(job) is not None, what="delivery")
        status = json.loads(json.dumps(pool.status()))
    first, off = status["modems"]
    assert first["manufacturer"] == "huawei" and first["imei"] == "359000000000001"
    assert first["signal"] == {"csq": 18, "rssi_dbm": -77, "condition": "good"}
    assert first["registered"] is True and first["sent"] == 1 and first["failed"] == 0
    assert off["state"] == "disabled"
    assert "2468" not in json.dumps(status) and "pin" not in json.dumps(status).lower()


async def test_logs_never_contain_text_or_pin(sims: Sims, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="otpd")
    a: ModemSimulator = await sims("a", pin="8642")
    pool = ModemPool(pool_settings(fast_settings("a", a.link, pin="8642")))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        a.set_fault("error", code=42)
        job = source.add("+628121234567", "Your OTP is 917253")
        await eventually(lambda: len(source.outcomes) >= 1, what="a failure")
        a.clear_fault()
        await eventually(lambda: source.final(job) is not None, what="delivery")
    text = caplog.text
    assert "917253" not in text and "8642" not in text
    assert "+628121234567" not in text and mask("+628121234567") in text


async def test_no_modem_usable_and_none_configured(sims: Sims) -> None:
    empty = ModemPool(SmsSettings())
    assert not empty.configured() and not empty.usable()
    assert empty.status()["modems"] == [] and empty.status()["sims"] == {}
    source = FakeSource()
    source.add("+628121234567", "nobody")
    async with running(empty, source):
        await asyncio.sleep(0.1)
    assert source.outcomes == []
    a: ModemSimulator = await sims("a")
    a.vanish()  # configured, but the port is not there
    pool = ModemPool(pool_settings(fast_settings("a", a.link)))
    async with running(pool, source):
        await eventually(lambda: state(pool, "a") == "down", what="down")
        await asyncio.sleep(0.2)
        assert pool.configured() and not pool.usable()
    assert source.outcomes == []


async def test_ussd_through_the_pool(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    pool = ModemPool(pool_settings(fast_settings("a", a.link)))
    async with running(pool, FakeSource()):
        await until_ready(pool, "a")
        data = await pool.ussd("a", "*888#")
        with pytest.raises(LookupError):
            await pool.ussd("zz", "*888#")
    assert data["ussd_content"].startswith("Balance: 10000")
    assert data["ussd_content_raw"].startswith("+CUSD: 0,") and data["replyable"] is False


async def test_incoming_sms_reported_when_read_inbox(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    got: list[Any] = []
    pool = ModemPool(pool_settings(fast_settings("a", a.link, read_inbox=True)),
                     on_incoming=got.append)
    async with running(pool, FakeSource()):
        await until_ready(pool, "a")
        index = a.inject_incoming("+628111111111", "STOP")
        await eventually(lambda: bool(got), what="incoming SMS")
    assert (got[0].modem, got[0].sender, got[0].text) == ("a", "+628111111111", "STOP")
    assert index in a.storage  # read, never deleted


async def test_modem_hanging_mid_send_fails_over_and_comes_back(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    b: ModemSimulator = await sims("b")
    pool = ModemPool(pool_settings(
        fast_settings("a", a.link, prefixes=("+62812",), send_timeout=0.3, command_timeout=0.2),
        fast_settings("b", b.link), refresh_interval=30))
    source = FakeSource()
    text = "A long one-time password message that needs three parts. " * 7
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        a.set_fault("hang", after_parts=1)  # part 1 out, then silence after part 2's PDU
        job = source.add("+628121234567", text)
        await eventually(lambda: source.final(job) is not None, what="delivery")
        first = source.outcomes[0][1]
        assert isinstance(first, Retry) and "no answer" in first.reason and first.delay == 0
        assert source.final(job) == Delivered(via="b", detail=source.final(job).detail)  # type: ignore[union-attr]
        await eventually(lambda: state(pool, "a") == "down", what="a out of rotation")
        a.clear_fault()
        await until_ready(pool, "a")
        again = source.add("+628129999999", "a again")
        await eventually(lambda: source.final(again) is not None, what="second delivery")
    assert sum(c.startswith("AT+CMGS=") for c in a.commands) >= 2  # hung on the 2nd part
    assert [(m.text, m.parts) for m in b.sent] == [(text, 3)]
    assert [m.text for m in a.sent] == ["a again"]  # the half-sent message never completed
    assert source.final(again) == Delivered(via="a", detail=source.final(again).detail)  # type: ignore[union-attr]


async def test_port_vanishing_mid_send_delivers_once_when_it_returns(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", delay=0.3)
    pool = ModemPool(pool_settings(fast_settings("a", a.link)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        job = source.add("+628121234567", "unplugged while sending")
        await eventually(lambda: any(c.startswith("AT+CMGS=") for c in a.commands),
                         what="send started")
        a.vanish()  # the modem dies before it answers: the SMS did not go out
        await eventually(lambda: bool(source.outcomes), what="failed attempt")
        assert isinstance(source.outcomes[0][1], Retry) and a.sent == []
        await eventually(lambda: state(pool, "a") == "down", what="a down")
        a.delay = 0.0
        a.reappear()
        await eventually(lambda: source.final(job) is not None, what="delivery after replug")
    assert [m.text for m in a.sent] == ["unplugged while sending"]
    assert source.final(job) == Delivered(via="a", detail=source.final(job).detail)  # type: ignore[union-attr]


async def test_storage_full_recovered_on_the_same_modem(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", store_sent=True, capacity=5)
    b: ModemSimulator = await sims("b")
    pool = ModemPool(pool_settings(fast_settings("a", a.link, prefixes=("+62812",)),
                                   fast_settings("b", b.link)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        unread = a.inject_incoming("+628111111111", "keep me")
        while len(a.storage) < a.capacity:
            a.store_submit("+628122222222", "copy")
        job = source.add("+628121234567", "storage was full")
        await eventually(lambda: source.final(job) is not None, what="delivery")
    assert [o for _, o in source.outcomes] == [source.final(job)]  # no failed attempt
    assert source.final(job) == Delivered(via="a", detail=source.final(job).detail)  # type: ignore[union-attr]
    assert [m.text for m in a.sent] == ["storage was full"] and b.sent == []
    assert unread in a.storage and a.storage[unread].stat == 0


async def test_storage_full_of_unread_messages_fails_over(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", store_sent=True, capacity=2)
    b: ModemSimulator = await sims("b")
    pool = ModemPool(pool_settings(fast_settings("a", a.link, prefixes=("+62812",)),
                                   fast_settings("b", b.link)))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        kept = [a.inject_incoming("+628111111111", f"unread {i}") for i in range(2)]
        job = source.add("+628121234567", "goes out through b")
        await eventually(lambda: source.final(job) is not None, what="delivery")
    first = source.outcomes[0][1]
    assert isinstance(first, Retry) and "322" in first.reason
    assert source.final(job) == Delivered(via="b", detail=source.final(job).detail)  # type: ignore[union-attr]
    assert sorted(i for i, s in a.storage.items() if s.stat == 0) == kept


async def test_idle_modem_sweeps_stored_copies(sims: Sims) -> None:
    a: ModemSimulator = await sims("a", store_sent=True)
    pool = ModemPool(pool_settings(fast_settings("a", a.link), idle_sweep_delay=0.5,
                                   refresh_interval=30))
    source = FakeSource()

    def copies() -> list[int]:
        return [i for i, s in a.storage.items() if s.stat in (2, 3)]

    async with running(pool, source):
        await until_ready(pool, "a")
        unread = a.inject_incoming("+628111111111", "keep me")
        jobs = [source.add("+628121234567", f"code {i}") for i in range(4)]
        await eventually(lambda: all(source.final(j) for j in jobs), what="delivery")
        # The first send was swept at once (to learn that copies are kept); the
        # others' copies wait for an idle moment.
        assert len(copies()) == 3
        await eventually(lambda: not copies(), timeout=2.0, what="idle-time sweep")
    assert len(a.sent) == 4 and a.storage[unread].stat == 0


async def test_outcome_is_recorded_even_when_stopped_while_recording(sims: Sims) -> None:
    a: ModemSimulator = await sims("a")
    recording = asyncio.Event()

    class SlowCommit(FakeSource):
        async def finish(self, job: Job, outcome: Outcome) -> None:
            recording.set()
            await asyncio.sleep(0.2)  # a slow disk under the store
            await super().finish(job, outcome)

    pool = ModemPool(pool_settings(fast_settings("a", a.link)))
    source = SlowCommit()
    task = asyncio.create_task(pool.run(source))
    await until_ready(pool, "a")
    job = source.add("+628121234567", "sent just before shutdown")
    async with asyncio.timeout(5):
        await recording.wait()
    task.cancel()  # otpd stops while the outcome is being written
    with pytest.raises(asyncio.CancelledError):
        await task
    # Recorded: a restart must not send it a second time.
    assert source.final(job) == Delivered(via="a", detail=source.final(job).detail)  # type: ignore[union-attr]
    assert [m.text for m in a.sent] == ["sent just before shutdown"]
