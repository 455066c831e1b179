"""The store contract, run against both backends (SQLite, and Redis for several
nodes), plus two daemons sharing one Redis that verify each other's OTPs."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from otpd.store import (
    Duplicate,
    Inserted,
    NewMessage,
    NewOtp,
    RateLimit,
    Store,
    VerifyResult,
)
from otpd.store.redis_state import RedisSharedStore
from tests.store.conftest import drop_prefix
from tests.support.daemon import start_daemon, write_config
from tests.support.mail import SmtpServer
from tests.support.services import REDIS_URL, require_redis

T0 = time.time()  # Redis TTLs are real time: records live around now


def msg(dedupe: str | None = None, otp_reference: str | None = None) -> NewMessage:
    return NewMessage(command="send-sms", channel="sms", receiver="+628126666666", subject="",
                      sealed=b"x", created_at=T0, expires_at=T0 + 1000, dedupe_key=dedupe,
                      otp_reference=otp_reference)


def otp(reference: str) -> NewOtp:
    return NewOtp(reference, "+628126666666", b"\x00salt\xff", b"\x01digest", T0, T0 + 1000)


async def test_otp_duplicate_and_release_on_failure(store: Store) -> None:
    first = await store.insert_message(msg(otp_reference="r"), otp("r"))
    assert isinstance(first, Inserted)
    assert isinstance(await store.insert_message(msg(otp_reference="r"), otp("r")), Duplicate)
    await store.finish_message(first.id, state="failed", code="1102", reason="", via="",
                               attempts=1, now=T0 + 500)
    assert isinstance(await store.insert_message(msg(otp_reference="r"), otp("r")), Inserted)


async def test_duplicate_id_reports_first_status(store: Store) -> None:
    a = await store.insert_message(msg(dedupe="9|+62"))
    assert isinstance(a, Inserted)
    await store.finish_message(a.id, state="sent", code="0000", reason="", via="m1",
                               attempts=1, now=T0 + 500)
    b = await store.insert_message(msg(dedupe="9|+62"))
    assert isinstance(b, Duplicate) and (b.kind, b.state, b.code) == ("id", "sent", "0000")


async def test_verify_binary_salt_and_attempts(store: Store) -> None:
    await store.insert_message(msg(otp_reference="v"), otp("v"))
    seen = []

    def wrong(record: object) -> bool:
        seen.append(record)
        return False

    assert await store.verify_otp("v", T0 + 500, wrong, 2) == VerifyResult.WRONG
    assert await store.verify_otp("v", T0 + 500, wrong, 2) == VerifyResult.BURNED
    record = seen[0]
    assert record.salt == b"\x00salt\xff" and record.digest == b"\x01digest"  # type: ignore[attr-defined]
    assert await store.verify_otp("v", T0 + 500, lambda r: True, 2) == VerifyResult.BURNED
    await store.insert_message(msg(otp_reference="w"), otp("w"))
    assert await store.verify_otp("w", T0 + 1500, lambda r: True, 2) == VerifyResult.EXPIRED
    assert await store.verify_otp("w", T0 + 500, lambda r: True, 2) == VerifyResult.OK
    assert await store.verify_otp("w", T0 + 500, lambda r: True, 2) == VerifyResult.USED
    assert await store.verify_otp("nope", T0 + 500, lambda r: True, 2) == VerifyResult.UNKNOWN


async def test_concurrent_wrong_guesses_are_all_counted(store: Store) -> None:
    await store.insert_message(msg(otp_reference="c"), otp("c"))
    results = await asyncio.gather(*(
        store.verify_otp("c", T0 + 500, lambda r: False, 5) for _ in range(12)))
    assert results.count(VerifyResult.WRONG) == 4
    assert results.count(VerifyResult.BURNED) == 8  # the 5th burns it; later ones see it burned


async def test_block_list(store: Store) -> None:
    await store.block("+62811", 1.0)
    await store.block("a@b.co", 1.0)
    assert await store.is_blocked("+62811")
    assert await store.blocked() == ["+62811", "a@b.co"]
    assert await store.unblock("+62811")
    assert not await store.unblock("+62811")
    assert not await store.is_blocked("+62811")


async def test_rate_limits_sliding_all_or_nothing(store: Store) -> None:
    three = RateLimit("r:+62", window=10.0, limit=3)
    assert [await store.rate_hit([three], t) for t in (100.0, 101.0, 102.0)] == [0, 0, 0]
    wait = await store.rate_hit([three], 103.0)
    assert wait == pytest.approx(7.0)  # the hit at 100 leaves the window at 110
    assert await store.rate_hit([three], 110.5) == 0
    # All or nothing: a refused combination records nothing in the other limit.
    other = RateLimit("u:app", window=10.0, limit=100)
    assert await store.rate_hit([other, three], 110.6) > 0
    for _ in range(100):
        assert await store.rate_hit([other], 111.0) == 0
    assert await store.rate_hit([other], 111.0) > 0
    # Distinct members: the same receiver again costs nothing.
    distinct = [RateLimit("d:app", window=100.0, limit=2, member=m) for m in "aab"]
    assert [await store.rate_hit([d], 200.0) for d in distinct] == [0, 0, 0]
    assert await store.rate_hit([RateLimit("d:app", 100.0, 2, member="c")], 200.0) > 0
    # Checking without recording.
    peek = RateLimit("p:x", window=10.0, limit=1)
    assert await store.rate_hit([peek], 300.0, record=False) == 0
    assert await store.rate_hit([peek], 300.0, record=False) == 0
    assert await store.rate_hit([peek], 300.0) == 0
    assert await store.rate_hit([peek], 300.0, record=False) > 0


async def test_two_nodes_share_otps_and_ids(tmp_path: Path, smtp: SmtpServer,
                                           session: aiohttp.ClientSession) -> None:
    await require_redis()
    prefix = f"otpd-test-{uuid.uuid4().hex}:"
    extra = f"""
        [store]
        backend = "redis"
        redis_url = "{REDIS_URL}"
        redis_prefix = "{prefix}"
    """
    runs = []
    try:
        for name in ("a", "b"):
            node = tmp_path / name
            node.mkdir()
            config = write_config(node, smtp_port=smtp.port)
            text = config.read_text().replace("[store]\n", extra.replace("        ", "") + "\n", 1)
            # Both nodes share the OTP key (HMAC) file, as several nodes must.
            text = text.replace(str(node / "otp.key"), str(tmp_path / "otp.key"))
            config.write_text(text)
            runs.append(await start_daemon(config, session))
        a, b = runs
        _, body = await a.client.call("request-otp", {
            "receiver": "x@example.org", "reference": "shared-1", "message": "Code %s"})
        assert body["response_code"] == "0000"
        payload = smtp.sink.messages[-1].get_payload(decode=True)
        assert isinstance(payload, bytes)
        code = payload.decode().split()[-1]
        _, body = await b.client.call("request-otp", {
            "receiver": "x@example.org", "reference": "shared-1", "message": "Code %s"})
        assert body["response_code"] == "1201"  # the reference is taken cluster-wide
        _, body = await b.client.call("verify-otp", {
            "receiver": "x@example.org", "reference": "shared-1", "otp": code})
        assert body["response_code"] == "0000"  # node b verifies node a's OTP
        _, body = await a.client.call("verify-otp", {
            "receiver": "x@example.org", "reference": "shared-1", "otp": code})
        assert body["response_code"] == "1202"  # single use across nodes
        data = {"id": "m-7", "receiver": "y@example.org", "subject": "s", "message": "m"}
        _, first = await a.client.call("send-email", data)
        _, second = await b.client.call("send-email", data)
        assert first["response_code"] == "0000" and second["response_code"] == "1201"
        await b.client.call("block-msisdn", {"receiver": "08121111111"})
        _, body = await a.client.call("send-sms", {"receiver": "+628121111111", "message": "m"})
        assert body["response_code"] == "1400"
        assert len(smtp.sink.messages) == 2
    finally:
        for run in runs:
            await run.daemon.stop()
        await drop_prefix(prefix)


async def test_sim_quota_per_day(store: Store) -> None:
    from otpd.limits import LimitSettings, SimQuota

    quota = SimQuota(LimitSettings(sim_daily_max=3, sim_monthly_max=0), store)
    sim = f"sim-{uuid.uuid4().hex}"
    assert await quota.wait(sim, 1000.0) == 0
    assert await quota.record(sim, 2, 1000.0) == 0  # 2 of 3 used
    wait = await quota.record(sim, 2, 1001.0)  # a 2-part SMS crosses the cap: still counted
    assert wait == pytest.approx(86400.0, abs=2)
    assert await quota.wait(sim, 1002.0) > 0
    # A day after the first two parts, they have left the window.
    assert await quota.wait(sim, 1000.0 + 86400.5) == 0


async def test_redis_block_list_mailboxes_are_lower_cased_at_open(tmp_path: Path) -> None:
    await require_redis()
    prefix = f"otpd-test-{uuid.uuid4().hex}:"
    client = Redis.from_url(REDIS_URL)
    await client.sadd(f"{prefix}blocklist:set", "Victim@Example.com", "+628121111222")
    await client.aclose()
    s = await RedisSharedStore.open(tmp_path / "otpd.db", REDIS_URL, prefix, 3600, 86400)
    try:
        assert sorted(await s.blocked()) == ["+628121111222", "victim@example.com"]
        assert await s.is_blocked("victim@example.com")
    finally:
        await s.close()
        await drop_prefix(prefix)
