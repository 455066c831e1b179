"""A broker restarts while commands flow: no message the broker accepted is lost.

For each reliable broker mode a publisher sends ``send-email`` commands, each
with its own ``id``, one at a time, and counts one as *accepted* only when the
broker confirmed it: RabbitMQ publisher confirms for a persistent message on a
durable queue, the entry id returned by Redis ``XADD`` (the server runs with
``appendfsync always``, so a returned id is on disk), the PUBACK of an MQTT QoS 1
publish. What was not confirmed is published again with the same id, as a real
publisher would. Meanwhile the broker is restarted (RabbitMQ: ``rabbitmqctl
stop_app`` / ``start_app`` on the shared broker; Redis: SIGKILL of a private
``redis-server``; Mosquitto: SIGTERM of a private ``mosquitto``, which writes
its persistence file on exit: it has no per-message fsync, so a crash would
lose what arrived since its last autosave, a limit of the broker, not of
otpd). Then every accepted command must have been mailed exactly once: no
loss, and the redeliveries a restart causes (stored but not yet acknowledged,
published twice after a lost confirm) are suppressed by the service by id.

Redis pub/sub and the WebSocket broker are not part of this: they are lossy by
design. They relay a message only to the subscribers connected at that
instant, keep nothing and take no acknowledgement, so whatever is published
while otpd or the broker is down is gone and no publisher can learn that.
Their reconnection is tested in ``test_redis.py`` and ``test_ws.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import paho.mqtt.client as mqtt
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, DeliveryMode
from paho.mqtt.enums import CallbackAPIVersion
from redis.asyncio import Redis

from otpd.aio import within
from tests.conftest import RABBIT_URL, SmtpServer, free_port, wait_until
from tests.transports.conftest import command, receiver, require_tcp
from tests.transports.links import AmqpLink, Link, MqttLink, Node, RedisStreamLink, start_node
from tests.transports.servers import Process, own_mosquitto, own_server

pytestmark = pytest.mark.services

RCPT = receiver()
PUBLISH_INTERVAL = 0.01  # s between two confirmed publishes
MIN_BEFORE, MIN_AFTER = 40, 40  # confirmed publishes before the outage and after it


Starter = Callable[[Link], Awaitable[Node]]


def body(i: int) -> bytes:
    return command("send-email", {"id": f"c{i}", "receiver": RCPT, "subject": f"m{i}",
                                  "message": "sent across a broker restart"})


@dataclass
class Traffic:
    """One publisher, one message in flight, retried until the broker confirms it."""

    publish: Callable[[bytes], Awaitable[bool]]
    reset: Callable[[], Awaitable[None]]
    confirmed: list[int] = field(default_factory=list)
    failures: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        i = 0
        while not self.done.is_set():
            try:
                ok = await within(5, self.publish(body(i)))
            except Exception:
                ok = False
            if ok:
                self.confirmed.append(i)
                i += 1
                await asyncio.sleep(PUBLISH_INTERVAL)
                continue
            # Not confirmed: may or may not have reached the broker; send it again.
            self.failures += 1
            with contextlib.suppress(Exception):
                await self.reset()
            await asyncio.sleep(0.05)

    async def until(self, count: int, timeout: float = 30.0) -> None:
        await wait_until(lambda: len(self.confirmed) >= count, timeout,
                         f"{count} confirmed publishes")


async def across_restart(node: Node, traffic: Traffic,
                         restart: Callable[[], Awaitable[None]]) -> None:
    """Publish, restart the broker mid-stream, publish on; then check the mail."""
    task = asyncio.create_task(traffic.run())
    try:
        await traffic.until(MIN_BEFORE)
        before = len(traffic.confirmed)
        await restart()
        await traffic.until(before + MIN_AFTER)
    finally:
        traffic.done.set()
        await task
    accepted = {f"m{i}" for i in traffic.confirmed}
    # The outage happened in the middle of the traffic, and otpd saw it.
    assert traffic.failures >= 1
    assert node.consumer.status()["errors"] >= 1

    def subjects() -> Counter[str]:
        return Counter(str(m["Subject"]) for m in node.mails_to(RCPT))

    with contextlib.suppress(AssertionError):
        await wait_until(lambda: accepted <= set(subjects()), 30, "every accepted command mailed")
    await asyncio.sleep(0.5)  # a late duplicate would show up by now
    counts = subjects()
    missing = sorted(accepted - set(counts), key=lambda subject: int(subject[1:]))
    assert not missing, f"accepted by the broker, never mailed: {missing}"
    assert {s: n for s, n in counts.items() if n != 1} == {}, "sent more than once"
    assert set(counts) - accepted <= {f"m{len(traffic.confirmed)}"}  # the one in flight
    assert node.consumer.connected


@pytest.fixture
async def started(tmp_path: Path, smtp: SmtpServer,
                  session: aiohttp.ClientSession) -> AsyncIterator[Starter]:
    nodes: list[Node] = []

    async def start(link: Link) -> Node:
        await link.open()
        nodes.append(await start_node(tmp_path, link, smtp, session, modem=False))
        return nodes[-1]

    yield start
    for node in nodes:
        await node.stop()
        await node.sim.stop()
        await node.link.close()


# -- RabbitMQ ------------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True,
                   timeout=timeout)


def rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


async def test_rabbitmq_restart_loses_no_confirmed_message(
        started: Starter) -> None:
    # Waits a while if another test is restarting the shared broker right now.
    await asyncio.to_thread(require_tcp, "RabbitMQ", "127.0.0.1", 5672)
    link = AmqpLink()
    node = await started(link)
    conn: AbstractConnection | None = None
    channel: AbstractChannel | None = None

    async def publish(payload: bytes) -> bool:
        nonlocal conn, channel
        if conn is None or conn.is_closed or channel is None or channel.is_closed:
            conn = await aio_pika.connect(RABBIT_URL, timeout=2)
            channel = await conn.channel(publisher_confirms=True)
        # Persistent, mandatory (an unroutable message is returned, not confirmed):
        # the broker's ack means the message is on disk in the durable queue.
        await channel.default_exchange.publish(
            aio_pika.Message(payload, delivery_mode=DeliveryMode.PERSISTENT),
            routing_key=link.topic, mandatory=True)
        return True

    async def reset() -> None:
        nonlocal conn
        old, conn = conn, None
        if old is not None:
            await within(2, old.close())

    async def restart() -> None:
        stopped = False
        try:
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            stopped = True
            await wait_until(lambda: not node.consumer.connected, 10, "otpd saw it go")
            await asyncio.sleep(0.3)  # publishes fail meanwhile
        finally:
            # The broker is shared: bring it back whatever happened.
            if stopped or not rabbit_up():
                await asyncio.to_thread(rabbitmqctl, "start_app")
            await asyncio.to_thread(rabbitmqctl, "await_startup")
        await wait_until(rabbit_up, 30, "RabbitMQ listening again")

    try:
        await across_restart(node, Traffic(publish, reset), restart)
    finally:
        await reset()


# -- Redis stream ----------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Process]:
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    # appendfsync always: an entry is on disk before XADD returns its id.
    yield from own_server("redis-server", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)],
        port, tmp_path / "redis.log")


async def test_redis_stream_server_killed_loses_no_added_entry(
        own_redis: Process, started: Starter) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    node = await started(RedisStreamLink(url))
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)

    async def publish(payload: bytes) -> bool:
        entry_id = await client.xadd(node.link.topic, {"message": payload})
        return bool(entry_id)

    async def reset() -> None:
        await client.connection_pool.disconnect()

    async def restart() -> None:
        await own_redis.restart(signal.SIGKILL)

    try:
        await across_restart(node, Traffic(publish, reset), restart)
        assert await node.link.leftovers() == 0  # every entry acknowledged
    finally:
        await client.aclose()


# -- MQTT ----------------------------------------------------------------------------


@pytest.fixture
def mosquitto_server(tmp_path: Path) -> Iterator[Process]:
    yield from own_mosquitto(tmp_path)


class QoS1Publisher:
    """paho in its own thread: publish at QoS 1 and wait for the PUBACK."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: mqtt.Client | None = None
        self.lock = threading.Lock()

    def _connect(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, reconnect_on_failure=False)
        up = threading.Event()
        client.on_connect = lambda *_a: up.set()
        client.connect("127.0.0.1", self.port, 30)
        client.loop_start()
        if not up.wait(2):
            client.loop_stop()
            raise ConnectionError("no CONNACK")
        return client

    def publish(self, topic: str, payload: bytes) -> bool:
        with self.lock:
            if self.client is None:
                self.client = self._connect()
            info = self.client.publish(topic, payload, qos=1)
            info.wait_for_publish(2)
            return info.is_published()

    def reset(self) -> None:
        with self.lock:
            client, self.client = self.client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()


async def test_mosquitto_restart_loses_no_acknowledged_publish(
        mosquitto_server: Process, started: Starter) -> None:
    node = await started(MqttLink("127.0.0.1", mosquitto_server.port))
    publisher = QoS1Publisher(mosquitto_server.port)

    async def publish(payload: bytes) -> bool:
        return await asyncio.to_thread(publisher.publish, node.link.topic, payload)

    async def reset() -> None:
        await asyncio.to_thread(publisher.reset)

    async def restart() -> None:
        await mosquitto_server.restart(signal.SIGTERM)

    try:
        await across_restart(node, Traffic(publish, reset), restart)
    finally:
        await reset()
