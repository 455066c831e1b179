"""Fixtures for the publisher library tests: a running daemon (simulated modem,
SMTP sink) consuming one method on a unique topic, and client configurations
pointing at it (``Gateway.client``). RabbitMQ, Redis and Mosquitto on
localhost; ``otpd broker`` started in the test for WebSocket. A missing service
skips (fails with OTPD_REQUIRE_SERVICES=1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from otpd.channels.sms.simulator import ModemSimulator
from tests.support.brokers import start_ws_broker, unique
from tests.support.client_config import WS_PASSWORD, WS_USER, cleanup_topic, daemon_broker_block
from tests.support.daemon import (
    API_USER,
    SMS_QUICK,
    modem_table,
    modems_ready,
    start_daemon,
    write_config,
)
from tests.support.gateway import Gateway, MakeGateway
from tests.support.mail import SmtpServer
from tests.support.services import require_redis, require_service
from tests.support.waiting import wait_until


@pytest.fixture
async def redis_url() -> str:
    return await require_redis()


@pytest.fixture
def broker_accounts() -> dict[str, str]:
    return {WS_USER: WS_PASSWORD}  # the daemon's and the client's


@pytest.fixture
async def make_gateway(tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession,
                       users: Path) -> AsyncIterator[MakeGateway]:
    """Start a daemon consuming one method (``broker_extra``: more keys for its table)."""
    started: list[Gateway] = []

    async def factory(method: str, broker_extra: str = "", otp_lines: str = "") -> Gateway:
        await require_service(method)
        topic = unique(method)
        broker = await start_ws_broker(users) if method == "ws" else None
        ws_port = broker.port if broker is not None else None
        home = tmp_path / f"gw{len(started)}"
        home.mkdir()
        sim = ModemSimulator(home / "modem", name="sim1", seed=1, store_sent=True)
        await sim.start()
        # The client's get_modem_list needs that grant (REST user and broker consumer).
        grant = '["get-modem-list"]'
        extra = (modem_table("sim1", home / "modem") + SMS_QUICK
                 + daemon_broker_block(method, topic, ws_port, f"grants = {grant}\n" + broker_extra)
                 + f"[server.grants]\n{API_USER} = {grant}\n")
        config = write_config(home, extra, smtp_port=smtp.port, wait=5, otp_lines=otp_lines)
        run = await start_daemon(config, session)
        gw = Gateway(run, smtp, sim, method=method, topic=topic, broker=broker,
                     ws_port=ws_port)
        started.append(gw)
        if method != "rest":
            await wait_until(lambda: all(c.connected for c in run.daemon.consumers), 10,
                             f"{method} consumer connected")
        await modems_ready(run, timeout=7.5)
        return gw

    yield factory
    for gw in started:
        await gw.close()
        await cleanup_topic(gw.method, gw.topic)
