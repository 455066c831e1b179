from __future__ import annotations

from pathlib import Path

import pytest

from otpd.app.settings import parse_settings
from otpd.settings_reader import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text)
    return info.value.errors


def test_empty_config_has_working_defaults() -> None:
    s = parse_settings("")
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8899)
    assert s.otp.length == 6 and s.otp.max_attempts == 5 and s.otp.country_code == "62"
    assert s.delivery.wait == 20
    assert s.smtp == ()


def test_minimal_keys_of_the_design_contract() -> None:
    s = parse_settings("""
        [server]
        listen = "0.0.0.0:9999"
        allow_plain_http = true
        users_file = "/tmp/u"
        max_body = 4096
        [store]
        path = "/tmp/x.db"
        [otp]
        length = 8
        default_lifetime = 60
        max_lifetime = 120
        max_attempts = 3
        key_file = "/tmp/k"
        country_code = "1"
        email_subject = "Code"
        [delivery]
        wait = 0
        [[smtp]]
        host = "mail"
        port = 2525
        security = "tls"
        username = "u"
        password = "p"
        sender = "OTP <otp@example.com>"
    """)
    assert (s.server.host, s.server.port, s.server.max_body) == ("0.0.0.0", 9999, 4096)
    assert s.otp.length == 8 and s.otp.email_subject == "Code" and s.delivery.wait == 0
    assert s.smtp[0].port == 2525 and s.smtp[0].security == "tls" and s.smtp[0].password == "p"


def test_errors_name_the_full_key() -> None:
    errors = errors_of("""
        [server]
        listen = "nope"
        lisen = "typo"
        [otp]
        length = 3
        country_code = "+62"
        [[smtp]]
        host = "a"
        port = 70000
        security = "ssl"
        sender = "x"
        [[smtp]]
        host = "b"
        sender = "OTP <a@b.c>"
        bogus = 1
    """)
    text = "\n".join(errors)
    assert "server.listen: must be HOST:PORT" in text
    assert "server.lisen: unknown key" in text
    assert "otp.length: must be 4..10" in text
    assert "otp.country_code:" in text
    assert "smtp[0].port: must be 1..65535" in text
    assert "smtp[0].security: must be one of" in text
    assert "smtp[0].sender:" in text
    assert "smtp[1].bogus: unknown key" in text


def test_secret_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv("SMTP_PW", "from-env")
    s = parse_settings(f"""
        [[smtp]]
        sender = "a@b.c"
        password_file = "{tmp_path / 'pw'}"
        [[smtp]]
        name = "second"
        sender = "a@b.c"
        password_env = "SMTP_PW"
    """)
    assert [a.password for a in s.smtp] == ["from-file", "from-env"]
    errors = errors_of("""
        [[smtp]]
        sender = "a@b.c"
        password = "x"
        password_env = "Y"
    """)
    assert any(e.startswith("smtp[0].password: give only one of") for e in errors)
    errors = errors_of('[[smtp]]\nsender = "a@b.c"\npassword_env = "OTPD_SURELY_UNSET"\n')
    assert errors == ["smtp[0].password_env: environment variable OTPD_SURELY_UNSET is not set"]


def test_invalid_toml_is_a_config_error() -> None:
    errors = errors_of("[server\n")
    assert "invalid TOML" in errors[0]


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = (ROOT / "etc" / "otpd.example.toml").read_text()
    # The example points secrets at files that exist on a configured Pi only.
    (tmp_path / "secret").write_text("x")
    for line in text.splitlines():
        if "_file = " in line and "secret" not in line and "/etc/otpd/" in line:
            path = line.split("=", 1)[1].split("#")[0].strip().strip('"')
            text = text.replace(path, str(tmp_path / "secret"))
    monkeypatch.setenv("OTPD_SMTP_PASSWORD", "x")
    settings = parse_settings(text)
    assert settings.smtp and settings.server.paths


def test_plain_http_refused_off_loopback() -> None:
    errors = errors_of('[server]\nlisten = "0.0.0.0:8899"\n')
    assert errors[0].startswith("server.listen: 0.0.0.0 is not a loopback address")
    for ok in ('listen = "127.0.0.1:1"', 'listen = "[::1]:1"', 'listen = "localhost:1"',
               'listen = "0.0.0.0:1"\ntls_cert = "c"\ntls_key = "k"'):
        parse_settings(f"[server]\n{ok}\n")


def test_check_config_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    def check(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "otpd", "check-config", "--config",
                               str(config)], capture_output=True, text=True, timeout=60)

    bad = tmp_path / "bad.toml"
    bad.write_text('[[smtp]]\nport = 70000\nsender = "a@b.c"\n')
    out = check(bad)
    assert out.returncode == 2 and "smtp[0].port: must be 1..65535" in out.stderr
    good = tmp_path / "otpd.toml"
    good.write_text(f'[server]\nusers_file = "{tmp_path / "users"}"\n'
                    '[[smtp]]\nsender = "a@b.c"\npassword = "inline-secret"\n')
    good.chmod(0o644)
    out = check(good)
    assert out.returncode == 0 and "OK" in out.stdout
    assert "world-readable" in out.stderr and "smtp[0].password" in out.stderr
    assert "inline-secret" not in out.stderr + out.stdout
    good.chmod(0o640)
    out = check(good)
    assert out.returncode == 0 and "world-readable" not in out.stderr


@pytest.mark.parametrize("nested", ["[" * 100_000 + "]" * 100_000,
                                    "{a = " * 50_000 + "1" + "}" * 50_000])
def test_deeply_nested_toml_is_a_config_error(nested: str) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_settings(f"x = {nested}\n")
