"""Every broker restarted in turn while commands flow over all of them at once.

One daemon consumes RabbitMQ (the shared server: ``rabbitmqctl stop_app`` /
``start_app``, always restored), a Redis stream (a ``redis-server`` of the
test's own with ``appendfsync always``, SIGKILLed), Mosquitto (one of the
test's own with persistence, SIGTERMed: it has no per-message fsync, so a
crash of the broker itself could lose its last second, a limit of Mosquitto,
not of otpd) and an ``otpd broker`` (WebSocket, stopped and started).

Each publisher sends ``send-email`` commands one at a time, each with its own
``id``, and publishes the same id again until the broker confirms it, as a
real publisher would: RabbitMQ publisher confirms (persistent, mandatory),
the ``XADD`` id, the MQTT PUBACK; the WebSocket broker confirms nothing, so
there a command counts once otpd's reply (0000, 1111, or 1201 for a repeat)
came back on its callback topic.

The user must see: each consumer reconnects by itself, the other brokers'
traffic goes on meanwhile, and every confirmed command is mailed exactly
once (redeliveries and repeats are suppressed by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from otpd.aio import within
from otpd.store import Duplicate, Inserted, NewMessage, NewOtp
from otpd.transports.consumer import Consumer
from otpd.wire.protocol import parse_request
from tests.faults.helpers import BrokerTopics, broker_tables, start_fault_broker
from tests.support.brokers import APP_USER, command
from tests.support.daemon import free_port, start_daemon, write_config
from tests.support.mail import SmtpServer, SmtpSink, tagged
from tests.support.mqtt_peer import forget_session
from tests.support.processes import Process
from tests.support.publishers import AmqpPublisher, MqttPublisher, RedisPublisher, ws_request
from tests.support.services import port_open, require_binary
from tests.support.waiting import wait_until

AFTER = 10  # confirmed publishes a broker must take after its restart


@dataclass
class Feed:
    """One publisher: one command in flight, repeated until confirmed."""

    name: str
    publish: Callable[[str, bytes], Awaitable[bool]]
    confirmed: list[str] = field(default_factory=list)
    failures: int = 0
    in_flight: str = ""

    async def run(self, done: asyncio.Event) -> None:
        i = 0
        while not done.is_set():
            tag = self.in_flight = f"{self.name}-{i}"
            body = command("send-email", {"id": tag, "receiver": f"{self.name}@example.org",
                                          "subject": "restart", "message": tagged(tag)})
            try:
                ok = await within(6, self.publish(tag, body))
            except Exception:
                ok = False
            if ok:
                self.confirmed.append(tag)
                i += 1
                await asyncio.sleep(0.03)
            else:
                self.failures += 1
                await asyncio.sleep(0.1)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


async def restart_rabbitmq() -> None:
    stopped = False
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        stopped = True
        await asyncio.sleep(0.5)
    finally:
        # The server is shared: bring it back whatever happened here.
        if stopped or not port_open("127.0.0.1", 5672):
            await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")


@pytest.mark.services
async def test_each_broker_restarted_during_traffic(
        tmp_path: Path, session: aiohttp.ClientSession, rabbit_url: str,
        own_redis: Process, own_mosquitto: Process) -> None:
    require_binary("rabbitmqctl")
    sink = SmtpSink()
    smtp = SmtpServer(sink, free_port())
    smtp.start()
    # A fixed port: the broker is restarted on it during the test.
    ws_broker = await start_fault_broker(tmp_path, free_port())
    redis_url = f"redis://127.0.0.1:{own_redis.port}/0"
    topics = BrokerTopics()
    queue, stream, topic, ws_topic = topics.queue, topics.stream, topics.topic, topics.ws_topic
    extra = broker_tables(topics, rabbit_url=rabbit_url, redis_url=redis_url,
                          mqtt_host="127.0.0.1", mqtt_port=own_mosquitto.port,
                          ws_port=ws_broker.port, ws_extra="ping_interval = 1\nping_timeout = 1\n")
    config = write_config(tmp_path, extra, smtp_port=smtp.port, wait=0)
    amqp = AmqpPublisher(rabbit_url, queue)
    redis_pub = RedisPublisher(redis_url, stream)
    mqtt_pub = MqttPublisher("127.0.0.1", own_mosquitto.port)

    async def via_ws(_tag: str, body: bytes) -> bool:
        import json

        envelope = json.loads(body)
        reply = await ws_request(ws_broker.port, APP_USER, APP_USER, ws_topic,
                                 envelope["command"], envelope["data"])
        return reply is not None and reply.get("response_code") in ("0000", "1111", "1201")

    feeds = {
        "amqp": Feed("amqp", lambda _t, b: amqp.confirmed(b)),
        "redis": Feed("redis", lambda _t, b: redis_pub.confirmed(b)),
        "mqtt": Feed("mqtt", lambda _t, b: mqtt_pub.confirmed(topic, b)),
        "ws": Feed("ws", via_ws),
    }

    async def restart_redis() -> None:
        await asyncio.to_thread(own_redis.stop, signal.SIGKILL)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_redis.start)

    async def restart_mosquitto() -> None:
        await asyncio.to_thread(own_mosquitto.stop, signal.SIGTERM)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_mosquitto.start)

    async def restart_ws() -> None:
        await ws_broker.stop()
        await asyncio.sleep(0.5)
        await ws_broker.start()

    restarts: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("redis", restart_redis), ("mqtt", restart_mosquitto), ("ws", restart_ws),
        ("amqp", restart_rabbitmq)]
    done = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    await amqp.declare()
    run = await start_daemon(config, session)
    try:
        consumers: dict[str, Consumer] = {c.name: c for c in run.daemon.consumers}
        assert set(consumers) == set(feeds)
        await wait_until(lambda: all(c.connected for c in consumers.values()), 20,
                       "every consumer connected")
        await wait_until(lambda: ws_broker.clients >= 1, 10, "otpd on the WS broker")
        tasks = [asyncio.create_task(f.run(done)) for f in feeds.values()]
        await wait_until(lambda: all(len(f.confirmed) >= 5 for f in feeds.values()), 20,
                       "traffic on every broker")

        async def across(name: str, restart: Callable[[], Awaitable[None]]) -> None:
            consumer, feed = consumers[name], feeds[name]
            errors_before = consumer.status()["errors"]
            others_before = {n: len(f.confirmed) for n, f in feeds.items() if n != name}
            before = len(feed.confirmed)
            await restart()
            # otpd noticed the outage and reconnected on its own...
            await wait_until(lambda: consumer.status()["errors"] > errors_before, 10,
                           f"{name} consumer to notice the restart")
            await wait_until(lambda: consumer.connected, 30, f"{name} consumer reconnected")
            # ...and the broker carries confirmed traffic again.
            await wait_until(lambda: len(feed.confirmed) >= before + AFTER, 30,
                           f"{name} traffic after its restart")
            # The other brokers' traffic went on meanwhile.
            for other, count in others_before.items():
                assert len(feeds[other].confirmed) > count, (name, other)

        for name, restart in restarts:
            await across(name, restart)
        done.set()
        await asyncio.gather(*tasks)

        confirmed = {tag for f in feeds.values() for tag in f.confirmed}
        await wait_until(lambda: confirmed <= set(sink.tags()), 30, "every confirmed command")
        async with asyncio.timeout(20):
            while await amqp.depth() or await redis_pub.leftovers("otpd"):
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a duplicate would show by now
        counts = Counter(sink.tags())
        in_flight = {f.in_flight for f in feeds.values()}
        assert set(counts) <= confirmed | in_flight, set(counts) - confirmed
        assert {t: n for t, n in counts.items() if n > 1} == {}, "mailed twice"
        print("\nbroker restarts: " + ", ".join(
            f"{n}: {len(f.confirmed)} confirmed, {f.failures} unconfirmed publishes retried"
            for n, f in feeds.items()))
        assert all(c.connected for c in consumers.values())
    finally:
        done.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await run.daemon.stop()
        await amqp.delete()
        await redis_pub.delete()
        await mqtt_pub.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(forget_session, "127.0.0.1", own_mosquitto.port,
                                    topics.client_id)
        await ws_broker.stop()
        smtp.stop()


async def test_command_cancelled_mid_store_is_still_delivered(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """What a broker connection closing in the middle of a command does, made
    deterministic: the consumer's task is cancelled while the store commits."""
    sink = SmtpSink()
    smtp = SmtpServer(sink, free_port())
    smtp.start()
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port, wait=0), session)
    try:
        service, store = run.daemon.service, run.daemon.store
        assert service is not None and store is not None
        real_insert = store.insert_message
        caller: asyncio.Task[object] | None = None

        async def slow_insert(msg: NewMessage, otp: NewOtp | None = None
                              ) -> Inserted | Duplicate:
            result = await real_insert(msg, otp)  # committed...
            await asyncio.sleep(0.3)  # ...but the caller hears of it only a moment later
            return result

        async def insert_as_the_channel_closes(msg: NewMessage, otp: NewOtp | None = None
                                               ) -> Inserted | Duplicate:
            assert caller is not None
            # The channel closes meanwhile: aio-pika cancels the delivery task.
            asyncio.get_running_loop().call_later(0.1, caller.cancel)
            return await slow_insert(msg, otp)

        store.insert_message = insert_as_the_channel_closes  # type: ignore[method-assign]
        body = command("send-email", {"id": "cut-1", "receiver": "cut@example.org",
                                      "subject": "cut", "message": tagged("cut-1")})
        caller = asyncio.create_task(service.execute(parse_request(body), wait=0.0,
                                                     transport="amqp"))
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        assert caller.cancelled()
        await asyncio.sleep(0.5)  # the store write has long been committed
        store.insert_message = real_insert  # type: ignore[method-assign]
        # The broker redelivers the unacknowledged message: a duplicate by id...
        response = await service.execute(parse_request(body), wait=0.0, transport="amqp")
        assert response.code.value in ("1111", "1201"), response
        # ...so the stored one must go out without waiting for a restart.
        await wait_until(lambda: "cut-1" in sink.tags(), 5, "the stored message mailed")
        assert sink.tags() == ["cut-1"]  # once
    finally:
        await run.daemon.stop()
        smtp.stop()
