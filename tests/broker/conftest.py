"""Fixtures for the broker tests: a users file, a running broker, raw clients."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from otpd.aio import within
from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerConfig, BrokerServer

PASSWORDS = {"alice": "alice-pw", "bob": "b:o:b", "kamshory": "kamshory"}


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    lines = [f"{user}:{hash_password(pw, cost=4)}" for user, pw in PASSWORDS.items()]
    lines.append("plain:plain-pw")  # plaintext: must be refused
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def acl_file(tmp_path: Path) -> Path:
    """Every user of :data:`PASSWORDS` may publish and subscribe anywhere (the
    relay and handshake tests); test_broker_acl.py writes its own files."""
    path = tmp_path / "acl"
    # carol: added to the users file by a test while the broker runs.
    path.write_text("".join(f"{user} pubsub=*\n" for user in [*PASSWORDS, "carol"]))
    return path


@pytest.fixture
def config(users_file: Path, acl_file: Path) -> BrokerConfig:
    return BrokerConfig(htpasswd=users_file, acl=acl_file, port=0)


MakeBroker = Callable[..., Awaitable[BrokerServer]]


@pytest.fixture
async def make_broker(config: BrokerConfig) -> AsyncIterator[MakeBroker]:
    """Start a broker with some settings changed; stopped after the test."""
    started: list[BrokerServer] = []

    async def factory(**changes: Any) -> BrokerServer:
        broker = BrokerServer(replace(config, **changes))
        await broker.start()
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        await broker.stop()


@pytest.fixture
async def broker(make_broker: MakeBroker) -> BrokerServer:
    return await make_broker()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def client(
    broker: BrokerServer,
    topic: str | None = "sms",
    user: str = "alice",
    password: str | None = None,
    path: str = "/ws",
    **kwargs: Any,
) -> connect:
    query = f"?topic={topic}" if topic is not None else ""
    headers: dict[str, str] = {}
    if user:
        headers["Authorization"] = basic(
            user, PASSWORDS.get(user, "") if password is None else password
        )
    return connect(
        f"ws://127.0.0.1:{broker.port}{path}{query}",
        additional_headers=headers,
        open_timeout=5,
        **kwargs,
    )


async def recv_text(ws: ClientConnection, timeout: float = 5.0) -> str:
    message = await within(timeout, ws.recv())
    assert isinstance(message, str)
    return message


async def assert_silent(ws: ClientConnection, timeout: float = 0.2) -> None:
    """Nothing arrives within ``timeout``."""
    with pytest.raises(TimeoutError):
        await within(timeout, ws.recv())


# -- a raw client that behaves like OTP-Publisher's PHP WSClient -------------


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked frame as a client must send it (RFC 6455 §5.2)."""
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([0x80 | n])
    elif n < 1 << 16:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A hand-written WebSocket client: exactly the bytes we choose, no close
    handshake, no automatic pong."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.head = b""

    @classmethod
    async def open(
        cls,
        port: int,
        target: str,
        authorization: str | None,
        *,
        rcvbuf: int | None = None,
    ) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        self = cls(reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if authorization is not None:
            lines.append(f"Authorization: {authorization}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        self.head = await within(5, reader.readuntil(b"\r\n\r\n"))
        self.status = int(self.head.split(b" ", 2)[1])
        return self

    async def send_text(self, text: str) -> None:
        self.writer.write(masked_frame(text.encode()))
        await self.writer.drain()

    def abort(self) -> None:
        """Close TCP without a close frame, like the PHP client."""
        self.writer.close()

    async def wait_eof(self, timeout: float = 5.0) -> None:
        """Read (and discard) until the server closes the connection."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
