"""Shared fixtures: a real SMTP sink (aiosmtpd), config files and a running daemon."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
from aiosmtpd.controller import Controller

from otpd.app.daemon import Daemon
from otpd.app.settings import Settings, parse_settings
from otpd.auth.htpasswd import set_user

API_USER = "app"
# The services on the development and CI machines.
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
API_PASSWORD = "s3cret:with:colons"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SmtpSink:
    """aiosmtpd handler that keeps every message it receives."""

    messages: list[Message] = field(default_factory=list)
    reject_with: str | None = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if self.reject_with:
            return self.reject_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 Message accepted"


@dataclass
class SmtpServer:
    sink: SmtpSink
    port: int
    controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(SmtpSink(), free_port())
    server.start()
    yield server
    server.stop()


def write_config(tmp_path: Path, extra: str = "", *, smtp_port: int | None = None,
                 wait: float = 5, rest_port: int | None = None, otp_lines: str = "",
                 limits: str = "enabled = false") -> Path:
    users = tmp_path / "users"
    if not users.exists():
        set_user(users, API_USER, API_PASSWORD, cost=4)
    smtp_block = ""
    if smtp_port is not None:
        smtp_block = textwrap.dedent(f"""
            [[smtp]]
            name = "local"
            host = "127.0.0.1"
            port = {smtp_port}
            security = "none"
            sender = "OTP Gateway <otp@example.com>"
            timeout = 5
        """)
    text = textwrap.dedent(f"""
        [server]
        listen = "127.0.0.1:{rest_port or free_port()}"
        users_file = "{users}"

        [store]
        path = "{tmp_path / 'otpd.db'}"

        [otp]
        key_file = "{tmp_path / 'otp.key'}"
        country_code = "62"
        {otp_lines}

        [delivery]
        wait = {wait}
        retry_base = 0.2
        retry_max = 0.5

        [limits]
        {limits}

        [control]
        socket = "{tmp_path / 'control.sock'}"
    """) + smtp_block + textwrap.dedent(extra)
    path = tmp_path / "otpd.toml"
    path.write_text(text)
    return path


def load(path: Path) -> Settings:
    return parse_settings(path.read_text(), path)


class Client:
    """Minimal REST client speaking the wire protocol."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, command: str, data: dict[str, Any], *, path: str = "/api/otp",
                   user: str = API_USER, password: str = API_PASSWORD,
                   raw: bytes | None = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any]]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        hdrs = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        hdrs.update(headers or {})
        body = raw if raw is not None else json.dumps({"command": command, "data": data}).encode()
        async with self.session.post(self.base + path, data=body, headers=hdrs) as resp:
            return resp.status, await resp.json(content_type=None)


@dataclass
class Running:
    daemon: Daemon
    client: Client
    config: Path


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def start_daemon(config: Path, session: aiohttp.ClientSession) -> Running:
    daemon = Daemon(load(config))
    await daemon.start()
    assert daemon.rest is not None
    client = Client(session, f"http://127.0.0.1:{daemon.rest.port}")
    return Running(daemon, client, config)


def services_required() -> bool:
    return os.environ.get("OTPD_REQUIRE_SERVICES") == "1"


def service_unreachable(what: str, exc: BaseException | None = None) -> NoReturn:
    """A broker the test needs is absent: skip on a user's machine, fail in CI."""
    message = f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what
    if services_required():
        pytest.fail(message)
    pytest.skip(message)


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
