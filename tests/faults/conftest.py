"""Shared pieces of the fault-injection suite.

* receivers that note the tag of each message and when it arrived (an SMTP
  sink, the modem simulator's ``sent`` list), so tests can tell lost,
  duplicated and late messages apart;
* the daemon as a subprocess (``python -m otpd run``), to SIGKILL it;
* publishers that count a broker message as *accepted* only when the broker
  confirmed it (RabbitMQ publisher confirms, Redis ``XADD`` ids, MQTT PUBACK,
  a reply on a WebSocket callback topic);
* Redis and Mosquitto servers of the test's own, on spare ports, to restart;
* skip-or-fail: a missing service skips the test with its reason, or fails it
  when ``OTPD_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aio_pika
import aiohttp
import paho.mqtt.client as mqtt
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, DeliveryMode
from aiosmtpd.controller import Controller
from paho.mqtt.enums import CallbackAPIVersion
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from otpd.aio import within
from otpd.app import control
from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerConfig, BrokerServer
from tests.conftest import (
    MQTT_HOST,
    MQTT_PORT,
    RABBIT_URL,
    REDIS_URL,
    Client,
    free_port,
    service_unreachable,
)
from tests.transports.servers import Process, own_server

T = TypeVar("T")


# Fast reconnects, so a restart or a kill is healed quickly.
BROKER_FAST = """
reconnect_min = 0.1
reconnect_max = 0.5
retry_delay = 0.1
"""

SMS_FAST = """
[sms]
retry_delay = 0.2
probe_interval = 0.3
max_probe_interval = 1
refresh_interval = 0.5
"""

_TAG = re.compile(r"\[\[([A-Za-z0-9_.:-]+)\]\]")


def tagged(tag: str, text: str = "fault test") -> str:
    """Message text carrying ``tag``, which the receivers pick out again."""
    return f"{text} [[{tag}]]"


def tag_of(text: str) -> str | None:
    match = _TAG.search(text)
    return match.group(1) if match else None


def unique(prefix: str) -> str:
    return f"otpd-fault-{prefix}-{uuid.uuid4().hex[:10]}"


def unavailable(what: str) -> NoReturn:
    """Skip with ``what`` as the reason, or fail when services are required (CI)."""
    service_unreachable(what)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (not on PATH)")
    return path


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
                   interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- receivers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    tag: str
    at: float  # when the receiver had the whole message (the receiver's clock)


def body_text(message: Message) -> str:
    payload = message.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    parts = message.get_payload()
    if isinstance(parts, list):
        return "\n".join(body_text(p) for p in parts if isinstance(p, Message))
    return str(parts)


class TimedSink:
    """aiosmtpd handler noting each message's tag and when its DATA arrived.

    The receipt is noted *before* the optional ``delay`` and the 250 answer: a
    kill during the delay leaves a message the server has but the daemon
    never heard accepted, as a kill inside a real SMTP conversation does.
    """

    def __init__(self, delay: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self.delay = delay
        self.clock = clock
        self.received: list[Receipt] = []
        self.messages: list[Message] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at = self.clock()
        message = message_from_bytes(envelope.content)
        with self._lock:
            self.received.append(Receipt(tag_of(body_text(message)) or "?", at))
            self.messages.append(message)
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 OK"

    def tags(self) -> list[str]:
        with self._lock:
            return [r.tag for r in self.received]


class SmtpControl:
    """An aiosmtpd server on a fixed port that can be stopped and started again."""

    def __init__(self, sink: TimedSink, port: int) -> None:
        self.sink = sink
        self.port = port
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None


# -- the daemon in a subprocess ----------------------------------------------------------


class DaemonProcess:
    """``python -m otpd run`` with its stderr appended to one log across restarts."""

    def __init__(self, config: Path, log: Path, client: Client,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.client = client
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otpd", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=self.env or dict(os.environ),
            )
        self.starts += 1

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until REST answers ``echo`` (the store is open and the engine started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"otpd exited with {self.proc.returncode}:\n"
                                     + self.log_text()[-3000:])
            with contextlib.suppress(aiohttp.ClientError, OSError):
                status, _ = await self.client.call("echo", {})
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("otpd did not become ready:\n" + self.log_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; returns the exit status (SIGKILL and -9 after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def daemon_status(socket_path: Path) -> dict[str, Any]:
    """The control socket's ``status`` (engine state, broker consumers, outbox counts)."""
    answer = await control.request(socket_path, {"op": "status"}, timeout=5.0)
    assert answer.get("ok"), answer
    return answer


def modem_table(name: str, port: Path, prefixes: str = "[]") -> str:
    return textwrap.dedent(f"""
        [[modem]]
        name = "{name}"
        port = "{port}"
        prefixes = {prefixes}
        command_timeout = 1
        prompt_timeout = 1
        send_timeout = 2
    """)


