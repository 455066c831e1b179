"""Fixtures for the broker consumer tests: real RabbitMQ, Redis, Mosquitto and
``otpd broker`` on localhost, a running daemon with a real SMTP sink, and
consumers started next to it (or by the daemon itself: see ``links.py``)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerConfig, BrokerServer
from otpd.settings_reader import ConfigError, Section
from otpd.store import StoreError
from otpd.transports.consumer import Consumer
from otpd.transports.registry import build_consumers
from otpd.transports.settings import BrokerSettings, parse_broker_settings
from tests.conftest import (
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

# ``otpd broker`` accounts: otpd's own, and OTP-Publisher's (which sends its
# user name as the password).
OTPD_USER, OTPD_PASSWORD = "otpd", "pi:pass"
APP_USER = "kamshory"


# RabbitMQ is shared, and some tests restart it (rabbitmqctl stop_app / start_app):
# give a restart in progress this long before calling the broker absent.
RABBIT_GRACE = 45.0


def _tcp_check(name: str, host: str, port: int, grace: float = 0.0) -> None:
    deadline = time.monotonic() + grace
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                service_unreachable(f"{name} not reachable on {host}:{port}", exc)
                return
        time.sleep(0.2)


def require_tcp(name: str, host: str, port: int) -> None:
    """Skip (fail with OTPD_REQUIRE_SERVICES=1) unless something listens there."""
    _tcp_check(name, host, port, RABBIT_GRACE if port == 5672 else 0.0)


@pytest.fixture
async def rabbit() -> str:
    import aio_pika

    deadline = time.monotonic() + RABBIT_GRACE
    while True:
        try:
            conn = await aio_pika.connect(RABBIT_URL, timeout=5)
            await conn.close()
            return RABBIT_URL
        except Exception as exc:
            if time.monotonic() >= deadline:
                service_unreachable("RabbitMQ not reachable on 127.0.0.1:5672", exc)
                return RABBIT_URL
        await asyncio.sleep(0.2)


@pytest.fixture
async def redis_url() -> str:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        service_unreachable("Redis not reachable on 127.0.0.1:6379", exc)
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    _tcp_check("Mosquitto", MQTT_HOST, MQTT_PORT)
    return MQTT_HOST, MQTT_PORT


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "broker-users"
    path.write_text(f"{OTPD_USER}:{hash_password(OTPD_PASSWORD, cost=4)}\n"
                    f"{APP_USER}:{hash_password(APP_USER, cost=4)}\n")
    return path


@pytest.fixture
async def broker(users: Path) -> AsyncIterator[BrokerServer]:
    """An ``otpd broker`` (WebSocket message broker) on a free port."""
    server = BrokerServer(BrokerConfig(htpasswd=users, port=0))
    await server.start()
    yield server
    await server.stop()


def unique(prefix: str = "t") -> str:
    return f"otpd-test-{prefix}-{uuid.uuid4().hex[:12]}"


def receiver() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.org"


def broker_settings(toml: str) -> BrokerSettings:
    errors: list[str] = []
    root = Section(tomllib.loads(toml), "", errors)
    settings = parse_broker_settings(root.section("amqp"), root.section("redis"),
                                     root.section("mqtt"), root.section("ws"))
    root.finish()
    if errors:
        raise ConfigError(errors)
    return settings


def command(name: str, data: dict[str, Any], **top: Any) -> bytes:
    """An envelope as OTP-Publisher builds it (date_time always set)."""
    data = {"date_time": int(time.time()), **data}
    return json.dumps({"command": name, "data": data, **top}).encode()


@dataclass
class Gateway:
    """A running daemon (REST, SMTP to the sink) plus consumers started by the test."""

    run: Running
    smtp: SmtpServer
    consumers: list[Consumer] = field(default_factory=list)
    insert_failures: int = 0
    insert_calls: int = 0

    async def start(self, toml: str, default_wait: float = 5.0) -> list[Consumer]:
        assert self.run.daemon.service is not None
        started = build_consumers(broker_settings(toml), self.run.daemon.service, default_wait)
        for consumer in started:
            await consumer.start()
        self.consumers.extend(started)
        return started

    async def stop(self, consumer: Consumer) -> None:
        await consumer.stop()
        self.consumers.remove(consumer)

    def mails_to(self, address: str) -> list[Message]:
        return [m for m in self.smtp.sink.messages if address in str(m.get("To", ""))]

    async def mail(self, address: str, timeout: float = 10.0) -> Message:
        found = await wait_until(lambda: self.mails_to(address), timeout, f"mail to {address}")
        message: Message = found[0]
        return message

    def fail_store(self, times: int) -> None:
        """The next ``times`` inserts fail as a broken disk would (StoreError)."""
        store = self.run.daemon.store
        assert store is not None
        real = store.insert_message
        self.insert_failures = times

        async def insert(*args: Any, **kwargs: Any) -> Any:
            self.insert_calls += 1
            if self.insert_failures > 0:
                self.insert_failures -= 1
                raise StoreError("disk I/O error (simulated)")
            return await real(*args, **kwargs)

        store.insert_message = insert  # type: ignore[method-assign]


@pytest.fixture
async def gateway(tmp_path: Path, smtp: SmtpServer,
                  session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    config = write_config(tmp_path, smtp_port=smtp.port, wait=5)
    run = await start_daemon(config, session)
    gw = Gateway(run, smtp)
    try:
        yield gw
    finally:
        for consumer in gw.consumers:
            await consumer.stop(grace=1.0)
        await run.daemon.stop()


def body_text(message: Message) -> str:
    payload = message.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    parts = message.get_payload()
    if isinstance(parts, list):
        return "\n".join(body_text(p) for p in parts if isinstance(p, Message))
    return str(parts)


def otp_in(message: Message) -> str:
    match = re.search(r"\b(\d{6})\b", body_text(message))
    assert match, "no code in the mail"
    return match.group(1)
