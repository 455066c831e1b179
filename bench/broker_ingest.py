"""Broker ingest benchmark: otpd's consumers against the bare client libraries.

For each broker (RabbitMQ, Redis stream, Redis pub/sub, MQTT, the WebSocket
broker), on loopback, in one run:

* raw: the client library alone consumes N messages with the same window
  (prefetch / COUNT / in-flight) as otpd and does nothing with them but
  acknowledge them where the broker wants that: ``basic.ack`` per message,
  one ``XACK`` per ``XREADGROUP`` batch, a PUBACK per MQTT message;
* otpd: the same N messages go through the real daemon, configured like the
  raw consumer (consumer, parsing, service, SQLite store with fsync,
  acknowledgement). The command stores without sending (``block-msisdn`` by
  default, or ``send-sms`` queued for a modem that is absent), so the rate is
  what otpd can take in. Counted: commands whose handling finished, i.e.
  stored and acknowledged.

Where the broker keeps messages (RabbitMQ queues, a Redis stream, an MQTT
persistent session) the N messages are a backlog published before the
consumer starts: two queues bound to one fanout exchange, two consumer groups
on one stream, two MQTT sessions. Pub/sub and the WebSocket broker keep
nothing, so a publisher process sends the N messages while the consumer runs.
Rates count from the first message received to the last one finished; each
broker runs ``--rounds`` rounds (fresh topics) and the medians are printed.
A last row runs the service and store alone (no broker, the same number of
commands in flight): no consumer can beat it.

Then the latency: ``send-sms`` at ``--rate`` messages/s (50) through each
broker to a simulated modem on a pseudo-terminal, from the publish call to
the moment the modem simulator gets the ``AT+CMGS`` command of that message.

RabbitMQ (5672) and Redis (6379) are the local services; Mosquitto runs as a
private process on a spare port (persistent sessions need an unlimited queue
for the backlog), and ``otpd broker`` as a subprocess. A broker that is not
there is skipped with a note. The abuse limits are off (``--limits``: on,
with thresholds that refuse nothing). Bounded: ``--count`` messages,
``--latency`` messages and a time limit per phase.

    .venv/bin/python bench/broker_ingest.py [--count 3000] [--rounds 3] [--prefetch 64]
        [--rate 50] [--latency 250] [--brokers amqp,redis-stream,redis-pubsub,mqtt,ws]
        [--command block-msisdn|send-sms] [--limits]
        [--profile FILE --profile-broker amqp]   # py-spy raw samples of one otpd phase
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing otpd (also in the spawned children).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import aio_pika  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import redis  # noqa: E402
from aio_pika.abc import AbstractIncomingMessage, ExchangeType  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

from otpd.aio import within  # noqa: E402
from otpd.app.daemon import Daemon  # noqa: E402
from otpd.app.settings import parse_settings  # noqa: E402
from otpd.auth.htpasswd import set_user  # noqa: E402
from otpd.channels.sms.simulator import ModemSimulator, SentMessage  # noqa: E402
from otpd.client.config import WsConfig  # noqa: E402
from otpd.client.publishers.base import Transport  # noqa: E402
from otpd.client.publishers.ws import WsTransport  # noqa: E402
from otpd.service import Service  # noqa: E402
from otpd.transports.consumer import Consumer, Inbound  # noqa: E402
from otpd.wire.protocol import parse_request  # noqa: E402
from tests.support.daemon import core_tables, free_port  # noqa: E402
from tests.support.publishers import (  # noqa: E402
    AmqpPublisher,
    MqttPublisher,
    RedisPublisher,
    WsPublisher,
)
from tests.support.services import port_open  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
WS_USER, WS_PASSWORD = "bench", "bench-password"
PREFETCH = 64  # otpd's default prefetch (--prefetch); the raw consumers get the same window
PHASE_LIMIT = 60.0  # s, any one phase
BROKERS = ("amqp", "redis-stream", "redis-pubsub", "mqtt", "ws")


def tcp_open(port: int) -> bool:
    return port_open("127.0.0.1", port, 1)


def make_body(command: str, i: int, run: str) -> bytes:
    """The i-th command of the ingest phase (distinct receivers and ids)."""
    number = f"+6281{i:09d}"
    data: dict[str, Any] = {"receiver": number, "date_time": int(time.time())}
    if command == "send-sms":
        data.update(id=f"{run}-{i}", message=f"ingest {i}")
    return json.dumps({"command": command, "data": data}).encode()


# -- measuring otpd ------------------------------------------------------------------


class Meter:
    """Commands otpd finished handling: parsed, run by the service, stored, acknowledged."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.done = 0
        self.target = 0
        self.finished = asyncio.Event()

    def reset(self, target: int) -> None:
        self.first, self.last, self.done, self.target = None, 0.0, 0, target
        self.finished = asyncio.Event()

    def rate(self) -> float:
        if self.first is None or self.done == 0 or self.last <= self.first:
            return 0.0
        return self.done / (self.last - self.first)