def outbox(db: Path) -> list[dict[str, Any]]:
    """Every outbox row (read from another connection; WAL lets it read alongside)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")]
    finally:
        conn.close()


# -- shared services --------------------------------------------------------------------


async def _rabbit_ok(url: str) -> BaseException | None:
    try:
        conn = await aio_pika.connect(url, timeout=5)
        await conn.close()
    except Exception as exc:
        return exc
    return None


@pytest.fixture
async def rabbit_url() -> str:
    # Another suite may bounce the shared RabbitMQ for a moment: give it time.
    error: BaseException | None = None
    for _ in range(20):
        error = await _rabbit_ok(RABBIT_URL)
        if error is None:
            return RABBIT_URL
        await asyncio.sleep(1)
    unavailable(f"RabbitMQ not reachable on 127.0.0.1:5672: {error!r}")


@pytest.fixture
async def redis_url() -> str:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        unavailable(f"Redis not reachable on 127.0.0.1:6379: {exc!r}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
def mqtt_broker() -> tuple[str, int]:
    if not port_open(MQTT_HOST, MQTT_PORT, 2):
        unavailable(f"Mosquitto not reachable on {MQTT_HOST}:{MQTT_PORT}")
    return MQTT_HOST, MQTT_PORT


OwnServer = Process  # the name the fault tests use


# -- broker servers of the test's own -------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Process]:
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    # appendfsync always: an entry is on disk before XADD returns its id, so a
    # confirmed entry survives even a SIGKILL of the server.
    yield from own_server("redis-server", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)],
        port, tmp_path / "redis.log")


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Process]:
    port = free_port()
    data = tmp_path / "mosquitto-data"
    data.mkdir()
    conf = tmp_path / "mosquitto.conf"
    # Run as the current user (as root it would switch to "mosquitto", which
    # cannot write here); persistence keeps sessions and queued messages over a
    # clean restart (Mosquitto writes its database on SIGTERM).
    conf.write_text(textwrap.dedent(f"""
        user {getpass.getuser()}
        listener {port} 127.0.0.1
        allow_anonymous true
        persistence true
        persistence_location {data}/
        autosave_interval 1
        max_queued_messages 0
    """))
    yield from own_server("mosquitto", ["mosquitto", "-c", str(conf)], port,
                    tmp_path / "mosquitto.log")


# -- publishers ----------------------------------------------------------------------------


def command(name: str, data: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"command": name, "data": {"date_time": int(time.time()), **data},
                       **top}).encode()


class AmqpPublisher:
    """Persistent, mandatory messages on a confirm channel: a returned publish means
    RabbitMQ has the message in the durable queue."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def _chan(self) -> AbstractChannel:
        if (self._conn is None or self._conn.is_closed or self._channel is None
                or self._channel.is_closed):
            await self.reset()
            self._conn = await aio_pika.connect(self.url, timeout=2)
            self._channel = await self._conn.channel(publisher_confirms=True)
        return self._channel

    async def declare(self) -> None:
        """The queue as otpd declares it, so nothing published before otpd runs is
        unroutable."""
        channel = await self._chan()
        await channel.declare_queue(self.queue, durable=True)

    async def publish(self, body: bytes) -> bool:
        try:
            channel = await within(5, self._chan())
            await within(5, channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=DeliveryMode.PERSISTENT),
                routing_key=self.queue, mandatory=True))
        except Exception:
            with contextlib.suppress(Exception):
                await self.reset()
            return False
        return True

    async def depth(self) -> int:
        channel = await self._chan()
        queue = await channel.declare_queue(self.queue, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await within(2, conn.close())

    async def close(self, *queues: str) -> None:
        with contextlib.suppress(Exception):
            channel = await within(5, self._chan())
            for name in (self.queue, *queues):
                await channel.queue_delete(name)
        await self.reset()


class StreamPublisher:
    """``XADD`` to a stream: the returned id is the broker's confirmation."""

    def __init__(self, url: str, key: str) -> None:
        self.key = key
        self.client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)

    async def publish(self, body: bytes) -> bool:
        try:
            return bool(await self.client.xadd(self.key, {"message": body}))
        except Exception:
            with contextlib.suppress(Exception):
                await self.client.connection_pool.disconnect()
            return False

    async def leftovers(self, group: str) -> int:
        """Entries never handed out plus those handed out and not acknowledged."""
        groups: Any = await self.client.xinfo_groups(self.key)
        found = next(g for g in groups if g["name"] in (group, group.encode()))
        return int(found["pending"]) + int(found.get("lag") or 0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.delete(self.key)
        await self.client.aclose()


class MqttPublisher:
    """QoS 1 publishes from paho's thread: True once the PUBACK came."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()

    def _connect(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"),
                             reconnect_on_failure=False)
        up = threading.Event()
        client.on_connect = lambda *_a: up.set()
        client.connect(self.host, self.port, 30)
        client.loop_start()
        if not up.wait(2):
            client.loop_stop()
            raise ConnectionError("no CONNACK")
        return client

    def publish_sync(self, topic: str, body: bytes) -> bool:
        with self._lock:
            try:
                if self._client is None:
                    self._client = self._connect()
                info = self._client.publish(topic, body, qos=1)
                info.wait_for_publish(3)
                if info.is_published():
                    return True
            except Exception:  # noqa: S110 - not confirmed is all that matters
                pass
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        return False

    async def publish(self, topic: str, body: bytes) -> bool:
        return await asyncio.to_thread(self.publish_sync, topic, body)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()


def forget_mqtt_session(host: str, port: int, client_id: str) -> None:
    """Connect once with a clean session: the broker drops the persistent one."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                         reconnect_on_failure=False)
    up = threading.Event()
    client.on_connect = lambda *_a: up.set()
    try:
        client.connect(host, port, 10)
        client.loop_start()
        up.wait(5)
        client.disconnect()
    except OSError:
        pass
    finally:
        client.loop_stop()


@dataclass
class WsApp:
    """The application side of an ``otpd broker``: a command counts as accepted
    only when otpd's reply arrives on the callback topic (the broker confirms
    nothing)."""

    port: int
    user: str
    password: str
    timeout: float = 3.0
    replies: list[dict[str, Any]] = field(default_factory=list)

    def _connect(self, topic: str) -> connect:
        import base64

        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return connect(f"ws://127.0.0.1:{self.port}/ws?topic={topic}",
                       additional_headers={"Authorization": f"Basic {token}"}, open_timeout=2)

    async def request(self, topic: str, name: str, data: dict[str, Any]) -> dict[str, Any] | None:
        callback = unique("cb")
        try:
            async with asyncio.timeout(self.timeout):
                async with self._connect(callback) as listener:
                    async with self._connect(topic) as ws:
                        await ws.send(command(name, data, callback_topic=callback).decode())
                    frame = await listener.recv()
        except Exception:  # refused, closed, timed out: not accepted
            return None
        reply: dict[str, Any] = json.loads(frame)
        self.replies.append(reply)
        return reply


# -- the clock -----------------------------------------------------------------------------


class FakeClock:
    """Wall-clock time that the test can jump; runs at the real rate in between."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


# -- a daemon consuming all four brokers ----------------------------------------------------

BROKER_USER, BROKER_PASSWORD, APP_USER = "otpd", "pi:pass", "app"


async def start_ws_broker(tmp_path: Path, port: int = 0) -> BrokerServer:
    """``otpd broker`` with otpd's account and OTP-Publisher's (user name as password)."""
    users = tmp_path / "broker-users"
    users.write_text(f"{BROKER_USER}:{hash_password(BROKER_PASSWORD, cost=4)}\n"
                     f"{APP_USER}:{hash_password(APP_USER, cost=4)}\n")
    broker = BrokerServer(BrokerConfig(htpasswd=users, port=port))
    await broker.start()
    return broker


@dataclass(frozen=True)
class BrokerTopics:
    queue: str = field(default_factory=lambda: unique("q"))
    stream: str = field(default_factory=lambda: unique("s"))
    topic: str = field(default_factory=lambda: unique("t"))
    ws_topic: str = field(default_factory=lambda: unique("w"))
    client_id: str = field(default_factory=lambda: unique("otpd"))


def broker_tables(topics: BrokerTopics, *, rabbit_url: str, redis_url: str, mqtt_host: str,
                  mqtt_port: int, ws_port: int, ws_extra: str = "") -> str:
    """The [amqp], [redis] (stream), [mqtt] and [ws] tables of a daemon."""
    return f"""
[amqp]
url = "{rabbit_url}"
topic = "{topics.queue}"
{BROKER_FAST}
[redis]
url = "{redis_url}"
topic = "{topics.stream}"
mode = "stream"
group = "otpd"
consumer = "pi-1"
claim_idle = 0.5
{BROKER_FAST}
[mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
topic = "{topics.topic}"
client_id = "{topics.client_id}"
{BROKER_FAST}
[ws]
url = "ws://127.0.0.1:{ws_port}/ws"
username = "{BROKER_USER}"
password = "{BROKER_PASSWORD}"
topic = "{topics.ws_topic}"
reply_min_delay = 0
{ws_extra}{BROKER_FAST}
"""
