"""Redis consumer (pub/sub and stream modes) against the real server on localhost."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from otpd.aio import within
from otpd.transports.redis import RedisConsumer
from tests.support.brokers import BROKER_FAST, command, receiver, unique
from tests.support.gateway import Gateway
from tests.support.mail import otp_in
from tests.support.services import REDIS_URL
from tests.support.waiting import wait_until

pytestmark = pytest.mark.services


def config(topic: str, extra: str = "") -> str:
    return f"""
[redis]
url = "{REDIS_URL}"
topic = "{topic}"
{BROKER_FAST}{extra}
"""


async def start(gw: Gateway, topic: str, extra: str = "") -> RedisConsumer:
    return await gw.start_one(config(topic, extra), RedisConsumer)


async def php_request(redis: Redis, topic: str, body: bytes, callback: str,
                      timeout: float = 10.0) -> dict[str, Any]:
    """OTP-Publisher's OTPRedis: PUBLISH, then SUBSCRIBE to the callback channel."""
    await redis.publish(topic, body)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(callback)
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    result: dict[str, Any] = json.loads(message["data"])
                    return result
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def kill_otpd_connections(redis: Redis, topic: str) -> int:
    """CLIENT KILL by id: only this test's consumer (others share the server)."""
    clients = await redis.client_list()
    ids = [c["id"] for c in clients if c.get("name") == f"otpd:{topic}"]
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)
    return len(ids)


# -- pub/sub ----------------------------------------------------------------------