METER = Meter()
_process = Consumer.process


async def _metered_process(self: Consumer, msg: Inbound) -> None:
    if METER.first is None:
        METER.first = time.perf_counter()
    await _process(self, msg)
    METER.done += 1
    METER.last = time.perf_counter()
    if METER.done >= METER.target:
        METER.finished.set()


# Instrumentation only: process() returns once the command is stored and acknowledged.
Consumer.process = _metered_process  # type: ignore[method-assign]


# --limits on: the abuse limits are counted as in production (every command is a
# sliding-window hit in the store), with thresholds high enough not to refuse.
LIMITS_ON = """enabled = true
user_max = 100000000
user_distinct_receivers_daily = 100000000
receiver_max = 100000000
receiver_daily_max = 100000000
receiver_cooldown = 0"""


def daemon_config(state: Path, table: str, *, modem: Path | None, absent_modem: bool,
                  limits: bool) -> str:
    modem_block = ""
    if modem is not None:
        modem_block = f"""
[[modem]]
name = "sim1"
port = "{modem}"
command_timeout = 2
prompt_timeout = 2
send_timeout = 5
"""
    elif absent_modem:
        # Stored and queued, never sent: the ingest path alone.
        modem_block = f'[[modem]]\nname = "absent"\nport = "{state / "no-such-tty"}"\n'
    limits_table = LIMITS_ON if limits else "enabled = false"
    return core_tables(state, None) + f"""
[delivery]
wait = 0
max_lifetime = 3600
default_lifetime = 3600
[limits]
{limits_table}
{modem_block}
{table}
"""


async def start_daemon(state: Path, table: str, *, modem: Path | None = None,
                       absent_modem: bool = False, limits: bool = False) -> Daemon:
    state.mkdir(parents=True, exist_ok=True)
    path = state / "otpd.toml"
    path.write_text(daemon_config(state, table, modem=modem, absent_modem=absent_modem,
                                  limits=limits))
    daemon = Daemon(parse_settings(path.read_text(), path))
    await daemon.start()
    return daemon


# -- live publishers (child processes) -------------------------------------------------


async def _ws_publish_all(url: str, topic: str, bodies: list[bytes]) -> None:
    """The client library's WebSocket transport: one connection, a frame each."""
    transport = WsTransport(WsConfig(url=url, username=WS_USER, password=WS_PASSWORD,
                                     topic=topic), 10.0)
    try:
        for body in bodies:
            await transport.publish(body, None)
        await asyncio.sleep(0.5)  # let the broker relay before the close
    finally:
        await transport.close()


