"""What talking to a broker needs: names, envelopes, ``otpd broker`` accounts
and topic permissions, broker settings as the daemon parses them."""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerConfig, BrokerServer
from otpd.broker.server import ACL_FILE_NAME
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


# Topic permissions of the suites' brokers. The suites use random topic names,
# so their accounts may do anything; tests/broker/test_broker_acl.py checks
# the daemon/app separation of etc/broker.acl.example.
ALLOW_ALL_ACL = "* pubsub=*\n"


def broker_acl(users: Path, rules: str | None = None) -> Path:
    """Write ``rules`` (default :data:`ALLOW_ALL_ACL`) to the ACL file next to
    the htpasswd file ``users``, where ``otpd broker`` looks by default."""
    path = users.parent / ACL_FILE_NAME
    path.write_text(ALLOW_ALL_ACL if rules is None else rules)
    return path


def broker_users(path: Path, accounts: dict[str, str] | None = None) -> Path:
    """An htpasswd file for ``otpd broker`` (default: :data:`ACCOUNTS`), and
    next to it an ACL file letting every account do anything."""
    path.write_text("".join(f"{user}:{hash_password(password, cost=4)}\n"
                            for user, password in (accounts or ACCOUNTS).items()))
    broker_acl(path)
    return path


async def start_ws_broker(users: Path, port: int = 0) -> BrokerServer:
    """An ``otpd broker`` (WebSocket message broker) for ``users`` (0: a free
    port), with the ACL file next to ``users`` (allow-all if there is none)."""
    if not (users.parent / ACL_FILE_NAME).exists():
        broker_acl(users)
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
