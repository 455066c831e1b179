"""Several brokers at once: duplicates across brokers, signatures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from redis.asyncio import Redis

from otpd.wire.signing import sign
from tests.support.brokers import command, receiver, unique
from tests.support.gateway import Gateway
from tests.support.waiting import wait_until
from tests.transports.test_amqp import php_reply, publish_like_php
from tests.transports.test_redis import php_request

pytestmark = pytest.mark.services

KEY = "k3y-shared-with-the-app-0123456789"


@pytest.fixture
async def both(rabbit: str, redis_url: str,
               gateway: Gateway) -> AsyncIterator[tuple[AbstractConnection, Redis]]:
    conn = await aio_pika.connect(rabbit)
    conn.created = []  # type: ignore[attr-defined]
    redis = Redis.from_url(redis_url)
    yield conn, redis
    for consumer in list(gateway.consumers):
        await gateway.stop_consumer(consumer)
    channel = await conn.channel()
    for name in conn.created:  # type: ignore[attr-defined]
        await channel.queue_delete(name)
    await conn.close()
    await redis.aclose()


async def test_same_id_on_two_brokers_is_sent_once(
        gateway: Gateway, both: tuple[AbstractConnection, Redis]) -> None:
    conn, redis = both
    topic = unique("dup")
    conn.created.append(topic)  # type: ignore[attr-defined]
    consumers = await gateway.start(f"""
[amqp]
topic = "{topic}"
[redis]
topic = "{topic}"
""")
    await wait_until(lambda: all(c.connected for c in consumers), 10, "both connected")
    to = receiver()
    data = {"id": 4242, "receiver": to, "subject": "Once", "message": "only once"}
    amqp_cb, redis_cb = unique("cb"), unique("cb")
    await publish_like_php(conn, topic, command("send-email", data, callback_topic=amqp_cb))
    via_redis, via_amqp = await asyncio.gather(
        php_request(redis, topic, command("send-email", data, callback_topic=redis_cb,
                                          callback_delay=50), redis_cb),
        php_reply(conn, amqp_cb),
    )
    codes = sorted([via_amqp["response_code"], via_redis["response_code"]])
    assert codes == ["0000", "1201"]
    await gateway.mail(to)
    await asyncio.sleep(0.3)
    assert len(gateway.mails_to(to)) == 1


async def test_signature_required_drops_unsigned_and_accepts_signed(
        gateway: Gateway, both: tuple[AbstractConnection, Redis]) -> None:
    _conn, redis = both
    topic = unique("signed")
    (consumer,) = await gateway.start(f"""
[redis]
topic = "{topic}"
require_signature = true
signing_key = "{KEY}"
""")
    await wait_until(lambda: consumer.connected, 10, "connected")
    to = receiver()
    envelope = {"command": "send-email", "callback_delay": 50,
                "data": {"id": "x1", "receiver": to, "subject": "S", "message": "signed"}}

    refused = [
        ("unsigned", dict(envelope)),
        ("wrong key", sign(envelope, "not-the-key")),
        ("stale", sign(envelope, KEY, now=time.time() - 3600)),
        ("tampered", {**sign(envelope, KEY), "data": {**envelope["data"],  # type: ignore[dict-item]
                                                      "receiver": "evil@example.org"}}),
    ]
    # A refused message gets no answer at all: the listener hears nothing on
    # any of their callback topics.
    listener = redis.pubsub(ignore_subscribe_messages=True)
    callbacks = [unique("cb") for _ in refused]
    await listener.subscribe(*callbacks)
    for (_label, body), cb in zip(refused, callbacks, strict=True):
        await redis.publish(topic, json.dumps({**body, "callback_topic": cb}).encode())
    await wait_until(lambda: consumer.status()["errors"] == 4, 10, "four refusals")

    cb = unique("cb")
    signed = sign({**envelope, "callback_topic": cb}, KEY)
    reply = await php_request(redis, topic, json.dumps(signed).encode(), cb)
    assert reply["response_code"] == "0000"
    # Refusals were answered (if at all) before this reply was even requested.
    assert await listener.get_message(timeout=0.5) is None
    await listener.aclose()  # type: ignore[no-untyped-call]
    await gateway.mail(to)
    assert not gateway.mails_to("evil@example.org")
