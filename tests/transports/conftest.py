"""Fixtures for the broker consumer tests: real RabbitMQ, Redis, Mosquitto and
``otpd broker`` on localhost, a running daemon with a real SMTP sink, and
consumers started next to it (or by the daemon itself: see ``links.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from otpd.channels.sms.simulator import ModemSimulator
from tests.support.daemon import start_daemon, write_config
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer
from tests.support.services import require_mosquitto, require_rabbit, require_redis


@pytest.fixture
async def rabbit() -> str:
    return await require_rabbit()


@pytest.fixture
async def redis_url() -> str:
    return await require_redis()


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    return require_mosquitto()


@pytest.fixture
async def gateway(tmp_path: Path, smtp: SmtpServer,
                  session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    """A running daemon (REST, SMTP to the sink) plus consumers started by the test."""
    config = write_config(tmp_path, smtp_port=smtp.port, wait=5)
    # No modem: the simulator is never started.
    sim = ModemSimulator(tmp_path / "modem", name="sim1")
    gw = Gateway(await start_daemon(config, session), smtp, sim)
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture
async def redis(redis_url: str, gateway: Gateway) -> AsyncIterator[Redis]:
    """A client of the real Redis; keys listed in ``test_keys`` are deleted after
    the test, and the test's consumers stopped first."""
    client = Redis.from_url(redis_url)
    keys: list[str] = []
    client.test_keys = keys  # type: ignore[attr-defined]
    yield client
    for consumer in list(gateway.consumers):
        await gateway.stop_consumer(consumer)
    if keys:
        await client.delete(*keys)
    await client.aclose()