def _publish_main(kind: str, address: str, topic: str, command: str, count: int,
                  run: str) -> None:
    bodies = [make_body(command, i, run) for i in range(count)]
    if kind == "redis-pubsub":
        client = redis.Redis.from_url(address)
        for start in range(0, count, 64):
            pipe = client.pipeline(transaction=False)
            for body in bodies[start:start + 64]:
                pipe.publish(topic, body)
            pipe.execute()
        client.close()
    elif kind == "ws":
        asyncio.run(_ws_publish_all(address, topic, bodies))
    else:
        raise ValueError(kind)


def spawn_publisher(kind: str, address: str, topic: str, command: str, count: int,
                    run: str) -> multiprocessing.context.SpawnProcess:
    proc = multiprocessing.get_context("spawn").Process(
        target=_publish_main, args=(kind, address, topic, command, count, run), daemon=True)
    proc.start()
    return proc


# -- brokers ---------------------------------------------------------------------------


@dataclass
class Row:
    broker: str
    note: str = ""
    n: int = 0
    raw: float = 0.0
    otpd: float = 0.0
    ratio: float = 0.0
    latencies: list[float] = field(default_factory=list)
    latency_n: int = 0
    lost: int = 0


class Broker(ABC):
    name: str
    live = False  # True: no backlog, a publisher process sends during the phase
    _publisher: Transport | None = None

    def __init__(self, work: Path) -> None:
        self.work = work
        self.run = uuid.uuid4().hex[:8]
        self.topic = f"bench-{self.name}-{self.run}"

    def begin_round(self, round_: int) -> None:
        """Fresh topics (queues, stream, sessions) for one round of the ingest phase."""
        self.topic = f"bench-{self.name}-{self.run}-{round_}"

    def available(self) -> str | None:
        """None, or why this broker is skipped."""
        return None

    async def setup(self) -> None:
        return None

    async def teardown(self) -> None:
        return None

    @abstractmethod
    def table(self, topic: str) -> str:
        """otpd's configuration table for this broker."""

    async def backlog(self, bodies: list[bytes]) -> None:
        """Publish the N messages for both the raw consumer and otpd (not live)."""
        raise NotImplementedError

    async def before_otpd(self) -> None:
        """Prepare otpd's side of the backlog (queue, group, session)."""
        return None

    def live_address(self) -> str:
        raise NotImplementedError

    @abstractmethod
    async def raw_consume(self, n: int, started: asyncio.Event) -> tuple[float, float, int]:
        """Consume n messages with the library alone: (first, last, count)."""

    # latency: published as an application does, with the client library
    @abstractmethod
    def publisher(self, topic: str) -> Transport:
        """The client library's transport publishing to ``topic``."""

    async def open_publisher(self, topic: str) -> None:
        self._publisher = self.publisher(topic)

    async def close_publisher(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()

    async def publish(self, body: bytes) -> None:
        """Publish one message (confirmed by the broker where it does that)."""
        assert self._publisher is not None
        await self._publisher.publish(body, None)


class Amqp(Broker):
    name = "amqp"

    def available(self) -> str | None:
        return None if tcp_open(5672) else "RabbitMQ not listening on 5672"

    async def setup(self) -> None:
        self.conn = await aio_pika.connect(RABBIT_URL)
        self.channel = await self.conn.channel()
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    async def teardown(self) -> None:
        channel = await self.conn.channel()
        for name in self.queues:
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in self.exchanges:
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
        await self.conn.close()

    def table(self, topic: str) -> str:
        return f'[amqp]\nurl = "{RABBIT_URL}"\ntopic = "{topic}"\nprefetch = {PREFETCH}\n'

    async def backlog(self, bodies: list[bytes]) -> None:
        # One fanout exchange, two durable queues: the same messages for both.
        exchange = await self.channel.declare_exchange(f"{self.topic}-x", ExchangeType.FANOUT,
                                                       auto_delete=False)
        self.exchanges.append(exchange.name)
        for name in (self.topic, f"{self.topic}-raw"):
            queue = await self.channel.declare_queue(name, durable=True)
            self.queues.append(name)
            await queue.bind(exchange)
        confirmed = await self.conn.channel(publisher_confirms=True)
        x = await confirmed.get_exchange(f"{self.topic}-x")
        for start in range(0, len(bodies), 256):
            await asyncio.gather(*(x.publish(aio_pika.Message(b), routing_key="")
                                   for b in bodies[start:start + 256]))
        await confirmed.close()

    async def raw_consume(self, n: int, started: asyncio.Event) -> tuple[float, float, int]:
        channel = await self.conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(f"{self.topic}-raw", durable=True)
        first, last, count = 0.0, 0.0, 0
        done = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal first, last, count
            if count == 0:
                first = time.perf_counter()
            await message.ack()
            count += 1
            last = time.perf_counter()
            if count >= n:
                done.set()

        tag = await queue.consume(on_message)
        started.set()
        try:
            await within(PHASE_LIMIT, done.wait())
        finally:
            await queue.cancel(tag)
            await channel.close()
        return first, last, count

    def publisher(self, topic: str) -> Transport:
        return AmqpPublisher(RABBIT_URL, topic)

    async def open_publisher(self, topic: str) -> None:
        # Declared as otpd does: the client's mandatory publishes are routable.
        await self.channel.declare_queue(topic, durable=True)
        self.queues.append(topic)
        await super().open_publisher(topic)


class RedisStream(Broker):
    name = "redis-stream"

    def available(self) -> str | None:
        return None if tcp_open(6379) else "Redis not listening on 6379"

    async def setup(self) -> None:
        self.client = Redis.from_url(REDIS_URL)
        self.keys: list[str] = []

    async def teardown(self) -> None:
        if self.keys:
            await self.client.delete(*self.keys)
        await self.client.aclose()

    def table(self, topic: str) -> str:
        return (f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{topic}"\nmode = "stream"\n'
                f'group = "otpd"\nconsumer = "bench"\nprefetch = {PREFETCH}\n')

    async def backlog(self, bodies: list[bytes]) -> None:
        self.keys.append(self.topic)
        for start in range(0, len(bodies), 256):
            async with self.client.pipeline(transaction=False) as pipe:
                for body in bodies[start:start + 256]:
                    pipe.xadd(self.topic, {"message": body})
                await pipe.execute()
        # Two consumer groups from the start: both read every entry.
        await self.client.xgroup_create(self.topic, "raw", id="0")
        await self.client.xgroup_create(self.topic, "otpd", id="0")

    async def raw_consume(self, n: int, started: asyncio.Event) -> tuple[float, float, int]:
        first, last, count = 0.0, 0.0, 0
        started.set()
        deadline = time.monotonic() + PHASE_LIMIT
        while count < n and time.monotonic() < deadline:
            reply: Any = await self.client.xreadgroup("raw", "raw-1", {self.topic: ">"},
                                                      count=PREFETCH, block=1000)
            for _stream, entries in reply or []:
                if count == 0 and entries:
                    first = time.perf_counter()
                # One XACK for the batch read: the library at its most efficient.
                await self.client.xack(self.topic, "raw", *(e[0] for e in entries))
                count += len(entries)
                last = time.perf_counter()
        return first, last, count

    def publisher(self, topic: str) -> Transport:
        self.keys.append(topic)
        return RedisPublisher(REDIS_URL, topic, "stream")


class RedisPubsub(Broker):
    name = "redis-pubsub"
    live = True

    def available(self) -> str | None:
        return None if tcp_open(6379) else "Redis not listening on 6379"

    async def setup(self) -> None:
        self.client = Redis.from_url(REDIS_URL)

    async def teardown(self) -> None:
        await self.client.aclose()

    def table(self, topic: str) -> str:
        return f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{topic}"\nprefetch = {PREFETCH}\n'

    def live_address(self) -> str:
        return REDIS_URL

    async def raw_consume(self, n: int, started: asyncio.Event) -> tuple[float, float, int]:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.topic)
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        first, last, count = 0.0, 0.0, 0
        started.set()
        deadline = time.monotonic() + PHASE_LIMIT
        try:
            while count < n and time.monotonic() < deadline:
                message = await pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                if count == 0:
                    first = time.perf_counter()
                count += 1
                last = time.perf_counter()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        return first, last, count

    def publisher(self, topic: str) -> Transport:
        return RedisPublisher(REDIS_URL, topic, "pubsub")


