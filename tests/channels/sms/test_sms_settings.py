"""[[modem]] / [sms] configuration parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otpd.channels.sms.settings import ModemSettings, SmsSettings, parse_sms_settings
from otpd.settings_reader import Section


def parse(data: dict[str, Any]) -> tuple[SmsSettings, list[str]]:
    errors: list[str] = []
    root = Section(data, "", errors)
    result = parse_sms_settings(root.sections("modem"), root.section("sms"), "62")
    return result, errors


def test_defaults_and_canonical_prefixes() -> None:
    settings, errors = parse({"modem": [{"name": "m1", "port": "/dev/ttyUSB0",
                                         "prefixes": ["0812", "+62 857", "62813"]}]})
    assert errors == []
    (m,) = settings.modems
    assert m == ModemSettings(name="m1", port="/dev/ttyUSB0", prefixes=("+62812", "+62857",
                                                                        "+62813"))
    assert (m.baud, m.max_parts, m.delete_sent, m.read_inbox, m.enabled) == (
        115200, 6, True, False, True)
    assert settings.retry_delay == 5.0 and settings.max_failures_before_reset == 3


def test_all_keys_and_sms_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n")
    monkeypatch.setenv("MODEM_PIN", "5678")
    settings, errors = parse({
        "modem": [
            {"name": "a", "port": "/dev/a", "baud": 9600, "pin_file": str(pin_file),
             "enabled": False, "max_parts": 3, "delivery_reports": False, "prompt_timeout": 5,
             "send_timeout": 30.5, "command_timeout": 2, "init_commands": ["AT^CURC=0"],
             "delete_sent": False, "read_inbox": True, "storage": "ME"},
            {"name": "b", "port": "/dev/b", "pin_env": "MODEM_PIN"},
        ],
        "sms": {"retry_delay": 1, "probe_interval": 2, "max_probe_interval": 60,
                "max_failures_before_reset": 5, "refresh_interval": 30,
                "not_ready_timeout": 10, "cpin_grace": 1},
    })
    assert errors == []
    a, b = settings.modems
    assert (a.pin, b.pin) == ("1234", "5678")
    assert a.init_commands == ("AT^CURC=0",) and a.storage == "ME" and not a.enabled
    assert (a.prompt_timeout, a.send_timeout, a.max_parts) == (5.0, 30.5, 3)
    assert (settings.retry_delay, settings.probe_interval, settings.max_failures_before_reset) == (
        1.0, 2.0, 5)
    assert "1234" not in repr(a)  # the PIN stays out of reprs (and so out of logs)


@pytest.mark.parametrize(
    ("modem", "expected"),
    [
        ({"port": "/dev/x"}, "modem[0].name: is required"),
        ({"name": "m"}, "modem[0].port: is required"),
        ({"name": "m", "port": "/dev/x", "baud": 1234}, "modem[0].baud: must be one of 1200"),
        ({"name": "m", "port": "/dev/x", "pin": "12ab"}, "modem[0].pin: must be 4 to 8 digits"),
        ({"name": "m", "port": "/dev/x", "prefixes": ["08x"]}, "modem[0].prefixes[0]: prefix"),
        ({"name": "m", "port": "/dev/x", "init_commands": ["AT+X\rATZ"]},
         "modem[0].init_commands[0]: command contains control"),
        ({"name": "m", "port": "/dev/x", "max_parts": 0}, "modem[0].max_parts: must be 1..255"),
        ({"name": "m", "port": "/dev/x", "bogus": 1}, "modem[0].bogus: unknown key"),
        ({"name": "m", "port": "/dev/x", "storage": "XX"}, "modem[0].storage: must be one of"),
        ({"name": "m", "port": "/dev/x", "pin": "1234", "pin_env": "X"},
         "modem[0].pin: give only one of pin, pin_env"),
    ],
)
def test_errors_name_the_key(modem: dict[str, Any], expected: str) -> None:
    _, errors = parse({"modem": [modem]})
    assert any(e.startswith(expected) for e in errors), errors
    assert not any("12ab" in e for e in errors)  # a bad PIN is never echoed


def test_duplicate_names_and_unknown_sms_key() -> None:
    _, errors = parse({
        "modem": [{"name": "m1", "port": "/dev/a"}, {"name": "m1", "port": "/dev/b"}],
        "sms": {"retry_dealy": 3, "probe_interval": -1},
    })
    assert 'modem[1].name: duplicate modem name "m1"' in errors
    assert "sms.retry_dealy: unknown key" in errors
    assert any(e.startswith("sms.probe_interval: must be") for e in errors)


def test_no_modems() -> None:
    settings, errors = parse({})
    assert settings == SmsSettings() and errors == []


def test_filter_keys() -> None:
    from otpd.channels.sms.sim_health import HealthSettings

    s, errors = parse({"sms": {}})
    assert not errors and s.health == HealthSettings()
    assert s.health.enabled and s.health.min_sample == 20 and s.health.recover_probes == 2
    s, errors = parse({"sms": {"filter_check": False, "filter_min_sample": 50,
                               "filter_relative": 0.3, "filter_floor": 0.1,
                               "filter_probe_interval": 60, "filter_max_probe_interval": 600,
                               "filter_recover_probes": 3}})
    assert not errors
    assert s.health == HealthSettings(False, 50, 0.3, 0.1, 60.0, 600.0, 3)
    _, errors = parse({"sms": {"filter_min_sample": 1, "filter_relative": 2,
                               "filter_probe_interval": 600, "filter_max_probe_interval": 60}})
    assert any("sms.filter_min_sample" in e for e in errors)
    assert any("sms.filter_relative" in e for e in errors)
    assert any("sms.filter_max_probe_interval: must be >=" in e for e in errors)
