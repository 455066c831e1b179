"""The simulated modem on a pseudo-terminal: the I/O adapter around ``DeviceModel``.

It opens the pty, points ``link`` at its slave side, feeds what the host
writes to the model, writes back what the model answers, sleeps while the
model is busy, sends the profile's periodic URCs, and makes the device node
vanish and come back (a USB unplug).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar, cast, overload

from otpd.channels.sms.profiles import Profile
from otpd.channels.sms.simulator.model import STO_SENT, DeviceModel, SentMessage, Stored

_T = TypeVar("_T")


class _OfModel(Generic[_T]):
    """An attribute of the device model, read and written through the simulator."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _OfModel[_T]: ...

    @overload
    def __get__(self, obj: ModemSimulator, owner: type) -> _T: ...

    def __get__(self, obj: ModemSimulator | None, owner: type) -> _T | _OfModel[_T]:
        if obj is None:
            return self
        return cast(_T, getattr(obj.model, self._name))

    def __set__(self, obj: ModemSimulator, value: _T) -> None:
        setattr(obj.model, self._name, value)


def _monotonic() -> float:
    return time.monotonic()  # looked up per call, like the code before the split


def _wall() -> float:
    return time.time()


class ModemSimulator:
    """A modem behind the pty slave that ``link`` points to.

    Tests inspect ``sent`` (complete decoded messages), ``storage`` (SIM
    slots), ``commands`` (every command line received) and ``pin_attempts``;
    they and the device's settings are the model's (``model``), shown here.
    """

    name: _OfModel[str] = _OfModel()
    delay: _OfModel[float] = _OfModel()
    fail_rate: _OfModel[float] = _OfModel()
    profile: _OfModel[Profile] = _OfModel()
    pin: _OfModel[str] = _OfModel()
    imsi: _OfModel[str] = _OfModel()
    store_sent: _OfModel[bool] = _OfModel()
    urc_during_submit: _OfModel[bool] = _OfModel()
    urc_interval: _OfModel[float] = _OfModel()
    not_ready: _OfModel[float] = _OfModel()
    smsc: _OfModel[str] = _OfModel()
    smsc_written: _OfModel[bool] = _OfModel()
    capacity: _OfModel[int] = _OfModel()
    csq: _OfModel[int] = _OfModel()
    fail_code: _OfModel[int] = _OfModel()
    reports: _OfModel[str] = _OfModel()
    report_delay: _OfModel[float] = _OfModel()
    report_status: _OfModel[int | None] = _OfModel()
    report_ds: _OfModel[tuple[int, ...]] = _OfModel()
    status_reports: _OfModel[list[str]] = _OfModel()
    cnmi_ds: _OfModel[int] = _OfModel()
    sent: _OfModel[list[SentMessage]] = _OfModel()
    storage: _OfModel[dict[int, Stored]] = _OfModel()
    commands: _OfModel[list[str]] = _OfModel()
    pin_attempts: _OfModel[int] = _OfModel()
    resets: _OfModel[int] = _OfModel()
    fault: _OfModel[str | None] = _OfModel()
    fault_code: _OfModel[int] = _OfModel()
    on_sent: _OfModel[Callable[[SentMessage], None] | None] = _OfModel()
    on_command: _OfModel[Callable[[str], None] | None] = _OfModel()
    echo: _OfModel[bool] = _OfModel()
    cmee: _OfModel[int] = _OfModel()
    cmgf: _OfModel[int] = _OfModel()
    cscs: _OfModel[str] = _OfModel()
    creg_mode: _OfModel[int] = _OfModel()
    curc: _OfModel[bool] = _OfModel()

    def __init__(
        self,
        link: Path,
        *,
        sent_log: Path | None = None,
        delay: float = 0.0,
        fail_rate: float = 0.0,
        profile: str = "generic",
        pin: str = "",
        seed: int | None = None,
        name: str | None = None,
        store_sent: bool = False,
        urc_during_submit: bool = False,
        urc_interval: float | None = None,
        not_ready: float = 0.0,
        smsc_unwritten: bool = False,
        capacity: int = 30,
        csq: int = 18,
        fail_code: int = 38,
        reports: str = "delivered",
        report_delay: float = 0.05,
        report_status: int | None = None,
        report_ds: tuple[int, ...] = (0, 1, 2),
    ) -> None:
        self.link = Path(link)
        self.sent_log = sent_log
        self.model = DeviceModel(
            name=name or self.link.name,
            clock=_monotonic,
            wall_clock=_wall,
            sent_sink=self._log_sent,
            delay=delay,
            fail_rate=fail_rate,
            profile=profile,
            pin=pin,
            seed=seed,
            store_sent=store_sent,
            urc_during_submit=urc_during_submit,
            urc_interval=urc_interval,
            not_ready=not_ready,
            smsc_unwritten=smsc_unwritten,
            capacity=capacity,
            csq=csq,
            fail_code=fail_code,
            reports=reports,
            report_delay=report_delay,
            report_status=report_status,
            report_ds=report_ds,
        )
        self._master = -1
        self._slave = -1
        self._out_pending = bytearray()
        self._tasks: list[asyncio.Task[None]] = []
        self._waker: asyncio.Task[None] | None = None  # sleeps while the model is busy
        self._timer: asyncio.TimerHandle | None = None  # the model's next timed event
        self._timer_due = 0.0
        self._running = False

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        self._open_pty()
        self.model.power_on()

    async def stop(self) -> None:
        self._running = False
        self._close_pty()

    async def __aenter__(self) -> ModemSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no line discipline: bytes pass untouched (^Z, ESC, CR)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.model.disconnect()  # a new port starts with no input
        self._out_pending.clear()
        self._timer = None
        tmp = self.link.with_name(self.link.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.link)  # atomic: a reader never sees a half-made link
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._on_readable)
        self._tasks = []
        if self.model.profile.periodic_urcs and self.model.urc_interval > 0:
            self._tasks.append(loop.create_task(self._periodic()))

    def _close_pty(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._waker is not None:
            self._waker.cancel()  # a send in progress dies with the port
            self._waker = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.model.disconnect()
        if self._master >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._master)
            loop.remove_writer(self._master)
            os.close(self._master)
            os.close(self._slave)
            self._master = self._slave = -1
        with contextlib.suppress(FileNotFoundError):
            if self.link.is_symlink():
                self.link.unlink()

    # --- the device, seen from outside ----------------------------------------------

    def set_fault(self, kind: str | None, *, code: int = 500, after_parts: int = 0) -> None:
        """See ``DeviceModel.set_fault``."""
        self.model.set_fault(kind, code=code, after_parts=after_parts)

    def clear_fault(self) -> None:
        self.model.clear_fault()

    def vanish(self) -> None:
        """Like a USB unplug: the device node disappears and open handles die."""
        self._close_pty()

    def reappear(self) -> None:
        if self._master < 0 and self._running:
            self.model.reboot()
            self._open_pty()

    @property
    def present(self) -> bool:
        return self._master >= 0

    def inject_incoming(self, sender: str, text: str) -> int:
        """An SMS arrives: stored as REC UNREAD and announced with +CMTI."""
        index = self.model.inject_incoming(sender, text)
        self._send_out()
        return index

    def store_submit(self, receiver: str, text: str, stat: int = STO_SENT) -> int:
        """Pre-seed a stored outgoing message (as other software would leave)."""
        return self.model.store_submit(receiver, text, stat)

    def emit_urc(self, line: str) -> None:
        self.model.emit_urc(line)
        self._send_out()

    # --- byte I/O -------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.model.receive(data)
            self._after_model()

    def _after_model(self) -> None:
        self._send_out()
        if self.model.pause is not None and self._waker is None and self._master >= 0:
            self._waker = asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        """Let the model's busy time pass, then let it go on (several times if need be)."""
        me = asyncio.current_task()
        try:
            while (pause := self.model.pause) is not None:
                await asyncio.sleep(pause)
                self.model.resume()
                self._send_out()
        finally:
            if self._waker is me:
                self._waker = None

    def _send_out(self) -> None:
        data = self.model.data_to_send()
        if data:
            self._write(data)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Wake for the model's next timed event (a status report), if earlier than set."""
        due = self.model.next_timer()
        if due is None or self._master < 0:
            return
        if self._timer is not None and self._timer_due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(
            max(due - _monotonic(), 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.model.run_timers()
        self._send_out()

    def _write(self, data: bytes) -> None:
        if self._master < 0:
            return
        if self._out_pending:
            self._out_pending += data
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return
        if written < len(data):
            self._out_pending += data[written:]
            asyncio.get_running_loop().add_writer(self._master, self._flush)

    def _flush(self) -> None:
        try:
            written = os.write(self._master, self._out_pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._out_pending)
        del self._out_pending[:written]
        if not self._out_pending:
            asyncio.get_running_loop().remove_writer(self._master)

    def _log_sent(self, item: SentMessage) -> None:
        if self.sent_log is not None:
            with self.sent_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(item.__dict__, ensure_ascii=False) + "\n")

    async def _periodic(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.model.urc_interval)
            if self.model.periodic_urc(tick):
                self._send_out()
                tick += 1