class Mqtt(Broker):
    name = "mqtt"

    def available(self) -> str | None:
        return None if shutil.which("mosquitto") else "mosquitto not installed"

    async def setup(self) -> None:
        self.port = free_port()
        data = self.work / "mosquitto"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.work / "mosquitto.conf"
        # A private broker: unlimited queue for offline persistent sessions (the
        # backlog); run as the current user when started as root.
        conf.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n"
                        "allow_anonymous true\nmax_queued_messages 0\n")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_until(lambda: tcp_open(self.port), 10, "mosquitto")

    async def teardown(self) -> None:
        await self.close_publisher()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)

    @property
    def otpd_id(self) -> str:
        return f"otpd-{self.topic}"

    def table(self, topic: str) -> str:
        return (f'[mqtt]\nhost = "127.0.0.1"\nport = {self.port}\ntopic = "{topic}"\n'
                f'client_id = "otpd-{topic}"\nprefetch = {PREFETCH}\n')

    def _client(self, client_id: str = "", clean: bool = True) -> mqtt.Client:
        return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                           clean_session=clean, reconnect_on_failure=False)

    def _session(self, client_id: str) -> None:
        """Create a persistent session subscribed at QoS 1, then leave it offline."""
        client = self._client(client_id, clean=False)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_a: subscribed.set()
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        client.subscribe(self.topic, 1)
        if not subscribed.wait(5):
            raise TimeoutError("no SUBACK")
        client.disconnect()
        client.loop_stop()

    def _publish_all(self, bodies: list[bytes]) -> None:
        client = self._client()
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        infos = [client.publish(self.topic, body, qos=1) for body in bodies]
        for info in infos:
            info.wait_for_publish(30)
        client.disconnect()
        client.loop_stop()

    async def backlog(self, bodies: list[bytes]) -> None:
        await asyncio.to_thread(self._session, f"raw-{self.topic}")
        await asyncio.to_thread(self._session, self.otpd_id)
        await asyncio.to_thread(self._publish_all, bodies)

    async def raw_consume(self, n: int, started: asyncio.Event) -> tuple[float, float, int]:
        client = self._client(f"raw-{self.topic}", clean=False)
        client.manual_ack_set(True)
        state = {"first": 0.0, "last": 0.0, "count": 0}
        done = threading.Event()

        def on_message(c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            if state["count"] == 0:
                state["first"] = time.perf_counter()
            c.ack(message.mid, message.qos)
            state["count"] += 1
            state["last"] = time.perf_counter()
            if state["count"] >= n:
                done.set()

        client.on_message = on_message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        started.set()
        try:
            await asyncio.to_thread(done.wait, PHASE_LIMIT)
        finally:
            client.disconnect()
            client.loop_stop()
        return state["first"], state["last"], int(state["count"])

    def publisher(self, topic: str) -> Transport:
        return MqttPublisher("127.0.0.1", self.port).transport(topic)


class Ws(Broker):
    name = "ws"
    live = True

    async def setup(self) -> None:
        users = self.work / "ws-users"
        set_user(users, WS_USER, WS_PASSWORD, cost=4)
        # The bench account is both publisher and daemon, on fresh topics each round.
        acl = self.work / "ws-broker.acl"
        acl.write_text(f"{WS_USER} pubsub=*\n")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otpd", "broker", "--listen", f"127.0.0.1:{self.port}",
             "--htpasswd", str(users), "--acl", str(acl), "--queue", str(64 * 1024 * 1024)],
            cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_until(lambda: tcp_open(self.port), 15, "otpd broker")

    async def teardown(self) -> None:
        await self.close_publisher()
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def table(self, topic: str) -> str:
        return (f'[ws]\nurl = "{self.url}"\nusername = "{WS_USER}"\n'
                f'password = "{WS_PASSWORD}"\ntopic = "{topic}"\nprefetch = {PREFETCH}\n')

    def live_address(self) -> str:
        return self.url

    def _connect(self, topic: str) -> ws_connect:
        return ws_connect(f"{self.url}?topic={topic}", additional_headers={
            "Authorization": f"Basic {WS_USER}:{WS_PASSWORD}"}, max_size=None)

    async def raw_consume(self, n: int, started: asyncio.Event) -> tuple[float, float, int]:
        first, last, count = 0.0, 0.0, 0
        async with self._connect(self.topic) as ws:
            await asyncio.sleep(0.2)  # registered at the broker before the publisher starts
            started.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PHASE_LIMIT):
                    async for _frame in ws:
                        if count == 0:
                            first = time.perf_counter()
                        count += 1
                        last = time.perf_counter()
                        if count >= n:
                            break
        return first, last, count

    def publisher(self, topic: str) -> Transport:
        return WsPublisher(self.port, WS_USER, WS_PASSWORD, topic)


