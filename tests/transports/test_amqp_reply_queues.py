"""The reply queues otpd declares for AMQP callback topics, against the real
RabbitMQ on localhost: bounded in number, deleted after their TTL and on stop,
never a queue otpd did not create, and still what OTP-Publisher's PHP client
needs (it declares its reply queue a few ms after publishing, without
arguments, and polls for ~0.3 s)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from otpd.transports import amqp as amqp_module
from otpd.transports.amqp import AmqpConsumer
from tests.support.brokers import BROKER_FAST, command, unique
from tests.support.gateway import Gateway
from tests.support.services import RABBIT_URL
from tests.support.waiting import wait_until

pytestmark = pytest.mark.services

PHP_POLL = 0.3  # s the PHP client waits for its reply after declaring the queue


class Broker:
    """The test's own connection (publisher and observer); every queue it names
    is deleted after the test, once the test's consumers are stopped."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.names: list[str] = []

    def name(self, prefix: str) -> str:
        name = unique(prefix)
        self.names.append(name)
        return name

    async def depth(self, name: str) -> int | None:
        """Messages in queue ``name``, or None when it does not exist."""
        channel = await self.conn.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None  # the broker closed that channel
        await channel.close()
        return queue.declaration_result.message_count or 0

    async def publish(self, topic: str, body: bytes) -> None:
        """What OTP-Publisher does: default exchange, no properties (transient)."""
        channel = await self.conn.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=topic)
        await channel.close()


@pytest.fixture
async def broker(rabbit: str, gateway: Gateway) -> AsyncIterator[Broker]:
    b = Broker(await aio_pika.connect(rabbit))
    yield b
    for consumer in list(gateway.consumers):  # before their queues go
        await gateway.stop_consumer(consumer)
    channel = await b.conn.channel()
    for name in b.names:
        try:
            await channel.queue_delete(name)
        except Exception:
            channel = await b.conn.channel()
    await b.conn.close()


async def start(gateway: Gateway, broker: Broker) -> tuple[AmqpConsumer, str]:
    topic = broker.name("amqp")
    consumer = await gateway.start_one(f"""
[amqp]
url = "{RABBIT_URL}"
topic = "{topic}"
prefetch = 16
{BROKER_FAST}""", AmqpConsumer)
    return consumer, topic


async def declare_like_php(channel: AbstractChannel, name: str) -> AbstractQueue:
    """OTP-Publisher's reply queue declare: these flags, no arguments."""
    return await channel.declare_queue(name, durable=True, auto_delete=False, exclusive=False)


async def replied_then_gone(broker: Broker, name: str, timeout: float = 15.0) -> list[int]:
    """Wait until queue ``name`` has existed, then is gone; its depths as seen."""
    seen: list[int] = []

    async def gone() -> bool:
        depth = await broker.depth(name)
        if depth is not None:
            seen.append(depth)
        return bool(seen) and depth is None

    await wait_until(gone, timeout, f"queue {name} created, then deleted")
    return seen


def lower(monkeypatch: pytest.MonkeyPatch, *, most: int | None = None,
          ttl: float | None = None) -> None:
    """Lower the module's bound or TTL for consumers started after this (not
    raising: the test must fail on its assertions where they do not exist)."""
    if most is not None:
        monkeypatch.setattr(amqp_module, "REPLY_QUEUES_MAX", most, raising=False)
    if ttl is not None:
        monkeypatch.setattr(amqp_module, "REPLY_QUEUE_TTL", ttl, raising=False)


