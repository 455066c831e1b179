"""scripts/install.sh and scripts/uninstall.sh in a throwaway root (--prefix),
without systemd or udev running: layout, modes, owners, a working
<prefix>/opt/otpd/bin/otpd, idempotence, a kept local config, uninstall with
and without --purge. Also: requirements.lock pins what the test venv has.

Building the virtual environment takes 15-30 s (pip's cache is reused); the
whole module stays well under two minutes. It needs no network when pip's
cache or a local index has the pinned wheels, and it runs in CI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = Path("scripts/install.sh")
UNINSTALL = Path("scripts/uninstall.sh")
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or not sys.platform.startswith("linux"),
    reason="the installer is a bash script for Linux",
)


def source_copy(dest: Path) -> Path:
    """What a release tarball holds, copied: the tests install from that copy,
    so edits to the working tree during the run cannot make the second
    install differ from the first."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("otpd", "scripts", "etc", "systemd", "docs"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def run(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "VIRTUAL_ENV"))}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about every path under root that an install could change."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(path), st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                out[key] = ("dir", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[key] = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, digest)
    return out


def account(root: Path, name: str, file: str) -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


@dataclass
class Installed:
    src: Path
    root: Path
    first: subprocess.CompletedProcess[str]
    uid: int | None
    gid: int | None


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    src = source_copy(tmp_path_factory.mktemp("src") / "otpd")
    root = tmp_path_factory.mktemp("pi-root")
    if IS_ROOT and shutil.which("useradd"):
        # A skeleton of a fresh system's account files, so that the user is
        # created (useradd --root) inside the throwaway root.
        etc = root / "etc"
        etc.mkdir()
        (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        (etc / "group").write_text("root:x:0:\ndialout:x:20:\n")
        for name, text in (("shadow", "root:*:19000:0:99999:7:::\n"),
                           ("gshadow", "root:*::\ndialout:*::\n")):
            (etc / name).write_text(text)
            (etc / name).chmod(0o640)
    first = run(src / INSTALL, "--prefix", str(root), "--python", sys.executable, "--no-start")
    assert first.returncode == 0, first.stdout + first.stderr
    uid = gid = None
    if (root / "etc" / "passwd").exists():
        user = account(root, "otpd", "passwd")
        group = account(root, "otpd", "group")
        assert user is not None and group is not None
        uid, gid = int(user[2]), int(group[2])
    return Installed(src, root, first, uid, gid)


def check(path: Path, mode: int, owner: tuple[int | None, int | None] | None = None) -> None:
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == mode, f"{path}: mode {oct(st.st_mode)}"
    if owner is not None and owner[0] is not None:
        assert (st.st_uid, st.st_gid) == owner, f"{path}: owner {st.st_uid}:{st.st_gid}"


def test_layout_modes_and_owners(installed: Installed) -> None:
    r, uid, gid = installed.root, installed.uid, installed.gid
    check(r / "etc/otpd", 0o750, (0, gid))
    check(r / "etc/otpd/otpd.toml", 0o640, (0, gid))
    src = installed.src
    assert (r / "etc/otpd/otpd.toml").read_bytes() == (src / "etc/otpd.example.toml").read_bytes()
    check(r / "var/lib/otpd", 0o750, (uid, gid))
    for unit in ("otpd.service", "otpd-broker.service"):
        check(r / "etc/systemd/system" / unit, 0o644, (0, 0))
        assert (r / "etc/systemd/system" / unit).read_bytes() == (
            src / "systemd" / unit).read_bytes()
    check(r / "etc/udev/rules.d/77-otpd-modems.rules", 0o644, (0, 0))
    assert (r / "opt/otpd/share/doc/otpd/operators.md").is_file()
    assert "Next steps" in installed.first.stdout
    assert not (src / "build").exists(), "the installer must not write into the source tree"
    assert not list(src.glob("*.egg-info"))


def test_user_created_in_the_root_with_dialout(installed: Installed) -> None:
    if installed.uid is None:
        pytest.skip("not root: the user otpd is only created by root (useradd --root)")
    user = account(installed.root, "otpd", "passwd")
    assert user is not None
    assert user[5] == "/var/lib/otpd" and user[6] == "/usr/sbin/nologin"
    assert installed.uid < 1000, "a system user"
    dialout = account(installed.root, "dialout", "group")
    assert dialout is not None and "otpd" in dialout[3].split(",")


def test_installed_otpd_runs_with_the_locked_versions(installed: Installed) -> None:
    venv = installed.root / "opt/otpd"
    out = subprocess.run([str(venv / "bin/otpd"), "--version"], capture_output=True, text=True,
                         timeout=60, check=True)
    from otpd import __version__

    assert out.stdout.strip() == f"otpd {__version__}"
    frozen = subprocess.run([str(venv / "bin/python"), "-m", "pip", "freeze", "--all"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    have = dict(_pins(frozen))
    for name, version in _pins((installed.src / "requirements.lock").read_text()):
        assert have.get(name) == version, f"{name}: venv has {have.get(name)}, lock {version}"
    assert "otpd @ file:" in frozen
    for absent in ("pytest", "mypy", "ruff", "hypothesis"):
        assert absent not in have


def reinstall(installed: Installed) -> subprocess.CompletedProcess[str]:
    return run(installed.src / INSTALL, "--prefix", str(installed.root),
               "--python", sys.executable, "--no-start", timeout=120)


def test_second_run_changes_nothing(installed: Installed) -> None:
    before = snapshot(installed.root)
    again = reinstall(installed)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    assert snapshot(installed.root) == before


def test_local_config_edit_survives_a_reinstall(installed: Installed) -> None:
    config = installed.root / "etc/otpd/otpd.toml"
    edited = config.read_text().replace('country_code = "62"', 'country_code = "31"')
    config.write_text(edited)
    again = reinstall(installed)
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text() == edited
    check(config, 0o640, (0, installed.gid))
    assert "Next steps" not in again.stdout


def test_uninstall_keeps_the_data_then_purge_removes_it(installed: Installed) -> None:
    r = installed.root
    (r / "var/lib/otpd/otpd.db").write_bytes(b"data")
    out = run(installed.src / UNINSTALL, "--prefix", str(r), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for gone in ("opt/otpd", "etc/systemd/system/otpd.service",
                 "etc/systemd/system/otpd-broker.service", "etc/udev/rules.d/77-otpd-modems.rules"):
        assert not (r / gone).exists(), gone
    assert (r / "var/lib/otpd/otpd.db").read_bytes() == b"data"
    assert "country_code = \"31\"" in (r / "etc/otpd/otpd.toml").read_text()
    if installed.uid is not None:
        assert account(r, "otpd", "passwd") is not None, "the data's owner stays"

    again = run(installed.src / UNINSTALL, "--prefix", str(r), timeout=60)
    assert again.returncode == 0 and "nothing to remove" in again.stdout

    purge = run(installed.src / UNINSTALL, "--prefix", str(r), "--purge", timeout=60)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not (r / "var/lib/otpd").exists()
    assert not (r / "etc/otpd").exists()
    if installed.uid is not None:
        assert account(r, "otpd", "passwd") is None
        assert account(r, "otpd", "group") is None


def test_bad_arguments_change_nothing(tmp_path: Path) -> None:
    out = run(REPO / INSTALL, "--prefix", str(tmp_path / "r"), "--frobnicate")
    assert out.returncode != 0 and "unknown argument: --frobnicate" in out.stderr
    out = run(REPO / INSTALL, "--prefix", str(tmp_path / "r"),
              "--python", str(tmp_path / "nopython"))
    assert out.returncode != 0 and "no " in out.stderr
    assert not (tmp_path / "r" / "opt").exists()
    out = run(REPO / UNINSTALL, "--purge", "--prefix", str(tmp_path / "missing"))
    assert out.returncode != 0 and "is not a directory" in out.stderr
    assert "Usage:" in run(REPO / INSTALL, "--help").stdout
    assert "Usage:" in run(REPO / UNINSTALL, "--help").stdout


def _pins(text: str) -> list[tuple[str, str]]:
    pins = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and " @ " not in line:  # pip freeze: "otpd @ file:///..."
            name, sep, version = line.partition("==")
            assert sep, f"not pinned: {line}"
            pins.append((_norm(name), version.strip()))
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
    assert match is not None
    return _norm(match.group(0))


def test_lock_pins_exactly_what_the_tests_ran_with() -> None:
    """The lock is pip freeze of otpd's runtime closure; every pin must be the
    version installed here, so the Pi gets what CI tested. On failure,
    regenerate it as its header says."""
    pins = dict(_pins((REPO / "requirements.lock").read_text()))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        assert _requirement_name(req) in pins, f"{req} is not in requirements.lock"
    mismatched = {}
    for name, version in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != version:
            mismatched[name] = (version, have)
    assert not mismatched, (
        f"requirements.lock differs from the tested venv (lock, venv): {mismatched}; "
        "regenerate it (see its header)")
    test_only = {"pytest", "mypy", "ruff", "hypothesis", "aiosmtpd", "python-gsmmodem-new"}
    assert not test_only & set(pins)
