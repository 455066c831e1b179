"""Client configuration: defaults, every key, errors naming their key, secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import otpd.client.config as config_module
from otpd.client import load_client_config, parse_client_config
from otpd.client.config import default_config_path
from otpd.settings_reader import ConfigError


def example_toml() -> str:
    """The example in the module docstring (what etc/otpd-client.example.toml holds)."""
    doc = config_module.__doc__ or ""
    start = doc.index("    # otpd client:")
    return "\n".join(line[4:] for line in doc[start:].splitlines())


def test_defaults() -> None:
    c = parse_client_config("")
    assert c.method == "rest" and c.timeout == 30 and not c.wait_result
    assert c.rest.url == "http://127.0.0.1:8899/api/otp"
    assert c.amqp.topic == c.redis.topic == c.mqtt.topic == c.ws.topic == "sms"
    assert not c.manage_otp.enabled and c.manage_otp.length == 6


def test_documented_example_is_valid(tmp_path: Path) -> None:
    text = example_toml()
    key = tmp_path / "client-otp.key"
    key.write_text("k" * 40 + "\n")
    rest_pass = tmp_path / "rest.pass"
    rest_pass.write_text("pw:with:colons\n")
    text = (text.replace("/etc/otpd/client-otp.key", str(key))
            .replace("/etc/otpd/client-rest.pass", str(rest_pass)))
    path = tmp_path / "client.toml"
    path.write_text(text)
    c = load_client_config(path)
    assert c.rest.password == "pw:with:colons" and c.manage_otp.secret_key == "k" * 40
    assert c.source == path
    # Every key of the example is one the parser reads (unknown keys are errors).
    assert load_client_config(path, "mqtt").method == "mqtt"
    for table in ("client", "manage_otp", "rest", "amqp", "redis", "mqtt", "ws"):
        assert f"[{table}]" in text


def test_errors_name_their_keys() -> None:
    with pytest.raises(ConfigError) as info:
        parse_client_config("""
            [client]
            method = "smoke"
            timeout = -1
            colour = "blue"
            [rest]
            url = "ftp://x"
            [redis]
            mode = "list"
            [mqtt]
            topic = "a/#"
            qos = 2
            [ws]
            url = "http://nope"
            [manage_otp]
            enabled = true
            country_code = "+62"
            [extra]
        """)
    errors = info.value.errors
    expected = [
        "client.method: must be one of",
        "client.timeout: must be 0.1..3600",
        "client.colour: unknown key",
        "rest.url: must start with http:// or https://",
        "redis.mode: must be one of",
        "mqtt.topic: must not contain MQTT wildcards",
        "mqtt.qos: must be 0..1",
        "ws.url: must start with ws:// or wss://",
        "manage_otp.secret_key: is required when enabled = true",
        "manage_otp.country_code: must be 1 to 3 digits",
        "extra: unknown key",
    ]
    for prefix in expected:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)


def test_secrets_from_env_and_short_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTPD_TEST_SIGNING", "from-the-env")
    c = parse_client_config('[client]\nsigning_key_env = "OTPD_TEST_SIGNING"\n')
    assert c.signing_key == "from-the-env"
    assert "from-the-env" not in repr(c)
    with pytest.raises(ConfigError, match=re.escape("manage_otp.secret_key: must have at least")):
        parse_client_config('[manage_otp]\nsecret_key = "short"\n')
    with pytest.raises(ConfigError, match=r"client\.signing_key_env: environment variable"):
        parse_client_config('[client]\nsigning_key_env = "OTPD_TEST_NOT_SET_ANYWHERE"\n')


def test_method_override_and_default_path(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    c = parse_client_config('[client]\nmethod = "ws"\n')
    assert c.with_method("amqp").method == "amqp"
    with pytest.raises(ConfigError, match=r"client\.method"):
        c.with_method("fax")
    monkeypatch.setenv("OTPD_CLIENT_CONFIG", str(tmp_path / "c.toml"))
    assert default_config_path() == tmp_path / "c.toml"
    with pytest.raises(ConfigError, match="cannot read"):
        load_client_config(tmp_path / "c.toml")
    (tmp_path / "bad.toml").write_text("[client\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_client_config(tmp_path / "bad.toml")


def test_deeply_nested_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_client_config("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
