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
import functools
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from otpd.aio import within
from tests.support import processes
from tests.support.brokers import command, receiver
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer
from tests.support.processes import Process, own_mosquitto
from tests.support.publishers import AmqpPublisher, MqttPublisher, RedisPublisher
from tests.support.services import RABBIT_URL, port_open, require_tcp
from tests.support.waiting import wait_until
from tests.transports.links import AmqpLink, Link, MqttLink, RedisStreamLink, start_node

pytestmark = pytest.mark.services

RCPT = receiver()
PUBLISH_INTERVAL = 0.01  # s between two confirmed publishes
MIN_BEFORE, MIN_AFTER = 40, 40  # confirmed publishes before the outage and after it


Starter = Callable[[Link], Awaitable[Gateway]]


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


async def across_restart(node: Gateway, traffic: Traffic,
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
    nodes: list[Gateway] = []

    async def start(link: Link) -> Gateway:
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
    return port_open("127.0.0.1", 5672, 1)


async def test_rabbitmq_restart_loses_no_confirmed_message(
        started: Starter) -> None:
    # Waits a while if another test is restarting the shared broker right now.
    await asyncio.to_thread(require_tcp, "RabbitMQ", "127.0.0.1", 5672)
    link = AmqpLink()
    node = await started(link)
    # Persistent, mandatory (an unroutable message is returned, not confirmed):
    # the broker's ack means the message is on disk in the durable queue.
    publisher = AmqpPublisher(RABBIT_URL, link.topic, connect_timeout=2)

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
        await across_restart(node, Traffic(publisher.confirmed, publisher.close), restart)
    finally:
        await publisher.close()


# -- Redis stream ----------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Process]:
    yield from processes.own_redis(tmp_path)


async def test_redis_stream_server_killed_loses_no_added_entry(
        own_redis: Process, started: Starter) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    node = await started(RedisStreamLink(url))
    # Confirmed by the entry id the XADD returns.
    publisher = RedisPublisher(url, node.link.topic, "stream", connect_timeout=1)

    async def restart() -> None:
        await own_redis.restart(signal.SIGKILL)

    try:
        await across_restart(node, Traffic(publisher.confirmed, publisher.close), restart)
        # Every entry acknowledged: an entry read just before the kill is read again
        # on reconnect or reclaimed after claim_idle (0.5 s here), then acknowledged.
        async def all_acknowledged() -> bool:
            return bool(await node.link.leftovers() == 0)

        await wait_until(all_acknowledged, 10, "every stream entry acknowledged")
    finally:
        await publisher.close()


# -- MQTT ----------------------------------------------------------------------------


@pytest.fixture
def mosquitto_server(tmp_path: Path) -> Iterator[Process]:
    yield from own_mosquitto(tmp_path)


async def test_mosquitto_restart_loses_no_acknowledged_publish(
        mosquitto_server: Process, started: Starter) -> None:
    node = await started(MqttLink("127.0.0.1", mosquitto_server.port))
    publisher = MqttPublisher("127.0.0.1", mosquitto_server.port)  # confirmed by PUBACK

    async def restart() -> None:
        await mosquitto_server.restart(signal.SIGTERM)

    try:
        await across_restart(node, Traffic(functools.partial(publisher.confirmed, node.link.topic),
                                           publisher.close), restart)
    finally:
        await publisher.close()
