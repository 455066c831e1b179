"""The services on the development and CI machines, and skip-or-fail.

A test needing a service that is absent is skipped with the reason, or fails
when ``OTPD_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from typing import NoReturn

import pytest

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883

# RabbitMQ is shared, and some tests restart it (rabbitmqctl stop_app / start_app):
# give a restart in progress this long before calling the broker absent.
RABBIT_GRACE = 45.0


def services_required() -> bool:
    return os.environ.get("OTPD_REQUIRE_SERVICES") == "1"


def service_unreachable(what: str, exc: BaseException | None = None) -> NoReturn:
    """A service the test needs is absent: skip on a user's machine, fail in CI."""
    message = f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what
    if services_required():
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """The path of program ``name``, or skip-or-fail."""
    path = shutil.which(name)
    if path is None:
        service_unreachable(f"{name} is not installed (not on PATH)")
    return path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_tcp(name: str, host: str, port: int, grace: float | None = None) -> None:
    """Skip-or-fail unless something listens there (RabbitMQ: within RABBIT_GRACE)."""
    if grace is None:
        grace = RABBIT_GRACE if port == 5672 else 0.0
    deadline = time.monotonic() + grace
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                service_unreachable(f"{name} not reachable on {host}:{port}", exc)
        time.sleep(0.2)


async def require_rabbit(url: str = RABBIT_URL, grace: float = RABBIT_GRACE) -> str:
    import aio_pika

    deadline = time.monotonic() + grace
    while True:
        try:
            conn = await aio_pika.connect(url, timeout=5)
            await conn.close()
            return url
        except Exception as exc:
            if time.monotonic() >= deadline:
                service_unreachable("RabbitMQ not reachable on 127.0.0.1:5672", exc)
        await asyncio.sleep(0.2)


async def require_redis(url: str = REDIS_URL) -> str:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        service_unreachable("Redis not reachable on 127.0.0.1:6379", exc)
    finally:
        await client.aclose()
    return url


def require_mosquitto(host: str = MQTT_HOST, port: int = MQTT_PORT) -> tuple[str, int]:
    require_tcp("Mosquitto", host, port, 0.0)
    return host, port


async def require_service(method: str) -> None:
    """Skip-or-fail unless the broker of a client method (or broker kind) answers."""
    if method == "amqp":
        await require_rabbit()
    elif method.startswith("redis"):
        await require_redis()
    elif method == "mqtt":
        require_mosquitto()
