"""sd_notify against a real AF_UNIX datagram socket (path and abstract), the
systemd-python delegation, the watchdog interval and the Watchdog task."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from otpd.app import sdnotify


class Receiver:
    """The service manager's end: a bound AF_UNIX datagram socket."""

    def __init__(self, sock: socket.socket, env_name: str) -> None:
        self.sock = sock
        self.env_name = env_name

    def messages(self, timeout: float = 1.0) -> list[dict[str, str]]:
        """Every datagram waiting (at least one within ``timeout``), parsed."""
        out: list[dict[str, str]] = []
        self.sock.settimeout(timeout)
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return out
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            out.append(fields)
            self.sock.settimeout(0.05)


@pytest.fixture(autouse=True)
def socket_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise the standard-library protocol even where systemd-python exists."""
    monkeypatch.setattr(sdnotify, "_systemd_notify", None)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def path_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield Receiver(sock, str(path))
    sock.close()


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    name = f"otpd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield Receiver(sock, "@" + name)
    sock.close()


def test_ready_status_stopping_on_a_path_socket(path_receiver: Receiver) -> None:
    assert sdnotify.backend() == "socket"
    assert sdnotify.ready("store open, REST on 127.0.0.1:8899")
    assert sdnotify.status("2/3 modems ready, amqp connected")
    assert sdnotify.stopping()
    assert path_receiver.messages() == [
        {"READY": "1", "STATUS": "store open, REST on 127.0.0.1:8899"},
        {"STATUS": "2/3 modems ready, amqp connected"},
        {"STOPPING": "1"},
    ]


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    assert sdnotify.notify(READY=1, STATUS="up", MAINPID=os.getpid())
    assert sdnotify.watchdog_ping()
    assert abstract_receiver.messages() == [
        {"READY": "1", "STATUS": "up", "MAINPID": str(os.getpid())},
        {"WATCHDOG": "1"},
    ]


def test_reloading_carries_a_monotonic_timestamp(path_receiver: Receiver) -> None:
    assert sdnotify.reloading()
    (msg,) = path_receiver.messages()
    assert msg["RELOADING"] == "1"
    assert int(msg["MONOTONIC_USEC"]) > 0


def test_status_is_one_line(path_receiver: Receiver) -> None:
    assert sdnotify.status("modem m1\nsays:  hello\r\n")
    assert path_receiver.messages() == [{"STATUS": "modem m1 says: hello"}]


def test_bad_fields_are_programming_errors(path_receiver: Receiver) -> None:
    with pytest.raises(ValueError, match="upper case"):
        sdnotify.notify(ready=1)
    with pytest.raises(ValueError, match="newline"):
        sdnotify.notify(STATUS="a\nREADY=1")
    with pytest.raises(ValueError, match="at least one"):
        sdnotify.notify()
    assert path_receiver.messages(timeout=0.1) == []


def test_without_notify_socket_nothing_is_sent() -> None:
    assert not sdnotify.notify(READY=1)
    assert not sdnotify.ready()
    assert not sdnotify.watchdog_ping()


def test_unusable_socket_names_return_false(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/name")
    assert not sdnotify.notify(READY=1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert not sdnotify.notify(READY=1)  # ENOENT: logged at debug, not raised


def test_systemd_python_is_used_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def fake_notify(message: str, unset_environment: bool = False) -> bool:
        sent.append(message)
        return True

    daemon = types.ModuleType("systemd.daemon")
    daemon.notify = fake_notify  # type: ignore[attr-defined]
    package = types.ModuleType("systemd")
    package.daemon = daemon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.daemon", daemon)
    backend = sdnotify._load_systemd_notify()
    assert backend is not None
    monkeypatch.setattr(sdnotify, "_systemd_notify", backend)
    assert sdnotify.backend() == "systemd-python"
    assert sdnotify.ready("up")
    assert sdnotify.stopping()
    assert sent == ["READY=1\nSTATUS=up", "STOPPING=1"]


def test_systemd_python_missing_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "systemd.daemon", None)  # import raises ImportError
    assert sdnotify._load_systemd_notify() is None


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("500000", None, 0.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "x", None),
        (None, None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() == expected


async def test_watchdog_pings_only_while_healthy(path_receiver: Receiver,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: pings every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy = True

    async def check() -> bool:
        return healthy

    dog = sdnotify.Watchdog(check)
    assert dog.interval == 0.2
    await dog.start()
    try:
        await asyncio.sleep(0.45)
        first = path_receiver.messages(timeout=0.1)
        assert 3 <= len(first) <= 6
        assert all(m == {"WATCHDOG": "1"} for m in first)

        healthy = False
        await asyncio.sleep(0.15)  # let a check that was already running finish
        path_receiver.messages(timeout=0.05)
        await asyncio.sleep(0.4)
        assert path_receiver.messages(timeout=0.1) == []
        assert dog.withheld >= 3
        assert dog.last_healthy is False

        healthy = True
        await asyncio.sleep(0.3)
        assert len(path_receiver.messages(timeout=0.1)) >= 2
    finally:
        await dog.stop()
    assert not dog.running


async def test_a_slow_or_broken_check_withholds_the_ping(
        path_receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    async def hangs() -> bool:
        await asyncio.sleep(10)
        return True

    async def raises() -> bool:
        raise RuntimeError("store closed")

    slow = sdnotify.Watchdog(hangs, interval=0.1)
    assert not await slow.check()
    broken = sdnotify.Watchdog(raises, interval=0.1)
    assert not await broken.check()
    assert path_receiver.messages(timeout=0.1) == []
    assert "took longer than 0.1 s" in caplog.text
    assert "RuntimeError: store closed" in caplog.text


async def test_blocked_event_loop_gets_no_ping(path_receiver: Receiver) -> None:
    async def check() -> bool:
        return True

    dog = sdnotify.Watchdog(check, interval=0.2)
    await dog.start()
    try:
        await asyncio.sleep(0.05)
        path_receiver.messages(timeout=0.05)
        time.sleep(0.4)  # the loop is stuck: no task runs, so no ping
        assert path_receiver.messages(timeout=0.01) == []
    finally:
        await dog.stop()


async def test_no_watchdog_configured_means_no_task() -> None:
    async def check() -> bool:
        return True

    dog = sdnotify.Watchdog(check)
    assert not dog.enabled
    await dog.start()
    assert not dog.running
    await dog.stop()


def test_status_line_of_a_daemon_summary() -> None:
    parts = ["2/3 modems ready", "smtp 1/2 ok", "", "amqp connected", "mqtt down", "ddns ok",
             "4 pending"]
    assert sdnotify.status_line(parts) == (
        "2/3 modems ready, smtp 1/2 ok, amqp connected, mqtt down, ddns ok, 4 pending")
    assert sdnotify.status_line([]) == "running"


class _FakeChannel:
    def __init__(self, text: str) -> None:
        self.text = text

    def summary(self) -> str:
        return self.text


def test_daemon_summary_asks_each_channel() -> None:
    from otpd.app.daemon import Daemon
    from otpd.app.settings import parse_settings
    from otpd.delivery.engine import DeliveryEngine

    daemon = Daemon(parse_settings(""))
    assert daemon.summary() == []
    queues = {"email": types.SimpleNamespace(channel=_FakeChannel("smtp 1/2 ok")),
              "sms": types.SimpleNamespace(channel=_FakeChannel("0/1 modem ready"))}
    daemon.engine = cast(DeliveryEngine, types.SimpleNamespace(queues=queues,
                                                               pending_count=lambda: 4))
    assert daemon.summary() == ["0/1 modem ready", "smtp 1/2 ok", "4 pending"]


async def test_status_reporter_sends_only_changes(path_receiver: Receiver) -> None:
    text = "1/2 modems ready"
    reporter = sdnotify.StatusReporter(lambda: text, interval=0.05)
    await reporter.start()
    try:
        await asyncio.sleep(0.2)
        assert path_receiver.messages(timeout=0.05) == [{"STATUS": "1/2 modems ready"}]
        text = "2/2 modems ready"
        await asyncio.sleep(0.2)
        assert path_receiver.messages(timeout=0.05) == [{"STATUS": "2/2 modems ready"}]
    finally:
        await reporter.stop()


def test_status_reporter_survives_a_broken_source(path_receiver: Receiver) -> None:
    def broken() -> str:
        raise KeyError("channels")

    reporter = sdnotify.StatusReporter(broken)
    reporter.report()
    assert reporter.last is None
    assert path_receiver.messages(timeout=0.05) == []
