"""otpd.grants: grant lists, the USSD allow-list, what get-modem-list hides; and
the grant settings as the configuration reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from otpd.app.settings import parse_settings
from otpd.grants import (
    ALL_GRANTS,
    COMMAND_GRANTS,
    DEFAULT_GRANTS,
    GrantError,
    Grants,
    UssdAllowList,
    grant_for,
    parse_grant_list,
    parse_ussd_allow,
    rest_grant_key,
    without_identity,
)
from otpd.settings_reader import ConfigError
from otpd.wire.protocol import COMMAND_NAMES


def test_every_command_has_a_grant_and_operational_ones_are_not_default() -> None:
    assert {grant_for(name) for name in COMMAND_NAMES} == set(COMMAND_GRANTS)
    expected = {"request-otp", "verify-otp", "send-sms", "send-email", "send-message",
                "block-msisdn", "unblock-msisdn", "echo", "handover"}
    assert expected == DEFAULT_GRANTS
    assert Grants().names == DEFAULT_GRANTS
    assert Grants().allows("send-mail") and not Grants().allows("request-ussd")
    assert not Grants().allows("get-modem-list") and not Grants().allows("modem-identity")
    assert Grants.full().names == ALL_GRANTS


def test_grant_lists_add_and_take_away() -> None:
    assert parse_grant_list([]) == DEFAULT_GRANTS
    assert parse_grant_list(["request-ussd"]) == DEFAULT_GRANTS | {"request-ussd"}
    assert parse_grant_list([" -send-sms", "send-mail"]) == DEFAULT_GRANTS - {"send-sms"}
    assert parse_grant_list(["-send-mail"]) == DEFAULT_GRANTS - {"send-email"}
    assert parse_grant_list(["get-modem-list", "modem-identity"]) == (
        DEFAULT_GRANTS | {"get-modem-list", "modem-identity"})
    assert parse_grant_list(["-request-ussd"]) == DEFAULT_GRANTS  # not a default: nothing to do


@pytest.mark.parametrize(("entries", "text"), [
    (["request_ussd"], "[0] 'request_ussd' is not a grant"),
    (["echo", "all"], "[1] 'all' is not a grant"),
    (["send-sms", "-send-sms"], "send-sms both granted and taken away"),
    (["modem-identity"], "grant that too"),
    (["get-modem-list", "modem-identity", "-get-modem-list"], "both granted"),
])
def test_bad_grant_lists(entries: list[str], text: str) -> None:
    with pytest.raises(GrantError) as caught:
        parse_grant_list(entries)
    assert text in str(caught.value)


DEFAULT_RULE = UssdAllowList()


@pytest.mark.parametrize("code", ["*123#", "*888#", "*100*1#", "*3#", "*123*1*2*3#", "*555#"])
def test_builtin_rule_allows_balance_codes(code: str) -> None:
    assert DEFAULT_RULE.refusal(code) is None


@pytest.mark.parametrize("code", [
    "**21*+15551234567#",  # register call forwarding
    "**21*15551234567#",
    "*21*15551234567#",  # activate it, with a number
    "*21#", "#21#", "##002#", "*#21#",  # activate, deactivate, erase, interrogate
    "*#06#", "**04*1234*5678*5678#", "*43#", "*33*0000#", "*004*0812345678#",
    "*123*+6281234#", "*123*08123456789#",  # a phone number as an argument
    "*363#",  # user-to-user signalling: reserved unless listed
    "*123", "123#", "*123#*", "*1**2#", "*123# ", "", "*12a#", "*123*1*2*3*4#",
    "*" + "1" * 40 + "#",
])
def test_builtin_rule_refuses(code: str) -> None:
    assert DEFAULT_RULE.refusal(code) is not None


def test_configured_patterns() -> None:
    allow = parse_ussd_allow(["*888#", " *100*x# ", "*363#", "*123*0812345678#"])
    assert allow.patterns == ("*888#", "*100*X#", "*363#", "*123*0812345678#")
    for code in ("*888#", "*100*7#", "*363#", "*123*0812345678#"):
        assert allow.refusal(code) is None, code
    for code in ("*123#", "*100*77#", "*100*#", "*8888#", "*888*1#", "**21*+15551234567#"):
        assert allow.refusal(code) is not None, code
    assert parse_ussd_allow([]).refusal("*888#") == "not in the USSD allow-list"


@pytest.mark.parametrize(("pattern", "text"), [
    ("*21*X#", "never allowed"),  # call forwarding, even as a pattern
    ("*004#", "never allowed"),
    ("**21#", "must look like"),
    ("*#06#", "must look like"),
    ("*X#", "must look like"),  # the service code must be written out
    ("*123*+X#", "must look like"),
    ("*123*.#", "must look like"),
    ("*100*XXXXXXX#", "at most 6 X"),
])
def test_bad_patterns(pattern: str, text: str) -> None:
    with pytest.raises(GrantError) as caught:
        parse_ussd_allow(["*888#", pattern])
    assert str(caught.value).startswith(f"[1] {pattern!r}") and text in str(caught.value)


def test_identity_removed_at_any_depth() -> None:
    status = {"m1": {"name": "m1", "imsi": "5101", "imei": "3590", "port": "/dev/ttyUSB0",
                     "signal": {"csq": 18}, "sims": [{"iccid": "8962", "msisdn": "+62812"}]}}
    assert without_identity(status) == {"m1": {"name": "m1", "signal": {"csq": 18},
                                               "sims": [{}]}}


def test_rest_grant_key() -> None:
    assert rest_grant_key("alice") == "server.grants.alice"
    assert rest_grant_key("a.b") == 'server.grants."a.b"'


# -- settings -------------------------------------------------------------------------


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text)
    return caught.value.errors


def test_server_grants_settings() -> None:
    s = parse_settings('[server]\nussd_allow = ["*888#"]\n'
                       '[server.grants]\nalice = ["request-ussd", "-send-sms"]\n')
    alice = s.server.grants_for("alice")
    assert alice.names == (DEFAULT_GRANTS | {"request-ussd"}) - {"send-sms"}
    assert alice.ussd.patterns == ("*888#",) and alice.setting == "server.grants.alice"
    bob = s.server.grants_for("bob")
    assert bob.names == DEFAULT_GRANTS and bob.ussd.patterns == ("*888#",)
    assert bob.setting == "server.grants.bob"
    plain = parse_settings("[server]\n").server.grants_for("alice")
    assert plain.names == DEFAULT_GRANTS and plain.ussd == UssdAllowList()


def test_broker_grants_settings() -> None:
    s = parse_settings('[redis]\ngrants = ["get-modem-list"]\nussd_allow = []\n[mqtt]\n')
    assert s.brokers.redis is not None and s.brokers.mqtt is not None
    redis = s.brokers.redis.common.grants
    assert redis.names == DEFAULT_GRANTS | {"get-modem-list"} and redis.setting == "redis.grants"
    assert redis.ussd.patterns == ()
    mqtt = s.brokers.mqtt.common.grants
    assert mqtt.names == DEFAULT_GRANTS and mqtt.ussd == UssdAllowList()


def test_grant_errors_name_their_key() -> None:
    errors = errors_of('[server]\nussd_allow = ["**21#"]\n'
                       '[server.grants]\nalice = ["request-usd"]\nbob = "echo"\n'
                       '[amqp]\ngrants = ["modem-identity"]\n'
                       '[ws]\ngrants = ["everything"]\nussd_allow = ["*21*X#"]\n')
    joined = "\n".join(errors)
    assert "server.ussd_allow: [0] '**21#': must look like" in joined
    assert "server.grants.alice: [0] 'request-usd' is not a grant" in joined
    assert "server.grants.bob: must be a list of strings" in joined
    assert "amqp.grants: modem-identity only shows in get-modem-list" in joined
    assert "ws.grants: [0] 'everything' is not a grant" in joined
    assert "ws.ussd_allow: [0] '*21*X#'" in joined


def test_check_config_reports_unknown_grants(tmp_path: Path) -> None:
    config = tmp_path / "otpd.toml"
    config.write_text(f'[server]\nusers_file = "{tmp_path / "users"}"\n'
                      '[server.grants]\nops = ["request-ussd", "send-smss"]\n')
    out = subprocess.run([sys.executable, "-m", "otpd", "check-config", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "server.grants.ops: [1] 'send-smss' is not a grant" in out.stderr
