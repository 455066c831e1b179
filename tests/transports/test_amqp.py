"""RabbitMQ consumer against the real broker on localhost."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from otpd.aio import within
from otpd.transports.amqp import AmqpConsumer
from tests.support.brokers import BROKER_FAST, command, receiver, unique
from tests.support.gateway import Gateway
from tests.support.mail import otp_in
from tests.support.services import RABBIT_URL
from tests.support.waiting import wait_until

pytestmark = pytest.mark.services


@pytest.fixture
async def amqp(rabbit: str, gateway: Gateway) -> AsyncIterator[AbstractConnection]:
    """The test's own connection (the publisher side); queues are deleted after."""
    conn = await aio_pika.connect(rabbit)
    created: list[str] = []
    conn.created = created  # type: ignore[attr-defined]
    yield conn
    for consumer in list(gateway.consumers):  # before their queues go
        await gateway.stop_consumer(consumer)
    channel = await conn.channel()
    for name in created:
        try:
            await channel.queue_delete(name)
        except Exception:
            channel = await conn.channel()
    await conn.close()


def config(topic: str, extra: str = "") -> str:
    return f"""
[amqp]
url = "{RABBIT_URL}"
topic = "{topic}"
{BROKER_FAST}{extra}
"""


async def start(gw: Gateway, conn: AbstractConnection, topic: str,
                extra: str = "") -> AmqpConsumer:
    conn.created.append(topic)  # type: ignore[attr-defined]
    return await gw.start_one(config(topic, extra), AmqpConsumer)


async def publish_like_php(conn: AbstractConnection, topic: str, body: bytes) -> None:
    """What OTP-Publisher's OTPAMQP does: passive declare, default exchange, transient."""
    channel = await conn.channel()
    await channel.declare_queue(topic, passive=True)
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=topic)
    await channel.close()


async def php_reply(conn: AbstractConnection, reply_topic: str,
                    timeout: float = 10.0) -> dict[str, Any]:
    """The PHP client's reply read: declare durable, non-auto-delete, non-exclusive."""
    conn.created.append(reply_topic)  # type: ignore[attr-defined]
    channel = await conn.channel()
    queue = await channel.declare_queue(reply_topic, durable=True, auto_delete=False,
                                        exclusive=False)
    async with asyncio.timeout(timeout):
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                await channel.close()
                result: dict[str, Any] = json.loads(message.body)
                return result
            await asyncio.sleep(0.02)


async def queue_depth(conn: AbstractConnection, topic: str) -> int:
    channel = await conn.channel()
    queue = await channel.declare_queue(topic, passive=True)
    count = queue.declaration_result.message_count or 0
    await channel.close()
    return count


async def test_php_publisher_send_email_is_sent_and_acked(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic)
    # Declared durable at startup, so the PHP client's passive declare works.
    channel = await amqp.channel()
    await channel.declare_queue(topic, durable=True, passive=True)
    to = receiver()
    await publish_like_php(amqp, topic, command(
        "send-email", {"id": 9001, "receiver": to, "subject": "Hi", "message": "hello amqp"}))
    mail = await gateway.mail(to)
    assert mail["Subject"] == "Hi"
    await wait_until(lambda: consumer.status()["received"] == 1, 5, "received count")
    assert await queue_depth(amqp, topic) == 0
    status = consumer.status()
    assert status["name"] == "amqp" and status["connected"] and status["since"]


