"""Fixtures of the fault-injection suite: the shared brokers (skip-or-fail when
absent) and Redis and Mosquitto servers of the test's own, on spare ports, to
restart. The suite's helpers are in ``tests.faults.helpers`` and ``tests.support``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import processes
from tests.support.processes import Process
from tests.support.services import (
    RABBIT_URL,
    REDIS_URL,
    require_mosquitto,
    require_rabbit,
    require_redis,
)


@pytest.fixture
async def rabbit_url() -> str:
    # Another suite may bounce the shared RabbitMQ for a moment: require_rabbit waits.
    return await require_rabbit(RABBIT_URL)


@pytest.fixture
async def redis_url() -> str:
    return await require_redis(REDIS_URL)


@pytest.fixture
def mqtt_broker() -> tuple[str, int]:
    return require_mosquitto()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Process]:
    yield from processes.own_redis(tmp_path)


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Process]:
    yield from processes.own_mosquitto(tmp_path)
