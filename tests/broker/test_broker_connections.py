"""`otpd broker` connection caps: per client address (group) and in total, applied
before the HTTP upgrade, with real sockets; throttled log lines; the CLI options."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from otpd.aio import within
from otpd.broker import BrokerConfig, BrokerServer
from otpd.broker.admission import Admission, connection_limits
from otpd.connection_caps import ConnectionCaps
from tests.support.waiting import wait_until

from .conftest import MakeBroker, client, recv_text

UPGRADE = (b"GET /ws?topic=sms HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


async def answer_of(broker: BrokerServer, local: str = "127.0.0.1") -> bytes:
    """What the broker sends to a raw upgrade request from ``local`` before it closes
    the connection (b"": nothing, not even an HTTP status line)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port,
                                                   local_addr=(local, 0))
    data = b""
    try:
        writer.write(UPGRADE)
        await writer.drain()
        data = await within(5, reader.read())  # to EOF
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return data


def from_address(broker: BrokerServer, local: str, **kwargs: Any) -> Any:
    return client(broker, local_addr=(local, 0), **kwargs)


def open_count(broker: BrokerServer) -> int:
    assert broker.admission is not None
    return broker.admission.caps.open


async def test_per_address_cap_resets_before_http(make_broker: MakeBroker,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="otpd.broker")
    broker = await make_broker(max_connections=10, max_connections_per_address=2)
    async with client(broker) as a, client(broker, user="bob") as b:
        assert await answer_of(broker) == b""
        assert await answer_of(broker) == b""
        # Another address is not affected: it connects, authenticates and relays.
        async with from_address(broker, "127.0.0.2") as other:
            await wait_until(lambda: broker.clients == 3)
            await other.send("hello")
            assert await recv_text(a) == "hello"
            assert await recv_text(b) == "hello"
        assert broker.admission is not None
        assert broker.admission.stats()["refused_per_address"] == 2
    # The first refusal is logged at once, the rest of the burst later with its count.
    refused = [r.getMessage() for r in caplog.records if "over the caps" in r.getMessage()]
    assert refused == ["refused 1 connection(s) over the caps (2 per address, 10 in all);"
                       " the latest from 127.0.0.1"]
    await broker.stop()
    refused = [r.getMessage() for r in caplog.records if "over the caps" in r.getMessage()]
    assert refused[1:] == ["refused 1 connection(s) over the caps (2 per address, 10 in all);"
                           " the latest from 127.0.0.1"]


async def test_closed_connections_free_their_slots(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_connections=10, max_connections_per_address=2)
    first = client(broker)
    ws: ClientConnection = await first.__aenter__()
    async with client(broker, user="bob"):
        assert open_count(broker) == 2
        assert await answer_of(broker) == b""
        await first.__aexit__(None, None, None)
        await wait_until(lambda: open_count(broker) == 1)
        assert ws.close_code == 1000
        async with client(broker) as again:
            await again.send("back")
        # Refused handshakes (401) give their slot back too.
        assert b" 401 " in await answer_of(broker)
    await wait_until(lambda: open_count(broker) == 0)


async def test_total_cap(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_connections=2, max_connections_per_address=2)
    async with client(broker), from_address(broker, "127.0.0.2"):
        assert await answer_of(broker, "127.0.0.3") == b""
        assert broker.admission is not None
        assert broker.admission.stats()["refused_total"] == 1
    await wait_until(lambda: open_count(broker) == 0)
    async with from_address(broker, "127.0.0.3"):
        pass


async def test_accept_errors_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="otpd.broker")
    admission = Admission(ConnectionCaps(10, 2))
    loop = asyncio.get_running_loop()
    context = {"message": "socket.accept() out of system resource",
               "exception": OSError(24, "Too many open files")}
    for _ in range(5):
        admission.exception_handler(loop, context)
    lines = [r.getMessage() for r in caplog.records if "accept()" in r.getMessage()]
    assert len(lines) == 1 and "(1 times since the last report)" in lines[0]
    assert admission.stats()["accept_errors"] == 5


def test_limits_follow_the_descriptor_limit() -> None:
    assert (connection_limits(None, None, nofile=1024).total,
            connection_limits(None, None, nofile=1024).per_address) == (768, 64)
    small = connection_limits(None, None, nofile=256)
    assert (small.total, small.per_address) == (192, 48)
    lowered = connection_limits(5000, None, nofile=256)
    assert lowered.total == 192 and lowered.notes


def test_settings_validated(config: BrokerConfig) -> None:
    assert replace(config, max_connections=0).validate() == [
        "max_connections must be at least 1"]
    assert replace(config, max_connections_per_address=0).validate() == [
        "max_connections_per_address must be at least 1"]
    assert replace(config, max_connections=5, max_connections_per_address=6).validate() == [
        "max_connections_per_address must not exceed max_connections"]