# -- phases ----------------------------------------------------------------------------


async def ingest(broker: Broker, row: Row, args: argparse.Namespace) -> None:
    """``--rounds`` rounds of raw then otpd on fresh topics; medians are kept."""
    raws, otpds, ratios = [], [], []
    for round_ in range(args.rounds):
        broker.begin_round(round_)
        raw, otpd = await ingest_round(broker, row, args, round_)
        raws.append(raw)
        otpds.append(otpd)
        ratios.append(otpd / raw if raw else 0.0)
    row.n = args.count
    row.raw = statistics.median(raws)
    row.otpd = statistics.median(otpds)
    row.ratio = statistics.median(ratios)


async def ingest_round(broker: Broker, row: Row, args: argparse.Namespace,
                       round_: int) -> tuple[float, float]:
    n = args.count
    run = broker.run
    bodies = [make_body(args.command, i, run) for i in range(n)]

    # raw
    if not broker.live:
        await broker.backlog(bodies)
    started = asyncio.Event()
    raw_task = asyncio.create_task(broker.raw_consume(n, started))
    publisher = None
    if broker.live:
        await within(10, started.wait())
        publisher = spawn_publisher(broker.name, broker.live_address(), broker.topic,
                                    args.command, n, run)
    first, last, count = await raw_task
    if publisher is not None:
        publisher.join(30)
    if count < n:
        row.note += f" raw consumer got {count}/{n}"
    raw = count / (last - first) if last > first else 0.0

    # otpd: the same messages, through the daemon
    METER.reset(n)
    state = broker.work / f"otpd-ingest-{round_}"
    daemon = await start_daemon(state, broker.table(broker.topic),
                                absent_modem=args.command == "send-sms", limits=args.limits)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        (consumer,) = daemon.consumers
        if broker.live:
            await wait_until(lambda: consumer.connected, 10, f"{broker.name} consumer")
            await asyncio.sleep(0.3)  # subscription registered at the broker
            publisher = spawn_publisher(broker.name, broker.live_address(), broker.topic,
                                        args.command, n, run)
        if args.profile and args.profile_broker == broker.name and round_ == 0:
            profiler = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")),
                                         "record", "-f", "raw", "-r", "250", "-o", args.profile,
                                         "-p", str(os.getpid()), "-t"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.suppress(TimeoutError):
            await within(PHASE_LIMIT, METER.finished.wait())
        otpd = METER.rate()
        if METER.done < n:
            row.note += f" otpd finished {METER.done}/{n} in {PHASE_LIMIT:.0f} s"
        assert daemon.store is not None
        counts = await daemon.store.counts()
        stored = counts["blocked"] if args.command == "block-msisdn" else sum(
            v for k, v in counts.items() if k.startswith("outbox_"))
        if stored != n:
            row.note += f" stored {stored}/{n}"
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        if publisher is not None:
            publisher.join(10)
        await daemon.stop()
    return raw, otpd


