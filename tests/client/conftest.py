"""Fixtures for the publisher library tests: a running daemon (simulated modem,
SMTP sink) consuming one method on a unique topic, and client configurations
pointing at it. RabbitMQ, Redis and Mosquitto on localhost; ``otpd broker``
started in the test for WebSocket. A missing service skips (fails with
OTPD_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import asyncio
import re
import socket
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerConfig, BrokerServer
from otpd.channels.sms.simulator import ModemSimulator
from otpd.client import AsyncOtpClient, ClientConfig, parse_client_config
from tests.conftest import (
    API_PASSWORD,
    API_USER,
    MQTT_HOST,
    MQTT_PORT,
    RABBIT_URL,
    REDIS_URL,
    Running,
    SmtpServer,
    service_unreachable,
    start_daemon,
    wait_until,
    write_config,
)

WS_USER, WS_PASSWORD = "app", "ws:secret"

# method name in tests -> (client method, redis mode)
METHODS = ["rest", "amqp", "redis", "redis-stream", "mqtt", "ws"]


def unique(prefix: str = "t") -> str:
    return f"otpd-client-test-{prefix}-{uuid.uuid4().hex[:12]}"


def email() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.org"


def phone() -> str:
    return "0812" + str(uuid.uuid4().int)[:7]


async def check_service(method: str) -> None:
    """Skip (or fail) unless the broker the method needs answers."""
    if method == "amqp":
        import aio_pika

        try:
            conn = await aio_pika.connect(RABBIT_URL, timeout=5)
            await conn.close()
        except Exception as exc:
            service_unreachable("RabbitMQ not reachable on 127.0.0.1:5672", exc)
    elif method.startswith("redis"):
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            await client.ping()
        except Exception as exc:
            service_unreachable("Redis not reachable on 127.0.0.1:6379", exc)
        finally:
            await client.aclose()
    elif method == "mqtt":
        try:
            with socket.create_connection((MQTT_HOST, MQTT_PORT), timeout=2):
                pass
        except OSError as exc:
            service_unreachable(f"Mosquitto not reachable on {MQTT_HOST}:{MQTT_PORT}", exc)


@pytest.fixture
async def redis_url() -> str:
    await check_service("redis")
    return REDIS_URL


@pytest.fixture
def ws_users(tmp_path: Path) -> Path:
    path = tmp_path / "broker-users"
    path.write_text(f"{WS_USER}:{hash_password(WS_PASSWORD, cost=4)}\n")
    return path


@pytest.fixture
async def ws_broker(ws_users: Path) -> AsyncIterator[BrokerServer]:
    server = BrokerServer(BrokerConfig(htpasswd=ws_users, port=0))
    await server.start()
    yield server
    await server.stop()


def modem_block(port: Path) -> str:
    return f"""
        [[modem]]
        name = "sim1"
        port = "{port}"
        command_timeout = 1
        prompt_timeout = 2
        send_timeout = 2

        [sms]
        retry_delay = 0.2
        probe_interval = 0.3
    """


def daemon_broker_block(method: str, topic: str, ws_port: int | None, extra: str = "") -> str:
    fast = "reconnect_min = 0.1\nreconnect_max = 0.5\n" + extra
    if method == "amqp":
        return f'[amqp]\nurl = "{RABBIT_URL}"\ntopic = "{topic}"\n{fast}'
    if method.startswith("redis"):
        mode = "stream" if method == "redis-stream" else "pubsub"
        return (f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{topic}"\nmode = "{mode}"\n'
                f'consumer = "{unique("c")}"\nclaim_idle = 5\n{fast}')
    if method == "mqtt":
        return (f'[mqtt]\nhost = "{MQTT_HOST}"\nport = {MQTT_PORT}\ntopic = "{topic}"\n'
                f'client_id = "{unique("d")}"\n{fast}')
    if method == "ws":
        return (f'[ws]\nurl = "ws://127.0.0.1:{ws_port}/ws"\nusername = "{WS_USER}"\n'
                f'password = "{WS_PASSWORD}"\ntopic = "{topic}"\n{fast}')
    return ""


def client_toml(method: str, topic: str, *, rest_port: int | None = None,
                ws_port: int | None = None, client: str = "", extra: str = "") -> str:
    """A client configuration for ``method`` (test names: redis-stream = redis, mode stream)."""
    real = "redis" if method.startswith("redis") else method
    table = ""
    if method == "rest":
        table = (f'[rest]\nurl = "http://127.0.0.1:{rest_port}/api/otp"\n'
                 f'username = "{API_USER}"\npassword = "{API_PASSWORD}"\n')
    elif method == "amqp":
        table = f'[amqp]\nurl = "{RABBIT_URL}"\ntopic = "{topic}"\n'
    elif real == "redis":
        mode = "stream" if method == "redis-stream" else "pubsub"
        table = f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{topic}"\nmode = "{mode}"\n'
    elif method == "mqtt":
        table = f'[mqtt]\nhost = "{MQTT_HOST}"\nport = {MQTT_PORT}\ntopic = "{topic}"\n'
    elif method == "ws":
        table = (f'[ws]\nurl = "ws://127.0.0.1:{ws_port}/ws"\nusername = "{WS_USER}"\n'
                 f'password = "{WS_PASSWORD}"\ntopic = "{topic}"\n')
    head = (f'[client]\nmethod = "{real}"\ntimeout = 10\nconnect_timeout = 5\n'
            f"{textwrap.dedent(client)}\n")
    return head + table + textwrap.dedent(extra)


@dataclass
class Gateway:
    """A running daemon that consumes ``method`` on ``topic``."""

    method: str
    topic: str
    run: Running
    sim: ModemSimulator
    smtp: SmtpServer
    ws_port: int | None = None
    broker: BrokerServer | None = None  # the WebSocket broker (stopped after the test)
    clients: list[AsyncOtpClient] = field(default_factory=list)

    @property
    def rest_port(self) -> int:
        assert self.run.daemon.rest is not None and self.run.daemon.rest.port is not None
        return self.run.daemon.rest.port

    def toml(self, method: str | None = None, *, client: str = "", extra: str = "") -> str:
        return client_toml(method or self.method, self.topic, rest_port=self.rest_port,
                           ws_port=self.ws_port, client=client, extra=extra)

    def config(self, method: str | None = None, *, client: str = "",
               extra: str = "") -> ClientConfig:
        return parse_client_config(self.toml(method, client=client, extra=extra))

    def client(self, method: str | None = None, *, client: str = "",
               extra: str = "") -> AsyncOtpClient:
        c = AsyncOtpClient(self.config(method, client=client, extra=extra))
        self.clients.append(c)
        return c

    async def sms(self, receiver_digits: str, count: int = 1, timeout: float = 10.0) -> str:
        """The text of the ``count``-th SMS to a receiver (E.164 digits suffix)."""
        def found() -> list[Any]:
            return [m for m in self.sim.sent if m.receiver.endswith(receiver_digits)]

        await wait_until(lambda: len(found()) >= count, timeout, f"SMS to {receiver_digits}")
        text: str = found()[count - 1].text
        return text

    async def mail(self, address: str, timeout: float = 10.0) -> Message:
        def found() -> list[Message]:
            return [m for m in self.smtp.sink.messages if address in str(m.get("To", ""))]

        await wait_until(lambda: bool(found()), timeout, f"mail to {address}")
        return found()[0]


def code_in(text: str) -> str:
    match = re.search(r"\b(\d{6})\b", text)
    assert match, "no code in the message"
    return match.group(1)


def body_text(message: Message) -> str:
    payload = message.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    parts = message.get_payload()
    if isinstance(parts, list):
        return "\n".join(body_text(p) for p in parts if isinstance(p, Message))
    return str(parts)


async def _wait_modem(run: Running) -> None:
    for _ in range(150):
        _, body = await run.client.call("get-modem-list", {})
        modems = body["data"]["modem_list"].values()
        if any(m.get("state") == "ready" for m in modems):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the simulated modem did not become ready")


async def _cleanup_broker(method: str, topic: str) -> None:
    try:
        if method == "amqp":
            import aio_pika

            conn = await aio_pika.connect(RABBIT_URL, timeout=5)
            async with conn:
                channel = await conn.channel()
                await channel.queue_delete(topic)
        elif method == "redis-stream":
            from redis.asyncio import Redis

            client = Redis.from_url(REDIS_URL)
            try:
                await client.delete(topic)
            finally:
                await client.aclose()
    except Exception as exc:
        print(f"cleanup of {topic} failed: {exc}")


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession,
                       ws_users: Path) -> AsyncIterator[MakeGateway]:
    """Start a daemon consuming one method (``broker_extra``: more keys for its table)."""
    started: list[Gateway] = []

    async def factory(method: str, broker_extra: str = "", otp_lines: str = "") -> Gateway:
        await check_service(method)
        topic = unique(method)
        broker: BrokerServer | None = None
        if method == "ws":
            broker = BrokerServer(BrokerConfig(htpasswd=ws_users, port=0))
            await broker.start()
        ws_port = broker.port if broker is not None else None
        home = tmp_path / f"gw{len(started)}"
        home.mkdir()
        sim = ModemSimulator(home / "modem", name="sim1", seed=1, store_sent=True)
        await sim.start()
        extra = modem_block(home / "modem") + daemon_broker_block(method, topic, ws_port,
                                                                   broker_extra)
        config = write_config(home, extra, smtp_port=smtp.port, wait=5, otp_lines=otp_lines)
        run = await start_daemon(config, session)
        gw = Gateway(method, topic, run, sim, smtp, ws_port, broker)
        started.append(gw)
        if method != "rest":
            await wait_until(lambda: all(c.connected for c in run.daemon.consumers), 10,
                             f"{method} consumer connected")
        await _wait_modem(run)
        return gw

    yield factory
    for gw in started:
        for c in gw.clients:
            await c.close()
        await gw.run.daemon.stop()
        await gw.sim.stop()
        if gw.broker is not None:
            await gw.broker.stop()
        await _cleanup_broker(gw.method, gw.topic)