async def test_callback_topic_flood_creates_at_most_the_bound_of_reply_queues(
        gateway: Gateway, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    most, extra = 3, 4
    lower(monkeypatch, most=most)
    consumer, topic = await start(gateway, broker)
    callbacks = [broker.name("flood") for _ in range(most + extra)]
    receivers = [f"+62812{i:08d}" for i in range(len(callbacks))]
    for cb, to in zip(callbacks, receivers, strict=True):
        await broker.publish(topic, command("block-msisdn", {"receiver": to}, callback_topic=cb))
    store = gateway.run.daemon.store
    assert store is not None

    async def all_blocked() -> bool:
        return len(await store.blocked()) == len(receivers)

    await wait_until(all_blocked, 10, "every command run")  # replied to or not

    async def existing() -> list[str]:
        return [cb for cb in callbacks if await broker.depth(cb) is not None]

    async def settled() -> bool:
        # Every reply was either written to a queue or refused (counted as an error).
        return len(await existing()) + int(consumer.status()["errors"]) >= len(callbacks)

    await wait_until(settled, 10, "every reply sent or refused")
    created = await existing()
    assert len(created) == most, created
    for cb in created:
        assert await broker.depth(cb) == 1  # the reply is there, once
    assert consumer.connected

    # The replies carry a message TTL: unread, they would not outlive the queue.
    channel = await broker.conn.channel()
    queue = await channel.declare_queue(created[0], passive=True)
    message = await queue.get(no_ack=True)
    assert json.loads(message.body)["response_code"] == "0000"
    assert message.expiration == amqp_module.REPLY_QUEUE_TTL


async def test_otpd_reply_queue_is_deleted_after_its_ttl(
        gateway: Gateway, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    ttl = 1.0
    lower(monkeypatch, ttl=ttl)
    _, topic = await start(gateway, broker)
    cb = broker.name("cb")
    loop = asyncio.get_running_loop()
    sent = loop.time()
    await broker.publish(topic, command("echo", {"n": 1}, callback_topic=cb))
    seen = await replied_then_gone(broker, cb)
    assert max(seen) == 1  # the reply was delivered before the queue went
    assert loop.time() - sent >= ttl  # not before its TTL


async def test_a_queue_otpd_did_not_create_is_never_deleted(
        gateway: Gateway, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    lower(monkeypatch, ttl=1.0)
    consumer, topic = await start(gateway, broker)
    # Another application's queue, with the very flags otpd would use.
    theirs = broker.name("theirs")
    channel = await broker.conn.channel()
    await declare_like_php(channel, theirs)
    ours = broker.name("ours")
    await broker.publish(topic, command("echo", {"n": 1}, callback_topic=theirs))
    await broker.publish(topic, command("echo", {"n": 2}, callback_topic=ours))
    # otpd's own queue going proves the TTL passed and the sweeper ran.
    assert max(await replied_then_gone(broker, ours)) == 1
    assert consumer.status()["received"] == 2
    assert await broker.depth(theirs) is not None
    # Stopping deletes what otpd still owns, never theirs.
    await gateway.stop_consumer(consumer)
    assert await broker.depth(theirs) is not None


async def test_reply_queue_with_a_reader_attached_is_kept_until_it_leaves(
        gateway: Gateway, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    lower(monkeypatch, ttl=1.0)
    consumer, topic = await start(gateway, broker)
    cb = broker.name("read")
    await broker.publish(topic, command("echo", {"n": 1}, callback_topic=cb))
    await wait_until(lambda: broker.depth(cb), 10, "a reply in otpd's own queue")
    first_due = consumer._owned.due[cb]
    # A reader that consumes and never acknowledges, as the PHP client does.
    channel = await broker.conn.channel()
    queue = await channel.declare_queue(cb, passive=True)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    await queue.consume(ignore, no_ack=False)
    # The sweeper tried once the TTL passed, found the queue in use, put it off.
    await wait_until(lambda: consumer._owned.due.get(cb, 0) > first_due, 10,
                     "deletion put off")
    assert await broker.depth(cb) is not None
    await channel.close()
    await replied_then_gone(broker, cb)


async def test_stop_deletes_otpd_reply_queues_and_keeps_others(
        gateway: Gateway, broker: Broker) -> None:
    consumer, topic = await start(gateway, broker)
    theirs = broker.name("theirs")
    channel = await broker.conn.channel()
    await channel.declare_queue(theirs, durable=False)  # as OTP-Pi would declare it
    ours = broker.name("ours")
    await broker.publish(topic, command("echo", {"n": 1}, callback_topic=theirs))
    await broker.publish(topic, command("echo", {"n": 2}, callback_topic=ours))
    await wait_until(lambda: broker.depth(ours), 10, "a reply in otpd's own queue")
    await wait_until(lambda: broker.depth(theirs), 10, "a reply in the other queue")
    await gateway.stop_consumer(consumer)
    assert await broker.depth(ours) is None
    assert await broker.depth(theirs) == 1  # its reply still there for its reader


@pytest.mark.parametrize("delay", [None, "50"], ids=["otpd-first", "client-first"])
async def test_php_client_declares_its_reply_queue_after_publishing_and_gets_the_answer(
        gateway: Gateway, broker: Broker, delay: str | None) -> None:
    _, topic = await start(gateway, broker)
    cb = broker.name("php")
    extra = {} if delay is None else {"callback_delay": delay}
    await broker.publish(topic, command("echo", {"n": 7}, callback_topic=cb, **extra))
    await asyncio.sleep(0.005)  # the client's own pause, not a synchronisation
    # Its declare: same flags, no arguments. Anything otpd declared differently
    # (x-expires, x-message-ttl) makes this fail with PRECONDITION_FAILED.
    channel = await broker.conn.channel()
    queue = await declare_like_php(channel, cb)
    got: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = (
        asyncio.get_running_loop().create_future())

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if not got.done():
            got.set_result(message)  # never acknowledged, as the PHP client does

    await queue.consume(on_message, no_ack=False)
    async with asyncio.timeout(PHP_POLL):
        message = await got
    await channel.close()
    reply = json.loads(message.body)
    assert reply["command"] == "echo" and reply["response_code"] == "0000"
    assert reply["data"]["n"] == 7
