"""Login throttling of ``otpd broker``: the same gate as the REST API
(otpd/auth/login_gate.py), counted before the password check."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from otpd.auth.htpasswd import HtpasswdFile
from otpd.broker import BrokerServer
from tests.broker.conftest import MakeBroker, client


async def handshake_status(broker: BrokerServer, **kwargs: Any) -> int:
    try:
        async with client(broker, **kwargs):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_concurrent_wrong_passwords_are_counted_before_the_check(
        make_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    checks = 0
    real = HtpasswdFile.verify_async

    async def counted(self: HtpasswdFile, user: str, password: str) -> bool:
        nonlocal checks
        checks += 1
        return await real(self, user, password)

    monkeypatch.setattr(HtpasswdFile, "verify_async", counted)
    # 100 at once from 127.0.0.1: above the default per-address connection cap.
    broker = await make_broker(login_failures_max=10, max_connections=200,
                               max_connections_per_address=200)
    caplog.set_level(logging.WARNING)
    statuses = await asyncio.gather(*(handshake_status(broker, password="wrong")
                                      for _ in range(100)))
    assert checks <= 20, f"{checks} password checks for one address"
    assert statuses.count(429) >= 80 and set(statuses) <= {401, 429}
    # Each failure checked is logged, with the user but never the password.
    failed = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert failed and all("alice" in m and "wrong" not in m for m in failed)
    # The address stays refused, even with the right password now.
    assert await handshake_status(broker) == 429


async def test_a_right_password_is_not_counted(make_broker: MakeBroker) -> None:
    broker = await make_broker(login_failures_max=3)
    for _ in range(10):
        assert await handshake_status(broker) == 101
    assert await handshake_status(broker, password="wrong") == 401
