"""``otpd check-config`` warnings: secrets in a readable file, credentials in clear."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otpd.app.config_warnings import clear_credentials, config_warnings, inline_secrets
from otpd.app.settings import parse_settings

CLEAR = """
[[smtp]]
host = "mail.example.net"
sender = "otp@example.net"
username = "u"
password = "p"
security = "none"

[amqp]
url = "amqp://otpd:secret@rabbit.example.net/"

[redis]
url = "redis://cache.example.net:6379/0"
password = "p"

[ws]
url = "ws://broker.example.net:9000/ws"
username = "otpd"
password = "p"

[mqtt]
host = "mqtt.example.net"
username = "u"
password = "p"

[store]
backend = "redis"
redis_url = "redis://:p@state.example.net/0"
"""


def test_every_password_sent_in_clear_to_a_remote_host_is_named() -> None:
    warnings = clear_credentials(parse_settings(CLEAR))
    keys = sorted(w.split(":")[0] for w in warnings)
    assert keys == ["amqp.url", "mqtt.tls", "redis.url", "smtp[0].security",
                    "store.redis_url", "ws.url"]
    assert not any("secret" in w for w in warnings), "a warning must not quote the password"


@pytest.mark.parametrize("safe", [
    CLEAR.replace('security = "none"', 'security = "starttls"').replace("amqp://", "amqps://")
    .replace("redis://cache", "rediss://cache").replace("ws://", "wss://")
    .replace('[mqtt]\n', '[mqtt]\ntls = true\n').replace("redis://:p", "rediss://:p"),
    # Loopback hosts: nothing crosses a network.
    CLEAR.replace("mail.example.net", "127.0.0.1").replace("rabbit.example.net", "localhost")
    .replace("cache.example.net", "[::1]").replace("broker.example.net", "127.0.0.1")
    .replace("mqtt.example.net", "127.0.0.1").replace("state.example.net", "127.0.0.1"),
])
def test_tls_or_loopback_is_not_warned_about(safe: str) -> None:
    assert clear_credentials(parse_settings(safe)) == []


def test_no_password_no_warning() -> None:
    text = '[ws]\nurl = "ws://broker.example.net:9000/ws"\n[amqp]\nurl = "amqp://broker.example.net/"\n'
    assert clear_credentials(parse_settings(text)) == []


def test_every_secret_bearing_key_counts_for_the_world_readable_warning(tmp_path: Path) -> None:
    text = CLEAR + '\n[otp]\ncountry_code = "62"\n'
    text = text.replace("[redis]\n", '[redis]\nsigning_key = "0123456789abcdef0123456789abcdef"\n')
    found = inline_secrets(parse_settings(text).raw)
    assert {"smtp[0].password", "amqp.url", "redis.password", "redis.signing_key",
            "ws.password", "mqtt.password", "store.redis_url"} <= set(found)
    assert "ws.url" not in found  # no password in it
    config = tmp_path / "otpd.toml"
    config.write_text(text)
    os.chmod(config, 0o644)
    warnings = config_warnings(parse_settings(text), config)
    assert any("world-readable" in w and "redis.signing_key" in w for w in warnings)
    os.chmod(config, 0o640)
    assert not any("world-readable" in w for w in config_warnings(parse_settings(text), config))
