"""Fixtures of every suite: a real SMTP sink (aiosmtpd), an HTTP session and an
``otpd broker``. The code behind them, and what tests import, is in ``tests.support``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from otpd.broker import BrokerServer
from tests.support.brokers import ACCOUNTS, broker_users, start_ws_broker
from tests.support.daemon import free_port
from tests.support.mail import SmtpServer, SmtpSink


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(SmtpSink(), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def broker_accounts() -> dict[str, str]:
    """The ``otpd broker`` accounts (user: password); a suite may override it."""
    return ACCOUNTS


@pytest.fixture
def users(tmp_path: Path, broker_accounts: dict[str, str]) -> Path:
    return broker_users(tmp_path / "broker-users", broker_accounts)


@pytest.fixture
async def broker(users: Path) -> AsyncIterator[BrokerServer]:
    """An ``otpd broker`` (WebSocket message broker) on a free port."""
    server = await start_ws_broker(users)
    yield server
    await server.stop()