class TimedModem(ModemSimulator):
    """The simulator, noting when each AT+CMGS command line arrives."""

    def __init__(self, link: Path) -> None:
        super().__init__(link, name="sim1", seed=1)
        self.cmgs_at: list[float] = []
        self.received: dict[str, float] = {}
        if not hasattr(self, "on_command"):
            raise RuntimeError("this ModemSimulator has no on_command hook")
        self.on_command = self._note_command
        self.on_sent = self._note_sent

    def _note_command(self, line: str) -> None:
        if line.upper().startswith("AT+CMGS"):
            self.cmgs_at.append(time.perf_counter())

    def _note_sent(self, message: SentMessage) -> None:
        # One modem sends one message at a time: the latest AT+CMGS was this one's.
        if self.cmgs_at:
            self.received[message.text] = self.cmgs_at[-1]


async def latency(broker: Broker, row: Row, args: argparse.Namespace) -> None:
    topic = f"{broker.topic}-lat"
    state = broker.work / f"otpd-latency-{broker.name}"
    state.mkdir(parents=True, exist_ok=True)
    modem = TimedModem(state / "modem")
    await modem.start()
    await broker.open_publisher(topic)
    daemon = await start_daemon(state, broker.table(topic), modem=state / "modem",
                                limits=args.limits)
    sent: dict[str, float] = {}
    try:
        (consumer,) = daemon.consumers
        await wait_until(lambda: consumer.connected, 10, f"{broker.name} consumer")
        sms = daemon.engine.queues["sms"].channel if daemon.engine else None
        assert sms is not None
        await wait_until(lambda: any(m["state"] == "ready" for m in sms.status()["modems"]),
                       15, "modem ready")
        await asyncio.sleep(0.3)  # subscriptions settled
        interval = 1.0 / args.rate
        t0 = time.perf_counter()
        for i in range(args.latency):
            await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
            text = f"L{i} {broker.run}"
            body = json.dumps({"command": "send-sms", "data": {
                "receiver": "081234567890", "id": f"lat-{i}", "message": text}}).encode()
            sent[text] = time.perf_counter()
            await broker.publish(body)
        with contextlib.suppress(AssertionError):  # counted as lost
            await wait_until(lambda: len(modem.received) >= len(sent), 20, "all SMS")
    finally:
        await daemon.stop()
        await broker.close_publisher()
        await modem.stop()
    row.latency_n = len(sent)
    row.latencies = sorted((modem.received[t] - sent[t]) * 1000 for t in sent
                           if t in modem.received)
    row.lost = len(sent) - len(row.latencies)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return values[index]