async def test_pubsub_send_and_verify_with_reply_after_callback_delay(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("redis")
    await start(gateway, topic)
    to = receiver()
    ref = unique("ref")
    await redis.publish(topic, command(
        "request-otp", {"receiver": to, "reference": ref, "message": "Kode OTP %s"}))
    code = otp_in(await gateway.mail(to))
    cb = unique("cb")
    reply = await php_request(redis, topic, command(
        "verify-otp", {"receiver": to, "reference": ref, "otp": code},
        callback_topic=cb, callback_delay="50"), cb)
    assert reply["command"] == "verify-otp"
    assert reply["response_code"] == "0000" and reply["data"]["reference"] == ref


async def test_pubsub_malformed_dropped_and_kill_reconnects(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("redis")
    consumer = await start(gateway, topic)
    cb = unique("cb")
    reply = await php_request(redis, topic, json.dumps(
        {"command": "request-otp", "data": {"receiver": "x@example.org"},
         "callback_topic": cb, "callback_delay": 50}).encode(), cb)
    assert reply["response_code"] == "1300" and "data.message" in reply["message"]
    await redis.publish(topic, b"{{{")
    await wait_until(lambda: consumer.status()["received"] == 2, 5, "both received")
    errors = consumer.status()["errors"]

    assert await kill_otpd_connections(redis, topic) >= 1
    await wait_until(lambda: consumer.status()["errors"] > errors, 10, "disconnect noticed")
    await wait_until(lambda: consumer.connected, 10, "reconnected")
    async with asyncio.timeout(10):
        while (await redis.pubsub_numsub(topic))[0][1] < 1:
            await asyncio.sleep(0.02)
    to = receiver()
    await redis.publish(topic, command(
        "send-email", {"receiver": to, "subject": "S", "message": "after kill"}))
    await gateway.mail(to)


# -- stream -------------------------------------------------------------------------

STREAM = """
mode = "stream"
group = "otpd"
consumer = "pi-1"
claim_idle = 0.3
"""


async def pending(redis: Redis, topic: str) -> int:
    info: Any = await redis.xpending(topic, "otpd")
    return int(info["pending"])


async def test_stream_entry_added_while_down_is_consumed_after_start(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("stream")
    redis.test_keys.append(topic)  # type: ignore[attr-defined]
    consumer = await start(gateway, topic, STREAM)
    await gateway.stop_consumer(consumer)
    to = receiver()
    await redis.xadd(topic, {"message": command(
        "send-message", {"id": 77, "receiver": to, "subject": "", "message": "offline"})})
    consumer = await start(gateway, topic, STREAM)
    await gateway.mail(to)
    await wait_until(lambda: consumer.status()["received"] == 1, 5)
    async with asyncio.timeout(5):
        while await pending(redis, topic):
            await asyncio.sleep(0.02)

    # A killed connection is reopened and the stream read again.
    assert await kill_otpd_connections(redis, topic) >= 1
    await wait_until(lambda: consumer.status()["errors"] >= 1, 10, "disconnect noticed")
    await wait_until(lambda: consumer.connected, 10, "reconnected")
    to2 = receiver()
    await redis.xadd(topic, {"message": command(
        "send-email", {"receiver": to2, "subject": "S", "message": "after kill"})})
    await gateway.mail(to2)


async def test_stream_reclaims_a_dead_consumers_pending_entries(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("stream")
    redis.test_keys.append(topic)  # type: ignore[attr-defined]
    await redis.xgroup_create(topic, "otpd", id="0", mkstream=True)
    to = receiver()
    await redis.xadd(topic, {"message": command(
        "send-email", {"id": "d1", "receiver": to, "subject": "S", "message": "orphan"})})
    # Another Pi read it and died before acknowledging.
    got: Any = await redis.xreadgroup("otpd", "dead-pi", {topic: ">"}, count=10)
    assert len(got[0][1]) == 1
    await start(gateway, topic, STREAM)
    await gateway.mail(to)
    async with asyncio.timeout(5):
        while await pending(redis, topic):
            await asyncio.sleep(0.02)


async def test_stream_store_failure_leaves_entry_pending_until_stored(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("stream")
    redis.test_keys.append(topic)  # type: ignore[attr-defined]
    gateway.fail_store(2)
    await start(gateway, topic, STREAM)
    to = receiver()
    await redis.xadd(topic, {"message": command(
        "send-email", {"id": "t1", "receiver": to, "subject": "S", "message": "retried"})})
    await wait_until(lambda: gateway.insert_calls >= 1, 5, "first attempt")
    assert await pending(redis, topic) == 1  # not acknowledged while not stored
    await gateway.mail(to)
    assert gateway.insert_calls == 3
    async with asyncio.timeout(5):
        while await pending(redis, topic):
            await asyncio.sleep(0.02)
    assert len(gateway.mails_to(to)) == 1


async def test_stream_reply_is_added_to_the_callback_stream(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("stream")
    cb = unique("cb")
    redis.test_keys.extend([topic, cb])  # type: ignore[attr-defined]
    await start(gateway, topic, STREAM)
    await redis.xadd(topic, {"message": command(
        "block-msisdn", {"receiver": "08126666666"}, callback_topic=cb)})
    await redis.xadd(topic, {"payload": b"not json"})  # one field, any name: still read
    async with asyncio.timeout(10):
        while not await redis.exists(cb):
            await asyncio.sleep(0.02)
    entries: Any = await redis.xrange(cb)
    reply = json.loads(entries[0][1][b"message"])
    assert reply["command"] == "block-msisdn" and reply["response_code"] == "0000"
    assert 0 < await redis.ttl(cb) <= 86400
    async with asyncio.timeout(5):
        while await pending(redis, topic):
            await asyncio.sleep(0.02)


async def test_acl_user_and_password(gateway: Gateway, redis: Redis) -> None:
    user, password = unique("acl"), "acl:pass word"
    await redis.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                            channels=["*"], commands=["+@all"])
    try:
        topic = unique("redis")
        bad = await gateway.start(config(topic, f'username = "{user}"\npassword = "nope"'))
        await wait_until(lambda: bad[0].status()["errors"] >= 1, 10, "auth failure seen")
        assert not bad[0].connected and "nope" not in bad[0].status()["last_error"]
        await gateway.stop_consumer(bad[0])

        consumer = await start(gateway, topic, f'username = "{user}"\npassword = "{password}"')
        clients = await redis.client_list()
        assert any(c.get("user") == user and c.get("name") == f"otpd:{topic}" for c in clients)
        to = receiver()
        await redis.publish(topic, command(
            "send-email", {"receiver": to, "subject": "S", "message": "acl"}))
        await gateway.mail(to)
        await gateway.stop_consumer(consumer)
    finally:
        await redis.acl_deluser(user)


async def test_stream_stop_acknowledges_what_is_in_flight(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("stream")
    redis.test_keys.append(topic)  # type: ignore[attr-defined]
    consumer = await start(gateway, topic, STREAM)
    entered = gateway.slow_store(0.5)
    to = receiver()
    await redis.xadd(topic, {"message": command(
        "send-email", {"id": "f1", "receiver": to, "subject": "S", "message": "in flight"})})
    await within(10, entered.wait())
    await gateway.stop_consumer(consumer)  # returns once the command is stored and XACKed
    assert await pending(redis, topic) == 0
    await gateway.mail(to)


async def test_stream_many_commands_in_flight_share_a_bounded_pool(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("stream")
    cbs = [unique("cb") for _ in range(150)]
    redis.test_keys.extend([topic, *cbs])  # type: ignore[attr-defined]
    # More commands in flight than redis-py's default pool has connections, each
    # with a reply to add: none fails for want of a connection.
    consumer = await start(gateway, topic, STREAM + "prefetch = 150\n")
    async with redis.pipeline(transaction=False) as pipe:
        for i, cb in enumerate(cbs):
            pipe.xadd(topic, {"message": command(
                "block-msisdn", {"receiver": f"+62812{i:08d}"}, callback_topic=cb)})
        await pipe.execute()

    async def replied() -> int:
        async with redis.pipeline(transaction=False) as pipe:
            for cb in cbs:
                pipe.exists(cb)
            return sum(await pipe.execute())

    # A reply is added after its command is acknowledged: wait for all of them too.
    async with asyncio.timeout(20):
        while (await pending(redis, topic) or consumer.status()["received"] < 150
               or await replied() < len(cbs)):
            await asyncio.sleep(0.05)
    for cb in cbs:
        entries: Any = await redis.xrange(cb)
        assert json.loads(entries[0][1][b"message"])["response_code"] == "0000"
    assert consumer.status()["errors"] == 0
