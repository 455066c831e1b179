"""A daemon for a test: its configuration file, its REST client, started in-process."""

from __future__ import annotations

import base64
import json
import random
import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from otpd.app.daemon import Daemon
from otpd.app.settings import Settings, parse_settings
from otpd.auth.htpasswd import set_user
from tests.support.waiting import wait_until

API_USER = "app"
API_PASSWORD = "s3cret:with:colons"

# Quick modem retries and probes (the [sms] table), for a simulated modem.
SMS_QUICK = """
[sms]
retry_delay = 0.2
probe_interval = 0.3
"""
# Also quick to notice a modem back and to refresh its state (the fault suite).
SMS_FAST = SMS_QUICK + """max_probe_interval = 1
refresh_interval = 0.5
"""


def phone_number() -> tuple[str, str]:
    """A fresh Indonesian mobile number: (as an app writes it, as the modem sees it)."""
    digits = f"{random.randrange(10**8):08d}"
    return f"0812{digits}", f"+62812{digits}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def modem_table(name: str, port: Path, prefixes: str = "[]", *,
                prompt_timeout: float = 2) -> str:
    """A [[modem]] table (a simulated modem's pseudo-terminal at ``port``)."""
    return textwrap.dedent(f"""
        [[modem]]
        name = "{name}"
        port = "{port}"
        prefixes = {prefixes}
        command_timeout = 1
        prompt_timeout = {prompt_timeout:g}
        send_timeout = 2
    """)


def core_tables(state: Path, port: int | None, otp: str = "") -> str:
    """The [server] (REST on ``port``; None: off), [store], [otp] (plus ``otp``
    lines) and [control] tables of a daemon keeping its files in ``state``."""
    users = state / "users"
    server = (f'listen = "127.0.0.1:{port}"\nusers_file = "{users}"'
              if port is not None else "enabled = false")
    return (f"[server]\n{server}\n"
            f"[store]\npath = \"{state / 'otpd.db'}\"\n"
            f"[otp]\nkey_file = \"{state / 'otp.key'}\"\n{otp}\n"
            f"[control]\nsocket = \"{state / 'control.sock'}\"\n")


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
    text = core_tables(tmp_path, rest_port or free_port(),
                       f'country_code = "62"\n{otp_lines}') + textwrap.dedent(f"""
        [delivery]
        wait = {wait}
        retry_base = 0.2
        retry_max = 0.5

        [limits]
        {limits}
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


async def start_daemon(config: Path, session: aiohttp.ClientSession) -> Running:
    daemon = Daemon(load(config))
    await daemon.start()
    assert daemon.rest is not None
    client = Client(session, f"http://127.0.0.1:{daemon.rest.port}")
    return Running(daemon, client, config)


async def modems_ready(run: Running, count: int = 1, timeout: float = 10.0) -> None:
    """Until ``count`` modems say ready (the daemon's status: get-modem-list needs a grant)."""

    async def ready() -> bool:
        modems = run.daemon.status().get("channels", {}).get("sms", {}).get("modems", [])
        return bool(sum(m.get("state") == "ready" for m in modems) >= count)

    await wait_until(ready, timeout, f"{count} modem(s) ready", interval=0.05)
