"""``manage_otp``: the library makes, stores (SQLite or shared Redis) and checks
the OTPs; the daemon only gets ``send-message`` with the code in the text."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from otpd.client import AsyncOtpClient, ReplyTimeout, TransportError, parse_client_config
from otpd.client.config import ClientConfig
from tests.support.brokers import receiver, unique
from tests.support.client_config import client_toml, phone
from tests.support.gateway import Gateway, MakeGateway
from tests.support.mail import body_text, code_in
from tests.support.services import REDIS_URL, require_service

SECRET = "client-otp-secret-0123456789abcdef"
PARAMS = ["100000", "1234567890"]


def managed(store: str, tmp_path: Path, prefix: str, *, max_attempts: int = 5) -> str:
    return f"""
        [manage_otp]
        enabled = true
        store = "{store}"
        path = "{tmp_path / 'client-otp.db'}"
        redis_url = "{REDIS_URL}"
        key_prefix = "{prefix}"
        secret_key = "{SECRET}"
        max_attempts = {max_attempts}
        subject = "Kode OTP Anda"
    """


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    await require_service("redis")
    prefix = f"{unique('otp')}:"
    yield prefix
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def mail_code(gw: Gateway, address: str) -> str:
    mail = await gw.mail(address)
    assert mail["Subject"] == "Kode OTP Anda"
    return code_in(body_text(mail))


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_create_and_verify_locally(store: str, make_gateway: MakeGateway, tmp_path: Path,
                                         redis_prefix: str) -> None:
    gw = await make_gateway("rest")
    c = gw.client(extra=managed(store, tmp_path, redis_prefix, max_attempts=5))
    address = receiver()
    r = await c.create_otp(address, "tx-1", 60, "Your OTP is %s", PARAMS)
    assert r.response_code == "0000" and r.command == "request-otp", r
    assert r.data["reference"] == "tx-1" and r.data["receiver"] == address
    code = await mail_code(gw, address)
    # The daemon never saw an OTP for this reference: it got send-message.
    _, body = await gw.run.client.call("verify-otp", {"receiver": address, "reference": "tx-1",
                                                      "otp": code, "param1": PARAMS[0],
                                                      "param2": PARAMS[1]})
    assert body["response_code"] == "1202"
    wrong = "000000" if code != "000000" else "111111"
    r = await c.verify_otp(address, wrong, "tx-1", PARAMS)
    assert r.response_code == "1202" and r.local
    assert (await c.verify_otp(address, code, "tx-1", ["100000"])).response_code == "1202"
    assert (await c.verify_otp(receiver(), code, "tx-1", PARAMS)).response_code == "1202"
    # The same mailbox in another case is the same receiver: a wrong code there counts.
    r = await c.verify_otp(address.upper().replace("EXAMPLE.ORG", "Example.org"), wrong, "tx-1",
                           PARAMS)
    assert r.response_code == "1202"
    # The fifth wrong try (max_attempts = 5) burns it, even for the right code.
    assert (await c.verify_otp(address, wrong, "tx-1", PARAMS)).response_code == "1204"
    assert (await c.verify_otp(address, code, "tx-1", PARAMS)).response_code == "1204"
    assert (await c.create_otp(address, "tx-1", 60, "Again %s", PARAMS)).response_code == "1201"

    # Right code: consumed once; phone numbers in any form are the same receiver.
    number = phone()
    assert (await c.create_otp(number, "tx-2", 60, "Kode %s", PARAMS)).response_code == "0000"
    code = code_in(await gw.sms_text(number[1:]))
    r = await c.verify_otp("+62 " + number[1:], code, "tx-2", PARAMS)
    assert r.response_code == "0000" and r.success
    assert (await c.verify_otp(number, code, "tx-2", PARAMS)).response_code == "1202"

    # Expired.
    address = receiver()
    assert (await c.create_otp(address, "tx-3", 1, "Code %s")).response_code == "0000"
    code = await mail_code(gw, address)
    await asyncio.sleep(1.1)
    assert (await c.verify_otp(address, code, "tx-3")).response_code == "1203"

    # Refused locally, nothing stored or sent.
    r = await c.create_otp(address, "tx-4", 60, "Code %d")
    assert r.response_code == "1300" and r.local
    r = await c.create_otp("not a number", "tx-4", 60, "Code %s")
    assert r.response_code == "1300" and "receiver" in (r.message or "")
    assert (await c.create_otp(address, "tx-4", 60, "Code %s")).response_code == "0000"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_refused_or_failed_publish_leaves_no_otp(
        store: str, make_gateway: MakeGateway, tmp_path: Path, redis_prefix: str) -> None:
    gw = await make_gateway("rest")
    extra = managed(store, tmp_path, redis_prefix)
    c = gw.client(extra=extra)
    number = phone()
    # The daemon refuses (blocked receiver, 1400): the OTP is removed...
    assert (await c.block_msisdn(number)).ok
    r = await c.create_otp(number, "tx-1", 60, "Kode %s")
    assert r.response_code == "1400"
    assert (await c.unblock_msisdn(number)).ok
    # ... so the app can retry with the same reference.
    assert (await c.create_otp(number, "tx-1", 60, "Kode %s")).response_code == "0000"
    code = code_in(await gw.sms_text(number[1:]))
    # Not delivered at all (Redis channel nobody listens to): removed too.
    await require_service("redis")
    broken = gw.client("redis", extra=extra)
    with pytest.raises(TransportError):
        await broken.create_otp(number, "tx-2", 60, "Kode %s")
    assert (await c.create_otp(number, "tx-2", 60, "Kode %s")).response_code == "0000"
    # The first OTP is untouched by all this.
    assert (await broken.verify_otp(number, code, "tx-1")).response_code == "0000"


async def test_over_a_broker_fire_and_forget(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway("mqtt")
    c = gw.client(extra=managed("sqlite", tmp_path, ""))
    number = phone()
    r = await c.create_otp(number, "tx-1", 60, "Kode OTP Anda %s", PARAMS)
    assert r.response_code == "1111" and r.local and r.ok, r
    code = code_in(await gw.sms_text(number[1:]))
    assert (await c.verify_otp(number, code, "tx-1", PARAMS)).response_code == "0000"
    # With wait_result, the daemon's answer to send-message becomes request-otp's.
    r = await c.create_otp(number, "tx-2", 60, "Kode %s", wait_result=True)
    assert r.response_code == "0000" and not r.local and r.data["via"] == "sim1", r


async def test_published_but_unanswered_keeps_the_otp(tmp_path: Path) -> None:
    """A ReplyTimeout means the message may still arrive: the OTP stays valid."""
    await require_service("mqtt")
    toml = client_toml("mqtt", unique("nobody")) + managed("sqlite", tmp_path, "")
    c = AsyncOtpClient(parse_client_config(toml))
    try:
        with pytest.raises(ReplyTimeout):
            await c.create_otp(phone(), "tx-1", 60, "Kode %s", wait_result=True, timeout=0.3)
        assert (await c.create_otp(phone(), "tx-1", 60, "Kode %s")).response_code == "1201"
    finally:
        await c.close()


def shared_config(gw: Gateway, store: str, tmp_path: Path, prefix: str,
                  max_attempts: int) -> ClientConfig:
    return parse_client_config(client_toml("rest", "", rest_port=gw.rest_port)
                               + managed(store, tmp_path, prefix, max_attempts=max_attempts))


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_two_app_servers_share_the_store(store: str, make_gateway: MakeGateway,
                                               tmp_path: Path, redis_prefix: str) -> None:
    """Two clients (app servers) on one store: each verifies the other's OTPs, and
    concurrent wrong guesses through both are all counted, atomically."""
    gw = await make_gateway("rest")
    max_attempts = 5
    a = AsyncOtpClient(shared_config(gw, store, tmp_path, redis_prefix, max_attempts))
    b = AsyncOtpClient(shared_config(gw, store, tmp_path, redis_prefix, max_attempts))
    gw.clients += [a, b]
    address = receiver()
    assert (await a.create_otp(address, "tx-1", 60, "Code %s")).response_code == "0000"
    code = await mail_code(gw, address)
    assert (await b.create_otp(address, "tx-1", 60, "Code %s")).response_code == "1201"
    assert (await b.verify_otp(address, code, "tx-1")).response_code == "0000"
    assert (await a.verify_otp(address, code, "tx-1")).response_code == "1202"

    address = receiver()
    assert (await b.create_otp(address, "tx-2", 60, "Code %s")).response_code == "0000"
    code = await mail_code(gw, address)
    wrong = [f"{(int(code) + i) % 10**6:06d}" for i in range(1, 21)]
    results = await asyncio.gather(*(
        (a if i % 2 else b).verify_otp(address, guess, "tx-2") for i, guess in enumerate(wrong)))
    codes = sorted(r.response_code for r in results)
    assert codes == ["1202"] * (max_attempts - 1) + ["1204"] * (len(wrong) - max_attempts + 1)
    assert (await a.verify_otp(address, code, "tx-2")).response_code == "1204"

    # Concurrent right codes: accepted exactly once.
    address = receiver()
    assert (await a.create_otp(address, "tx-3", 60, "Code %s")).response_code == "0000"
    code = await mail_code(gw, address)
    results = await asyncio.gather(*((a, b)[i % 2].verify_otp(address, code, "tx-3")
                                     for i in range(10)))
    assert sorted(r.response_code for r in results) == ["0000"] + ["1202"] * 9


async def test_redis_records_expire_by_themselves(make_gateway: MakeGateway, tmp_path: Path,
                                                  redis_prefix: str) -> None:
    from redis.asyncio import Redis

    gw = await make_gateway("rest")
    c = gw.client(extra=managed("redis", tmp_path, redis_prefix))
    reference = f"tx-{uuid.uuid4().hex[:6]}"
    assert (await c.create_otp(receiver(), reference, 60, "Code %s")).ok
    redis = Redis.from_url(REDIS_URL)
    try:
        key = redis_prefix + reference
        ttl = await redis.ttl(key)
        fields: Any = await redis.hgetall(key)
    finally:
        await redis.aclose()
    assert 3600 < ttl <= 3600 + 61  # lifetime + keep_expired
    assert set(fields) == {b"salt", b"digest", b"expires_at", b"attempts", b"state"}
    assert len(bytes.fromhex(fields[b"digest"].decode())) == 32  # a hash, never the code
