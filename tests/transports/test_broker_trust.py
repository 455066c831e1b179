"""Broker-side attacks by an account that may publish on the command topic,
against the real Redis and Mosquitto: callback topics aimed at otpd's own
keys, replays of signed commands, floods that try to hold the prefetch slots,
and retained MQTT commands."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from otpd.transports.mqtt import MqttConsumer
from otpd.transports.redis import RedisConsumer
from otpd.wire.signing import sign
from tests.support.brokers import BROKER_FAST, command, receiver, unique
from tests.support.gateway import Gateway
from tests.support.mqtt_peer import Peer, forget_session
from tests.support.services import MQTT_HOST, MQTT_PORT, REDIS_URL
from tests.support.waiting import wait_until
from tests.transports.test_redis import php_request

pytestmark = pytest.mark.services

KEY = "a-signing-key-of-at-least-32-bytes-0123"
SIGNED = f'require_signature = true\nsigning_key = "{KEY}"\n'


async def start_redis(gw: Gateway, topic: str, extra: str = "") -> RedisConsumer:
    return await gw.start_one(f"""
[redis]
url = "{REDIS_URL}"
topic = "{topic}"
{BROKER_FAST}{extra}
""", RedisConsumer)


def signed(name: str, data: dict[str, Any], **top: Any) -> bytes:
    envelope = {"command": name, "data": {"date_time": int(time.time()), **data}, **top}
    return json.dumps(sign(envelope, KEY)).encode()


# -- callback topics are data -----------------------------------------------------------


async def test_stream_replies_never_touch_otpds_keys_or_anybody_elses(
        gateway: Gateway, redis: Redis) -> None:
    topic, tag = unique("stream"), unique("k")
    blocklist, otp_key = f"otpd:blocklist:{tag}", f"otpd:otp:{tag}"
    foreign_stream, foreign_string, own = f"app-stream-{tag}", f"app-key-{tag}", unique("cb")
    redis.test_keys.extend(  # type: ignore[attr-defined]
        [topic, blocklist, otp_key, foreign_stream, foreign_string, own])
    await redis.sadd(blocklist, "6281234567890")
    await redis.xadd(foreign_stream, {"event": "order-1"})
    await redis.set(foreign_string, "v")
    consumer = await start_redis(gateway, topic, 'mode = "stream"\n')

    for target in (blocklist, otp_key, foreign_stream, foreign_string):
        await redis.xadd(topic, {"message": command("echo", {"n": 1}, callback_topic=target)})
    # A message that does not even parse still names a callback topic: no reply there either.
    await redis.xadd(topic, {"message": b'{"callback_topic": "%s", "command": 5}'
                             % blocklist.encode()})
    for n in (1, 2):  # the requester's own reply stream is created, then appended to
        await redis.xadd(topic, {"message": command("echo", {"n": n}, callback_topic=own)})
    await wait_until(lambda: consumer.status()["received"] == 7, 10, "all seven handled")
    async with asyncio.timeout(10):
        while await redis.xlen(own) < 2:
            await asyncio.sleep(0.02)

    assert await redis.type(blocklist) == b"set" and await redis.ttl(blocklist) == -1
    assert await redis.smembers(blocklist) == {b"6281234567890"}
    assert not await redis.exists(otp_key)
    assert await redis.xlen(foreign_stream) == 1 and await redis.ttl(foreign_stream) == -1
    assert await redis.get(foreign_string) == b"v" and await redis.ttl(foreign_string) == -1
    replies: Any = await redis.xrange(own)
    assert sorted(json.loads(fields[b"message"])["data"]["n"] for _id, fields in replies) == [1, 2]
    assert 0 < await redis.ttl(own) <= 86400


# -- replays ------------------------------------------------------------------------------


async def test_a_replayed_signed_command_is_refused(gateway: Gateway, redis: Redis) -> None:
    topic = unique("signed")
    consumer = await start_redis(gateway, topic, SIGNED)
    store = gateway.run.daemon.store
    assert store is not None
    victim = receiver()

    async def publish(body: bytes, expect_received: int) -> None:
        await redis.publish(topic, body)
        await wait_until(lambda: consumer.status()["received"] == expect_received, 10,
                         f"message {expect_received} handled")

    captured_unblock = signed("unblock-msisdn", {"receiver": victim})
    await publish(signed("block-msisdn", {"receiver": victim}), 1)
    await wait_until(store.blocked, 10, "blocked")
    await publish(captured_unblock, 2)
    assert await store.blocked() == []
    await publish(signed("block-msisdn", {"receiver": victim}), 3)
    assert len(await store.blocked()) == 1
    errors = consumer.status()["errors"]

    await publish(captured_unblock, 4)  # another account replays the captured unblock
    assert consumer.status()["errors"] == errors + 1
    assert len(await store.blocked()) == 1, "the replay undid the block"

    # A signed send without an id, replayed: one mail, not two.
    to = receiver()
    send = signed("send-email", {"receiver": to, "subject": "S", "message": "once"})
    await publish(send, 5)
    await publish(send, 6)
    assert consumer.status()["errors"] == errors + 2  # the second refused as a replay
    await gateway.mail(to)
    assert len(gateway.mails_to(to)) == 1


# -- refusals cost nothing ----------------------------------------------------------------


async def test_a_flood_of_refused_messages_does_not_delay_a_signed_command(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("flood")
    consumer = await start_redis(gateway, topic, SIGNED)
    listener = redis.pubsub(ignore_subscribe_messages=True)
    floods = [unique("cb") for _ in range(200)]
    await listener.subscribe(*floods)
    for cb in floods:
        await redis.publish(topic, command("echo", {}, callback_topic=cb,
                                           callback_delay=10_000))
    good = unique("cb")
    started = time.monotonic()
    reply = await php_request(redis, topic, signed("echo", {"x": 1}, callback_topic=good),
                              good, timeout=5.0)
    elapsed = time.monotonic() - started
    assert reply["response_code"] == "0000" and reply["data"]["x"] == 1
    await wait_until(lambda: consumer.status()["received"] == 201, 5, "all handled")
    # Refused for their missing signature: no answer, now or after their delay.
    assert await listener.get_message(timeout=0.5) is None
    await listener.aclose()  # type: ignore[no-untyped-call]
    print(f"signed command answered {elapsed:.2f} s after 200 refused ones")


async def test_replies_waiting_out_a_long_callback_delay_hold_no_slot(
        gateway: Gateway, redis: Redis) -> None:
    topic = unique("delay")
    await start_redis(gateway, topic, "prefetch = 8\n")
    listener = redis.pubsub(ignore_subscribe_messages=True)
    slow = [unique("cb") for _ in range(50)]
    await listener.subscribe(*slow)
    for cb in slow:
        await redis.publish(topic, command("echo", {}, callback_topic=cb,
                                           callback_delay=10_000))
    quick = unique("cb")
    reply = await php_request(redis, topic, command("echo", {"q": 1}, callback_topic=quick),
                              quick, timeout=5.0)
    assert reply["data"]["q"] == 1
    # Answered while all 50 slow replies (8 times the prefetch) still wait out their delay.
    assert await listener.get_message(timeout=0.1) is None
    await listener.aclose()  # type: ignore[no-untyped-call]


# -- retained MQTT messages ------------------------------------------------------------------


@pytest.fixture
def mqtt_peer(mosquitto: tuple[str, int]) -> Iterator[Peer]:
    peer = Peer(*mosquitto).open()
    yield peer
    peer.close()


async def test_a_retained_mqtt_command_is_never_run(
        gateway: Gateway, mqtt_peer: Peer, mosquitto: tuple[str, int]) -> None:
    topic, client_id = unique("mqtt"), unique("otpd")
    retained_to, live_to = receiver(), receiver()
    info = mqtt_peer.client.publish(topic, command(
        "send-email", {"receiver": retained_to, "subject": "S", "message": "retained"}),
        qos=1, retain=True)
    await asyncio.to_thread(info.wait_for_publish, 5)
    try:
        consumer = await gateway.start_one(f"""
[mqtt]
host = "{MQTT_HOST}"
port = {MQTT_PORT}
topic = "{topic}"
client_id = "{client_id}"
{BROKER_FAST}""", MqttConsumer)
        await wait_until(lambda: consumer.status()["received"] >= 1, 10, "retained one seen")
        assert consumer.status()["errors"] == 1  # dropped
        assert await asyncio.to_thread(mqtt_peer.publish, topic, command(
            "send-email", {"receiver": live_to, "subject": "S", "message": "live"}), 1)
        await gateway.mail(live_to)
        assert gateway.mails_to(retained_to) == []
    finally:
        info = mqtt_peer.client.publish(topic, b"", qos=1, retain=True)  # clears it
        await asyncio.to_thread(info.wait_for_publish, 5)
        for started in list(gateway.consumers):
            await gateway.stop_consumer(started)
        await asyncio.to_thread(forget_session, *mosquitto, client_id)