async def bench(name: str, work: Path, args: argparse.Namespace) -> Row:
    kinds: dict[str, type[Amqp | RedisStream | RedisPubsub | Mqtt | Ws]] = {
        "amqp": Amqp, "redis-stream": RedisStream, "redis-pubsub": RedisPubsub,
        "mqtt": Mqtt, "ws": Ws}
    broker: Broker = kinds[name](work / name)
    broker.work.mkdir(parents=True, exist_ok=True)
    row = Row(name)
    reason = broker.available()
    if reason is not None:
        row.note = f"skipped: {reason}"
        return row
    await broker.setup()
    try:
        await ingest(broker, row, args)
        if args.latency:
            await latency(broker, row, args)
    except Exception as exc:
        row.note += f" error: {type(exc).__name__}: {exc}"
    finally:
        await broker.teardown()
    return row


async def service_ceiling(work: Path, args: argparse.Namespace) -> float:
    """The service and store alone, no broker: ``prefetch`` commands in flight,
    each parsed and run as a consumer would. No consumer can be faster."""
    rates = []
    for round_ in range(args.rounds):
        daemon = await start_daemon(work / f"ceiling-{round_}", "",
                                    absent_modem=args.command == "send-sms",
                                    limits=args.limits)
        try:
            assert daemon.service is not None
            bodies = iter([make_body(args.command, i, f"c{round_}")
                           for i in range(args.count)])
            t0 = time.perf_counter()
            await asyncio.gather(*(_ceiling_worker(daemon.service, bodies)
                                   for _ in range(PREFETCH)))
            rates.append(args.count / (time.perf_counter() - t0))
        finally:
            await daemon.stop()
    return float(statistics.median(rates))


