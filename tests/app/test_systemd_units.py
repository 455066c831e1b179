"""The systemd units (systemd-analyze verify, systemd-analyze security
--offline=yes) and the udev rules (udevadm's own parser, in a private mount
namespace, plus the port-selection logic evaluated for each modem family).

systemd-analyze and udevadm come with Debian's systemd and udev packages
(apt-get install -y systemd udev); systemd does not have to be running.
Missing tools skip these tests with a reason, or fail them when
OTPD_REQUIRE_SERVICES=1 (as in CI).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
RULES = REPO / "etc" / "udev" / "77-otpd-modems.rules"
OK_LEVELS = ("PERFECT", "SAFE", "OK")
APT_HINT = "apt-get install -y systemd udev"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({APT_HINT})"
        if os.environ.get("OTPD_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def unit_with_local_otpd(unit: str, dest: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's otpd, so that
    verify checks a real executable instead of the not-installed /opt/otpd."""
    otpd = Path(sys.executable).parent / "otpd"
    assert otpd.exists(), f"{otpd}: install otpd into the test venv first"
    text = (UNITS / unit).read_text().replace("/opt/otpd/bin/otpd", str(otpd))
    out = dest / unit
    out.write_text(text)
    return out


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in (UNITS / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


# -- systemd -------------------------------------------------------------------

@pytest.mark.parametrize("unit", ["otpd.service", "otpd-broker.service"])
def test_unit_verifies_cleanly(unit: str, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    path = unit_with_local_otpd(unit, tmp_path)
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    path = unit_with_local_otpd("otpd.service", tmp_path)
    path.write_text(path.read_text().replace("WatchdogSec=30s", "WatchdogSecs=30s"))
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert "WatchdogSecs" in out.stderr


@pytest.mark.parametrize("unit", ["otpd.service", "otpd-broker.service"])
def test_security_exposure_is_ok_or_better(unit: str, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    path = unit_with_local_otpd(unit, tmp_path)
    out = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out.stdout)
    assert match, out.stdout + out.stderr
    score, level = float(match.group(1)), match.group(2)
    assert level in OK_LEVELS, f"{unit}: {score} {level}\n{out.stdout}"
    assert score <= 2.0, f"{unit}: exposure {score} (was 1.5 / 1.1 when written)"


def test_main_unit_contract() -> None:
    d = directives("otpd.service")
    single = {k: v[-1] for k, v in d.items()}
    assert single["Type"] == "notify"
    assert single["NotifyAccess"] == "main"
    assert single["Restart"] == "on-failure"
    assert single["WatchdogSec"] == "30s"
    assert single["User"] == "otpd" and single["Group"] == "otpd"
    assert single["SupplementaryGroups"] == "dialout"
    assert single["StateDirectory"] == "otpd" and single["ConfigurationDirectory"] == "otpd"
    assert single["ProtectSystem"] == "strict" and single["NoNewPrivileges"] == "yes"
    assert single["DevicePolicy"] == "closed"
    assert {"char-ttyUSB rw", "char-ttyACM rw"} <= set(d["DeviceAllow"])
    assert single["MemoryMax"]
    assert single["SystemCallFilter"] and single["CapabilityBoundingSet"] == ""
    assert d["ExecStart"] == ["/opt/otpd/bin/otpd run --config /etc/otpd/otpd.toml"]
    assert d["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert "check-config" in d["ExecReload"][0], "a bad config is refused before the HUP"


def test_broker_unit_contract() -> None:
    d = directives("otpd-broker.service")
    (start,) = d["ExecStart"]
    assert start.startswith("/opt/otpd/bin/otpd broker --listen ${OTPD_BROKER_LISTEN}")
    assert "--htpasswd /etc/otpd/broker.htpasswd" in start
    assert d["Restart"] == ["on-failure"] and d["User"] == ["otpd"]
    assert d["PrivateDevices"] == ["yes"]


# -- udev ------------------------------------------------------------------------

def test_udevadm_parses_the_rules(tmp_path: Path) -> None:
    """udevadm's own parser, with the rules file mounted over /etc/udev in a
    private mount namespace: the host's udev configuration is never touched."""
    udevadm = tool("udevadm")
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or not Path("/etc/udev").is_dir():
        pytest.skip("needs root, unshare and /etc/udev for a private mount namespace")
    device = next((p for p in ("/sys/class/tty/tty0", "/sys/class/tty/console")
                   if Path(p).exists()), None)
    if device is None:
        pytest.skip("no tty device in /sys to run udevadm test against")
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES, rules / RULES.name)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RULES.name).write_text(RULES.read_text() + 'BOGUS=="1"\n')

    def parse(directory: Path) -> str:
        script = ("mount -t tmpfs none /etc/udev && mkdir /etc/udev/rules.d && "
                  f"cp {directory}/*.rules /etc/udev/rules.d/ && "
                  f"{udevadm} test --action=add {device}")
        out = subprocess.run([unshare, "--mount", "sh", "-c", script], capture_output=True,
                             text=True, timeout=60, check=False)
        text = out.stdout + out.stderr
        if "Reading rules file: /etc/udev/rules.d/" not in text:
            pytest.skip(f"could not run udevadm test in a mount namespace: {text[-300:]}")
        return text

    good = parse(rules)
    assert RULES.name in good
    problems = [line for line in good.splitlines() if f"{RULES.name}:" in line]
    assert problems == []
    assert f"{RULES.name}:" in parse(broken)  # the check can fail


_TERM = re.compile(r'\s*([A-Za-z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*(?:,|$)')


def parse_rules(text: str) -> list[list[tuple[str, str, str, str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        terms = []
        pos = 0
        while pos < len(line):
            m = _TERM.match(line, pos)
            assert m, f"cannot parse: {line[pos:]!r} in {line!r}"
            terms.append((m.group(1), m.group(2) or "", m.group(3), m.group(4)))
            pos = m.end()
        rules.append(terms)
    return rules


def evaluate(vid: str, pid: str, interface: str, csp: str = "ff/ff/ff",
             serial: str = "", kernel: str = "ttyUSB0") -> dict[str, object]:
    """What the rules do to a tty of the given USB device, for the subset of
    udev they use (sysfs lookups stand in for the ATTRS/IMPORT lines)."""
    env = {".OTPD_IF": interface, ".OTPD_CSP": csp, ".OTPD_VID": vid, ".OTPD_PID": pid,
           "ID_SERIAL_SHORT": serial, "ID_PATH_TAG": "platform-usb-0_1_2_1_" + interface[-1]}
    dev = {"ACTION": "add", "SUBSYSTEM": "tty", "KERNEL": kernel}
    links: list[str] = []
    assigned: dict[str, str] = {}
    goto = ""

    def matches(value: str, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(value, p) for p in pattern.split("|"))

    for terms in parse_rules(RULES.read_text()):
        keys = {t[0] for t in terms}
        if goto:
            if terms[0][:2] == ("LABEL", "") and terms[0][3] == goto:
                goto = ""
            continue
        if keys & {"ATTRS", "SUBSYSTEMS", "IMPORT"}:
            continue  # the device facts above are what these lines provide
        ok = True
        for key, arg, op, value in terms:
            if op in ("==", "!="):
                have = env.get(arg, "") if key == "ENV" else dev.get(key, "")
                ok = ok and (matches(have, value) == (op == "=="))
        if not ok:
            continue
        for key, arg, op, value in terms:
            if op in ("==", "!="):
                continue
            expanded = re.sub(r"\$env\{([^}]*)\}", lambda m: env.get(m.group(1), ""), value)
            if key == "GOTO":
                goto = expanded
            elif key == "ENV":
                env[arg] = expanded
            elif key == "SYMLINK":
                links.append(expanded)
            elif key != "LABEL":
                assigned[key] = expanded
    return {"links": links, "env": env, **assigned}


@pytest.mark.parametrize(("vid", "pid", "iface", "csp", "vendor"), [
    ("2c7c", "0125", "02", "ff/ff/ff", "quectel"),  # EC25 primary AT port
    ("2c7c", "0125", "03", "ff/ff/ff", None),  # its secondary AT port: not named
    ("2c7c", "0125", "00", "ff/ff/ff", None),  # DIAG
    ("2c7c", "0128", "05", "ff/ff/ff", "quectel"),
    ("1e0e", "9001", "02", "ff/ff/ff", "simcom"),  # SIM7600
    ("1e0e", "9001", "04", "ff/ff/ff", None),  # audio
    ("1e0e", "9011", "04", "ff/ff/ff", "simcom"),
    ("19d2", "0117", "02", "ff/ff/ff", "zte"),
    ("19d2", "0124", "04", "ff/ff/ff", "zte"),
    ("19d2", "0124", "01", "ff/ff/ff", None),
    ("12d1", "1436", "00", "ff/02/01", "huawei"),  # E173 in modem mode
    ("12d1", "1436", "02", "ff/02/02", None),  # only one port per stick
    ("12d1", "1506", "02", "ff/02/02", "huawei"),  # PCUI by class
    ("12d1", "1506", "00", "ff/02/01", None),  # the PPP port
    ("1a86", "7523", "00", "ff/01/02", "ch340"),  # SIM800 on a CH340
    ("10c4", "ea60", "00", "ff/00/00", "cp210x"),
    ("0403", "6001", "00", "ff/ff/ff", "ftdi"),
    ("046d", "c52b", "00", "03/01/02", None),  # not a modem
])
def test_rules_pick_the_at_port(vid: str, pid: str, iface: str, csp: str,
                                vendor: str | None) -> None:
    result = evaluate(vid, pid, iface, csp, serial="A1B2C3")
    env = result["env"]
    assert isinstance(env, dict)
    if vendor is None:
        assert result["links"] == [] and "GROUP" not in result
        return
    assert result["links"] == [f"otpd-modem-{vendor}-A1B2C3",
                               f"otpd-modem-{vendor}-platform-usb-0_1_2_1_{iface[-1]}"]
    assert result["GROUP"] == "dialout" and result["MODE"] == "0660"
    assert env["ID_MM_DEVICE_IGNORE"] == "1"


def test_no_serial_number_still_gets_the_path_name() -> None:
    result = evaluate("2c7c", "0125", "02")
    assert result["links"] == ["otpd-modem-quectel-platform-usb-0_1_2_1_2"]


def test_other_ttys_are_left_alone() -> None:
    assert evaluate("2c7c", "0125", "02", kernel="ttyAMA0")["links"] == []


def test_modemmanager_ignores_every_listed_device() -> None:
    text = RULES.read_text()
    for vid, pid in (("2c7c", "0125"), ("1e0e", "9001"), ("19d2", "0117"), ("12d1", "1436")):
        line = next(x for x in text.splitlines()
                    if f'ATTRS{{idVendor}}=="{vid}"' in x and "ID_MM_DEVICE_IGNORE" in x)
        assert pid in line