async def test_request_and_verify_otp_reply_on_callback_topic_and_reply_to(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    await start(gateway, amqp, topic)
    to = receiver()
    ref = unique("ref")
    params = {"param1": "100000", "param2": 1234567890}
    await publish_like_php(amqp, topic, command(
        "request-otp", {"receiver": to, "reference": ref, "message": "Code %s", **params}))
    code = otp_in(await gateway.mail(to))

    # A wrong code first, answered on the callback topic the PHP way.
    cb = unique("cb")
    await publish_like_php(amqp, topic, command(
        "verify-otp", {"receiver": to, "reference": ref, "otp": "000000", **params},
        callback_topic=cb, callback_delay="50"))
    reply = await php_reply(amqp, cb)
    assert reply["command"] == "verify-otp" and reply["response_code"] == "1202"

    # The right code, answered through AMQP reply_to + correlation_id; as a JSON
    # number the way PHP may send it, unless a leading zero makes that impossible
    # (one code in ten: a number cannot carry it).
    otp: int | str = int(code) if not code.startswith("0") else code
    channel = await amqp.channel()
    reply_queue = await channel.declare_queue("", exclusive=True)
    await channel.default_exchange.publish(
        aio_pika.Message(command("verify-otp", {"receiver": to, "reference": ref,
                                                "otp": otp, **params}),
                         reply_to=reply_queue.name, correlation_id="corr-42"),
        routing_key=topic)
    async with asyncio.timeout(10):
        async with reply_queue.iterator() as it:
            async for message in it:
                await message.ack()
                break
    assert message.correlation_id == "corr-42"
    body = json.loads(message.body)
    assert body["response_code"] == "0000" and body["data"]["reference"] == ref


async def test_malformed_messages_are_dropped_and_queue_keeps_flowing(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic, "max_message = 2048")
    cb = unique("cb")
    for bad in (b"not json", b"[1,2]", b"\xff\xfe",
                json.dumps({"command": "set-gpio-value", "data": {},
                            "callback_topic": cb}).encode(),
                b'{"command":"send-email","data":{"receiver":"' + b"x" * 4000 + b'"}}'):
        await publish_like_php(amqp, topic, bad)
    reply = await php_reply(amqp, cb)
    assert reply["response_code"] == "1301"
    to = receiver()
    await publish_like_php(amqp, topic, command(
        "send-message", {"id": "m1", "receiver": to, "subject": "", "message": "after"}))
    await gateway.mail(to)
    assert await queue_depth(amqp, topic) == 0
    assert consumer.status()["errors"] >= 5
    assert consumer.connected


async def test_not_acked_until_stored_then_redelivered_once_store_recovers(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    await start(gateway, amqp, topic)
    gateway.fail_store(3)
    to = receiver()
    await publish_like_php(amqp, topic, command(
        "send-email", {"id": "s1", "receiver": to, "subject": "S", "message": "stored late"}))
    await gateway.mail(to)
    assert gateway.insert_calls == 4  # three failures, each redelivered, then stored
    await asyncio.sleep(0.3)
    assert len(gateway.mails_to(to)) == 1
    assert await queue_depth(amqp, topic) == 0


def _close_connection_named(name: str) -> None:
    """Close otpd's connection from the server side (only ours: others share the broker)."""
    out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "pid",
                          "client_properties"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    pids = [line.split("\t", 1)[0] for line in out.splitlines()
            if f'{{"connection_name","{name}"}}' in line]
    assert pids, "otpd's connection not found"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: forced close"],
                       capture_output=True, timeout=30, check=True)


async def test_reconnects_after_the_broker_closes_the_connection(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic)
    await asyncio.to_thread(_close_connection_named, f"otpd {topic}")
    await wait_until(lambda: not consumer.connected or consumer.status()["errors"], 10,
                     "disconnect noticed")
    await wait_until(lambda: consumer.connected, 10, "reconnected")
    to = receiver()
    await publish_like_php(amqp, topic, command(
        "send-email", {"receiver": to, "subject": "S", "message": "after reconnect"}))
    await gateway.mail(to)
    assert consumer.status()["errors"] >= 1


async def test_queue_deleted_under_the_consumer_is_declared_again(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic)
    channel = await amqp.channel()
    await channel.queue_delete(topic)
    await wait_until(lambda: consumer.status()["errors"] >= 1, 10, "cancel noticed")
    await wait_until(lambda: consumer.connected, 10, "consuming again")
    to = receiver()
    await publish_like_php(amqp, topic, command(
        "send-email", {"receiver": to, "subject": "S", "message": "queue is back"}))
    await gateway.mail(to)


async def test_stop_lets_an_in_flight_command_finish(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic)
    entered = gateway.slow_store(0.5)
    to = receiver()
    await publish_like_php(amqp, topic, command(
        "send-email", {"receiver": to, "subject": "S", "message": "in flight"}))
    await within(10, entered.wait())
    await gateway.stop_consumer(consumer)  # returns once the command is stored and acked
    assert not consumer.connected
    assert await queue_depth(amqp, topic) == 0
    await gateway.mail(to)


async def test_unexpected_error_drops_the_message_instead_of_looping(
        gateway: Gateway, amqp: AbstractConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic)
    service = gateway.run.daemon.service
    assert service is not None

    async def broken(*args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(service, "_verify", broken)
    cb = unique("cb")
    await publish_like_php(amqp, topic, command(
        "verify-otp", {"receiver": "a@example.org", "reference": "r", "otp": "1"},
        callback_topic=cb))
    reply = await php_reply(amqp, cb)
    assert reply["response_code"] == "1102"
    assert await queue_depth(amqp, topic) == 0
    assert consumer.connected and consumer.status()["last_error"] == "RuntimeError: bug"


async def test_acknowledgements_coalesced_in_and_out_of_order(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic, "prefetch = 50")
    store = gateway.run.daemon.store
    assert store is not None
    real = store.block
    slow = "+6281299999999"

    async def block(receiver: str, now: float) -> None:
        if receiver == slow:
            await asyncio.sleep(0.5)  # the oldest command finishes last
        await real(receiver, now)

    store.block = block  # type: ignore[method-assign]
    channel = await amqp.channel()
    await channel.default_exchange.publish(aio_pika.Message(command(
        "block-msisdn", {"receiver": slow})), routing_key=topic)
    for i in range(150):
        await channel.default_exchange.publish(aio_pika.Message(command(
            "block-msisdn", {"receiver": f"+62812{i:08d}"})), routing_key=topic)
    await wait_until(lambda: consumer.status()["received"] == 151, 10, "all received")
    await wait_until(lambda: not consumer._inflight, 10, "all handled")
    # Stopping hands back whatever was not acknowledged: nothing may be left, and
    # a tag acknowledged twice would have closed the channel (an error).
    await gateway.stop_consumer(consumer)
    assert await queue_depth(amqp, topic) == 0
    status = consumer.status()
    assert status["errors"] == 0, status["last_error"]
    assert len(await store.blocked()) == 151


async def test_handed_back_message_among_coalesced_acks_is_stored_once(
        gateway: Gateway, amqp: AbstractConnection) -> None:
    topic = unique("amqp")
    consumer = await start(gateway, amqp, topic, "prefetch = 40")
    gateway.fail_store(1)  # the first command is nacked while the others are acked
    to = receiver()
    channel = await amqp.channel()
    for i in range(30):
        await channel.default_exchange.publish(aio_pika.Message(command(
            "send-email", {"id": i, "receiver": to, "subject": f"n{i}", "message": "m"})),
            routing_key=topic)
    await wait_until(lambda: len(gateway.mails_to(to)) == 30, 15, "30 mails")
    await asyncio.sleep(0.3)
    assert sorted(str(m["Subject"]) for m in gateway.mails_to(to)) == sorted(
        f"n{i}" for i in range(30))
    assert gateway.insert_calls == 31  # one failure, redelivered, stored
    await gateway.stop_consumer(consumer)
    assert await queue_depth(amqp, topic) == 0
    assert consumer.status()["errors"] == 0, consumer.status()["last_error"]
