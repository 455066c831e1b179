"""Fixtures for the store tests: each protocol test runs on both backends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from otpd.store import SqliteStore, Store
from otpd.store.redis_state import RedisSharedStore
from tests.support.services import REDIS_URL, require_redis


async def drop_prefix(prefix: str) -> None:
    """Delete a test's Redis keys."""
    client = Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = await SqliteStore.open(tmp_path / "otpd.db")
        yield s
        await s.close()
        return
    await require_redis()
    prefix = f"otpd-test-{uuid.uuid4().hex}:"
    s = await RedisSharedStore.open(tmp_path / "otpd.db", REDIS_URL, prefix, 3600, 86400)
    yield s
    await s.close()
    await drop_prefix(prefix)