async def _ceiling_worker(service: Service, bodies: Iterator[bytes]) -> None:
    for body in bodies:
        await service.execute(parse_request(body), wait=0.0, transport="bench")


async def main(args: argparse.Namespace) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="otpd-bench-") as tmp:
        ceiling = await service_ceiling(Path(tmp), args)
        for name in args.brokers.split(","):
            rows.append(await bench(name.strip(), Path(tmp), args))
            row = rows[-1]
            print(f"{row.broker}: raw {row.raw:.0f}/s, otpd {row.otpd:.0f}/s"
                  f"{', ' + row.note.strip() if row.note else ''}", file=sys.stderr)
    print(f"\nIngest: {args.count} `{args.command}` commands per broker, prefetch {PREFETCH},"
          f" abuse limits {'on' if args.limits else 'off'},"
          f" loopback, {os.cpu_count()} CPUs. Latency: {args.latency} `send-sms` at"
          f" {args.rate:g}/s, publish to the simulator's AT+CMGS.\n")
    print("| broker | raw consume msg/s | otpd stored+acked msg/s | ratio | latency p50 ms |"
          " p99 ms | max ms | notes |")
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for r in rows:
        ratio = r.ratio
        lat = r.latencies
        p99 = percentile(lat, 99)
        ok = ratio >= 0.5 and (not args.latency or (lat and p99 < 100 and not r.lost))
        failed |= not ok and not r.note.startswith("skipped")
        lost = f"{r.lost}/{r.latency_n} SMS not seen" if r.lost else ""
        print(f"| {r.broker} | {r.raw:.0f} | {r.otpd:.0f} | {ratio:.2f} |"
              f" {percentile(lat, 50):.1f} | {p99:.1f} | {max(lat, default=float('nan')):.1f} |"
              f" {' '.join(x for x in (r.note.strip(), lost) if x)} |")
    print(f"| (no broker) service + store alone | | {ceiling:.0f} | | | | | the ceiling for"
          " every consumer above |")
    print("\nGoals: ratio >= 0.5, latency p99 < 100 ms.", "MISSED" if failed else "Met.")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="messages per ingest phase")
    parser.add_argument("--latency", type=int, default=250,
                        help="send-sms messages for the latency phase (0: none)")
    parser.add_argument("--rate", type=float, default=50.0, help="latency phase msg/s")
    parser.add_argument("--brokers", default=",".join(BROKERS))
    parser.add_argument("--command", choices=("block-msisdn", "send-sms"),
                        default="block-msisdn")
    parser.add_argument("--limits", action="store_true",
                        help="abuse limits on (high thresholds) instead of off")
    parser.add_argument("--profile", help="py-spy raw output of one broker's otpd phase")
    parser.add_argument("--profile-broker", default="amqp")
    parser.add_argument("--rounds", type=int, default=3,
                        help="ingest rounds per broker (medians are reported)")
    parser.add_argument("--prefetch", type=int, default=PREFETCH,
                        help="prefetch of otpd and of the raw consumers")
    logging.basicConfig(level=logging.WARNING)
    arguments = parser.parse_args()
    PREFETCH = arguments.prefetch
    sys.exit(asyncio.run(main(arguments)))
