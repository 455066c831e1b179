"""Broker settings parsing and consumer helpers (pure)."""

from __future__ import annotations

import socket

import pytest

from otpd.aio import backoff_delay
from otpd.netutil import safe_url
from otpd.settings_reader import ConfigError
from otpd.transports.consumer import loose_callback
from tests.support.brokers import broker_settings


def test_defaults_and_presence_enables() -> None:
    s = broker_settings('[amqp]\n[redis]\n[mqtt]\n[ws]\nenabled = false\n')
    assert s.amqp is not None and s.amqp.common.topic == "sms"
    assert s.amqp.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.amqp.common.prefetch == 64 and s.amqp.common.reply_wait is None
    assert s.redis is not None and s.redis.mode == "pubsub" and s.redis.group == "otpd"
    assert s.redis.consumer.startswith("otpd-")
    assert s.mqtt is not None and (s.mqtt.port, s.mqtt.client_id) == (1883, "otpd")
    assert s.ws is not None and not s.ws.common.enabled
    assert broker_settings("").amqp is None


def test_tls_default_port_and_secrets_not_in_repr(tmp_path: object,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_PW", "hunter2")
    key = "sekrit-" * 5
    s = broker_settings('[mqtt]\ntls = true\npassword_env = "MQTT_PW"\nprotocol = 5\n'
                        f'require_signature = true\nsigning_key = "{key}"\n'
                        '[amqp]\nurl = "amqps://u:pw-in-url@rabbit.example:5671/vh"\n'
                        'reply_wait = 0\n')
    assert s.mqtt is not None and s.mqtt.port == 8883 and s.mqtt.password == "hunter2"
    assert s.mqtt.common.signing_key == key and s.mqtt.protocol == 5
    assert s.amqp is not None and s.amqp.common.reply_wait == 0.0
    text = repr(s)
    assert "hunter2" not in text and "sekrit" not in text and "pw-in-url" not in text


def test_errors_name_their_keys() -> None:
    with pytest.raises(ConfigError) as info:
        broker_settings("""
[amqp]
url = "http://x"
prefetch = 0
[redis]
mode = "list"
url = "redis://h:99999/0"
[mqtt]
port = 70000
qos = 1
protocl = 5
require_signature = true
[ws]
url = "ws://h/ws"
signing_key = "password1"
reconnect_min = 10
reconnect_max = 1
topic = ""
""")
    errors = set(info.value.errors)
    assert errors == {
        "amqp.url: must start with amqp:// or amqps://",
        "amqp.prefetch: must be 1..1000",
        "redis.mode: must be one of 'pubsub', 'stream'",
        "redis.url: has an invalid port",
        "mqtt.port: must be 1..65535",
        "mqtt.qos: unknown key",
        "mqtt.protocl: unknown key",
        "mqtt.signing_key: is required when require_signature = true",
        "ws.reconnect_max: must be >= reconnect_min",
        "ws.signing_key: must be at least 32 bytes (random; e.g. `openssl rand -hex 32`)",
        "ws.topic: must be 1..255 printable characters",
    }


def test_backoff_is_capped_exponential_with_jitter() -> None:
    for attempt in range(40):
        delay = backoff_delay(attempt, 1.0, 60.0)
        cap = min(60.0, 2.0 ** attempt)
        assert max(1.0, cap / 2) <= delay <= cap
    assert len({backoff_delay(10, 1.0, 60.0) for _ in range(20)}) > 1


def test_loose_callback_and_safe_url() -> None:
    assert loose_callback(b'{"command":"x","callback_topic":"cb","callback_delay":"70"}') == (
        "cb", 70)
    assert loose_callback(b'{"callback_topic":"cb","callback_delay":99999}') == ("cb", 10000)
    assert loose_callback(b"[]") == (None, 0)
    assert loose_callback(b"\xff") == (None, 0)
    assert safe_url("amqps://user:pw@host:5671/vh?x=1") == "amqps://host:5671/vh"


def test_mqtt_shared_group() -> None:
    plain = broker_settings('[mqtt]\ntopic = "otp/sms"\n').mqtt
    assert plain is not None and plain.shared_group == ""
    assert plain.subscription == "otp/sms" and plain.client_id == "otpd"
    shared = broker_settings('[mqtt]\ntopic = "otp/sms"\nshared_group = "pis"\n').mqtt
    assert shared is not None and shared.subscription == "$share/pis/otp/sms"
    # Nodes of a group must not share a client id (they would take each other's
    # session): the default becomes per host.
    assert shared.client_id == f"otpd-{socket.gethostname()}"
    named = broker_settings('[mqtt]\nshared_group = "pis"\nclient_id = "pi-7"\n').mqtt
    assert named is not None and named.client_id == "pi-7"
    for bad in ("a/b", "a+", "#", "tab\there"):
        with pytest.raises(ConfigError) as info:
            broker_settings(f'[mqtt]\nshared_group = "{bad}"\n')
        assert info.value.errors[0].startswith("mqtt.shared_group: must be 1..255 printable")


def test_a_status_topic_may_not_be_another_tables_command_topic() -> None:
    with pytest.raises(ConfigError) as info:
        broker_settings('[redis]\ntopic = "sms"\n[mqtt]\ntopic = "otp"\nstatus_topic = "sms"\n')
    assert "mqtt.status_topic: is a command topic" in info.value.errors
