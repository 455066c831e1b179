"""What talking to a broker needs: names, envelopes, ``otpd broker`` accounts,
broker settings as the daemon parses them."""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerConfig, BrokerServer
from otpd.settings_reader import ConfigError, Section
from otpd.transports.settings import BrokerSettings, parse_broker_settings

# ``otpd broker`` accounts: otpd's own, and OTP-Publisher's (which sends its
# user name as the password).
OTPD_USER, OTPD_PASSWORD = "otpd", "pi:pass"
APP_USER = "kamshory"
ACCOUNTS = {OTPD_USER: OTPD_PASSWORD, APP_USER: APP_USER}

# Fast reconnects, so a restart or a kill is noticed and healed quickly.
BROKER_FAST = """
reconnect_min = 0.1
reconnect_max = 0.5
retry_delay = 0.1
"""


def unique(prefix: str = "t") -> str:
    """A topic, queue or client id of this test alone."""
    return f"otpd-test-{prefix}-{uuid.uuid4().hex[:12]}"


def receiver() -> str:
    """A fresh e-mail address."""
    return f"user-{uuid.uuid4().hex[:10]}@example.org"


def command(name: str, data: dict[str, Any], **top: Any) -> bytes:
    """An envelope as OTP-Publisher builds it (date_time always set)."""
    data = {"date_time": int(time.time()), **data}
    return json.dumps({"command": name, "data": data, **top}).encode()


def broker_users(path: Path, accounts: dict[str, str] | None = None) -> Path:
    """An htpasswd file for ``otpd broker`` (default: :data:`ACCOUNTS`)."""
    path.write_text("".join(f"{user}:{hash_password(password, cost=4)}\n"
                            for user, password in (accounts or ACCOUNTS).items()))
    return path


async def start_ws_broker(users: Path, port: int = 0) -> BrokerServer:
    """An ``otpd broker`` (WebSocket message broker) for ``users`` (0: a free port)."""
    server = BrokerServer(BrokerConfig(htpasswd=users, port=port))
    await server.start()
    return server


def broker_settings(toml: str) -> BrokerSettings:
    errors: list[str] = []
    root = Section(tomllib.loads(toml), "", errors)
    settings = parse_broker_settings(root.section("amqp"), root.section("redis"),
                                     root.section("mqtt"), root.section("ws"))
    root.finish()
    if errors:
        raise ConfigError(errors)
    return settings
