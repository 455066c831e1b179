"""systemd service notifications (``sd_notify``) and the watchdog.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit
started, shows the last ``STATUS=`` line in ``systemctl status``, and with
``WatchdogSec=`` restarts the service when ``WATCHDOG=1`` stops arriving.

systemd-python's ``systemd.daemon.notify`` is used when it is installed; it is
source-only (it needs libsystemd-dev and a compiler), so without it the
message goes straight to ``$NOTIFY_SOCKET``: one AF_UNIX datagram, the
fields as ``KEY=value`` lines. A socket name starting with ``@`` is in the
abstract namespace. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a
cheap no-op that returns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

from otpd.aio import within

log = logging.getLogger("otpd.app.sdnotify")

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _load_systemd_notify() -> Callable[[str], bool] | None:
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    send = getattr(daemon, "notify", None)
    if not callable(send):
        return None

    def notify_via_systemd(message: str) -> bool:
        return bool(send(message))

    return notify_via_systemd


# The systemd-python backend, or None for the standard-library protocol.
_systemd_notify: Callable[[str], bool] | None = _load_systemd_notify()


def backend() -> str:
    """``"systemd-python"`` or ``"socket"``: which implementation sends."""
    return "systemd-python" if _systemd_notify is not None else "socket"


def format_message(fields: dict[str, object]) -> str:
    """``KEY=value`` lines; True becomes 1. Keys are upper-case names and
    values may not contain a newline (it would end the field early)."""
    lines: list[str] = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(f"sd_notify field name {key!r} must be upper case, e.g. STATUS")
        text = "1" if value is True else "0" if value is False else str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify field {key} must not contain a newline")
        lines.append(f"{key}={text}")
    if not lines:
        raise ValueError("sd_notify needs at least one field")
    return "\n".join(lines)


def _socket_address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


def send_to_socket(message: str, socket_name: str | None = None) -> bool:
    """The notify-socket protocol: one datagram to ``$NOTIFY_SOCKET``."""
    name = socket_name if socket_name is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    address = _socket_address(name)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is not a path or an abstract (@) name; not notifying", name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", name, exc)
        return False
    return True


def notify(**fields: object) -> bool:
    """Send ``fields`` (e.g. ``READY=1, STATUS="..."``) to the service manager.

    True when the message was handed to systemd; False when not running under
    a notify-aware service manager or the send failed (never raises for that).
    """
    message = format_message(fields)
    if _systemd_notify is not None:
        try:
            return _systemd_notify(message)
        except (OSError, ValueError) as exc:
            log.debug("systemd.daemon.notify failed: %s", exc)
            return False
    return send_to_socket(message)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """``READY=1`` (and a first ``STATUS=``): start-up is complete."""
    if status is None:
        return notify(READY=1)
    return notify(READY=1, STATUS=_one_line(status))


def status(text: str) -> bool:
    """``STATUS=``: the one-line state shown by ``systemctl status``."""
    return notify(STATUS=_one_line(text))


def reloading() -> bool:
    """``RELOADING=1``; send :func:`ready` again once the reload is done."""
    return notify(RELOADING=1, MONOTONIC_USEC=time_monotonic_usec())


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun."""
    if status is None:
        return notify(STOPPING=1)
    return notify(STOPPING=1, STATUS=_one_line(status))


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: tell systemd the service is alive."""
    return notify(WATCHDOG=1)


def time_monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd expects in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Seconds systemd allows between watchdog pings, or None when the
    watchdog is off for this process (``$WATCHDOG_USEC`` unset or invalid,
    or ``$WATCHDOG_PID`` naming another process)."""
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = os.environ.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 1_000_000


class Watchdog:
    """Pings the systemd watchdog at half its interval, only while healthy.

    ``healthy`` is awaited before each ping; a False answer, an exception or
    no answer within half the interval withholds the ping, so systemd
    restarts the service if it stays unhealthy. A blocked event loop runs no
    check at all, which withholds the ping too. With no watchdog configured
    (``interval`` None and no ``$WATCHDOG_USEC``) :meth:`start` does nothing.
    """

    def __init__(
        self,
        healthy: Callable[[], Awaitable[bool]],
        interval: float | None = None,
        *,
        ping: Callable[[], bool] = watchdog_ping,
    ) -> None:
        self._healthy = healthy
        self._interval = interval if interval is not None else watchdog_interval()
        self._ping = ping
        self._task: asyncio.Task[None] | None = None
        self.pings = 0
        self.withheld = 0
        self.last_healthy: bool | None = None

    @property
    def interval(self) -> float | None:
        """The watchdog interval in seconds (None: watchdog off)."""
        return self._interval

    @property
    def enabled(self) -> bool:
        return self._interval is not None and self._interval > 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if not self.enabled or self.running:
            return
        self._task = asyncio.create_task(self._run(), name="sd-watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def check(self) -> bool:
        """Run the health check once; ping if it passed. Returns the verdict."""
        assert self._interval is not None
        period = self._interval / 2
        try:
            ok = bool(await within(period, self._healthy()))
            reason = "" if ok else "health check failed"
        except TimeoutError:
            ok, reason = False, f"health check took longer than {period:.1f} s"
        except Exception as exc:  # a broken check must not stop the pinging task
            ok, reason = False, f"health check raised {type(exc).__name__}: {exc}"
        if ok:
            self._ping()
            self.pings += 1
            if self.last_healthy is False:
                log.warning("healthy again: watchdog pings resumed")
        else:
            self.withheld += 1
            if self.last_healthy is not False:
                log.error("%s: withholding watchdog pings (systemd restarts otpd after %.0f s)",
                          reason, self._interval)
        self.last_healthy = ok
        return ok

    async def _run(self) -> None:
        assert self._interval is not None
        period = self._interval / 2
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.check()
            await asyncio.sleep(max(0.0, period - (loop.time() - started)))


def status_line(parts: Sequence[str]) -> str:
    """The parts the daemon reports (``Daemon.summary()``) as one ``STATUS=`` line,
    e.g. ``2/3 modems ready, smtp 1/1 ok, amqp connected, mqtt down, 4 pending``."""
    return ", ".join(p for p in parts if p) or "running"


class StatusReporter:
    """Sends ``STATUS=`` every ``interval`` seconds, only when the text changed."""

    def __init__(self, text: Callable[[], str], interval: float = 10.0, *,
                 send: Callable[[str], bool] = status) -> None:
        self._text = text
        self._interval = interval
        self._send = send
        self._task: asyncio.Task[None] | None = None
        self.last: str | None = None

    def report(self) -> None:
        """Send now if the text changed (e.g. right after a reload)."""
        try:
            text = _one_line(self._text())
        except Exception as exc:  # a status bug must not end the reporter
            log.debug("status text failed: %s", exc)
            return
        if text != self.last:
            self._send(text)
            self.last = text

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sd-status")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self.report()
            await asyncio.sleep(self._interval)
