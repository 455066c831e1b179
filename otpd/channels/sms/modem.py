"""One GSM modem on a serial port: asyncio driver over the Sans-I/O AT parser.

The port is opened with pyserial (termios setup, exclusive lock) and then
driven through its file descriptor on the event loop, so no thread is needed.
Only one AT exchange runs at a time (``asyncio.Lock``).

What to do is decided by pure code; this module only performs it:
``replies.py`` reads the answers, ``sweep.py`` decides when stored copies of
sent messages are deleted (the rules are in its docstring), ``pin.py`` enters
the SIM PIN (at most once).

Delivery reports: with ``delivery_reports`` on, ``open()`` asks the modem to
pass status reports on (``AT+CNMI`` ds=1: a ``+CDS`` URC with the PDU; else
ds=2: stored, announced by ``+CDSI``) and parts are sent with TP-SRR. Every
decoded report goes to ``on_report``: at once for ``+CDS``; stored ones are
read and deleted by ``read_stored_reports()`` (the pool calls it when
``reports_waiting`` is set), and a sweep also deletes reports already read.
Received messages are never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import serial

from otpd.channels.sms import pdu, replies
from otpd.channels.sms.at import (
    ESC,
    AtParser,
    Event,
    Final,
    Prompt,
    Reply,
    Stray,
    Urc,
    command,
    encode_command,
    encode_pdu,
)
from otpd.channels.sms.pin import AskState, EnterPin, Refused, SimPin, Unlocked
from otpd.channels.sms.replies import PERMANENT_CMS as PERMANENT_CMS
from otpd.channels.sms.replies import csq_to_dbm as csq_to_dbm
from otpd.channels.sms.replies import decode_ussd as decode_ussd
from otpd.channels.sms.replies import signal_condition as signal_condition
from otpd.channels.sms.settings import ModemSettings
from otpd.channels.sms.sweep import RECHECK_PARTS as RECHECK_PARTS
from otpd.channels.sms.sweep import SweepPolicy
from otpd.msisdn import mask

log = logging.getLogger(__name__)


class ModemError(Exception):
    """The modem could not do what was asked."""


class PortError(ModemError):
    """The serial port cannot be opened, or it went away (USB unplug)."""


class AtTimeout(ModemError):
    """No (complete) answer in time; ``partial`` holds what did arrive."""

    def __init__(self, message: str, partial: list[str] | None = None) -> None:
        super().__init__(message)
        self.partial = partial or []


class CommandError(ModemError):
    def __init__(self, line: str, final: Final) -> None:
        super().__init__(f"{_safe(line)}: {final.describe()}")
        self.final = final


class PinError(ModemError):
    """SIM PIN problem; the modem must not be retried (the SIM could lock)."""


class SendError(ModemError):
    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


@dataclass
class ModemInfo:
    manufacturer: str = ""
    model: str = ""
    revision: str = ""
    imei: str = ""
    imsi: str = ""
    operator: str = ""
    csq: int | None = None  # 0..31, None = unknown (99)
    registered: bool | None = None


@dataclass(frozen=True)
class Incoming:
    index: int
    message: pdu.Deliver


@dataclass(frozen=True)
class Timing:
    not_ready: float = 20.0  # s to keep retrying "SIM busy" answers
    cpin_grace: float = 2.0  # s to wait for the OK after +CPIN: (Wavecom never sends it)
    sync: float = 1.0  # s per "AT" while syncing with the modem


class _Lost:
    """Queued to wake an exchange waiting on a port that went away."""


def _safe(line: str) -> str:
    """A command line fit for logs and errors: no PIN, no PDU."""
    if line.upper().startswith("AT+CPIN="):
        return "AT+CPIN=<hidden>"
    return line


class Modem:
    """Driver for one modem. ``open()`` opens and initialises; ``send_sms()`` sends."""

    def __init__(
        self,
        settings: ModemSettings,
        *,
        timing: Timing | None = None,
        on_trouble: Callable[[str], None] | None = None,
        on_urc: Callable[[Urc], None] | None = None,
        on_report: Callable[[pdu.StatusReport], None] | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.timing = timing or Timing()
        self.info = ModemInfo()
        self._pin = SimPin(settings.pin, self.timing.not_ready)
        self.on_trouble = on_trouble
        self.on_urc = on_urc
        self.incoming_waiting = asyncio.Event()  # +CMTI seen
        self.on_report = on_report
        # How status reports arrive: "direct" (+CDS), "stored" (+CDSI), "" (off).
        self.reports = ""
        self.reports_waiting = asyncio.Event()  # a stored report was announced
        self._stored_reports: list[tuple[str, int]] = []  # (storage, index) announced
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._parser = AtParser()
        self._events: asyncio.Queue[Event | _Lost] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._lost: str | None = None
        self._ref = random.randrange(256)
        self._ussd: asyncio.Future[str] | None = None
        # Stored-copy bookkeeping (rules in sweep.py).
        self.sweep_wanted = asyncio.Event()  # a send left copies for an idle-time sweep
        self._sweep_lock = asyncio.Lock()
        self._sweep = SweepPolicy(settings.delete_sent, settings.max_parts)

    @property
    def pin_rejected(self) -> bool:
        """Once set, the PIN is never sent again."""
        return self._pin.rejected

    @pin_rejected.setter
    def pin_rejected(self, value: bool) -> None:
        if value:
            self._pin.reject()
        else:
            self._pin.allow()

    # --- port ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._fd >= 0 and self._lost is None

    def _open_port(self) -> None:
        port = serial.Serial()
        port.port = self.settings.port
        port.baudrate = self.settings.baud
        port.timeout = 0
        port.write_timeout = 0
        port.exclusive = True  # flock: a second otpd (or gammu) cannot share the modem
        try:
            port.open()
            port.reset_input_buffer()  # drop boot noise and answers meant for a previous user
        except (serial.SerialException, OSError, ValueError) as exc:
            with contextlib.suppress(Exception):
                port.close()
            raise PortError(f"cannot open {self.settings.port}: {exc}") from None
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        self._lost = None
        self._parser.reset()
        self._events = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    async def open_port(self) -> None:
        """Open (or reopen) the port only, for raw exchanges; open() also initialises."""
        await self.close()
        self._open_port()

    async def close(self) -> None:
        if self._fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        if self._serial is not None:
            with contextlib.suppress(Exception):
                self._serial.close()
        self._serial = None
        self._fd = -1
        self._parser.reset()

    def _lose(self, reason: str) -> None:
        if self._lost is not None:
            return
        self._lost = reason
        log.warning("modem %s: %s", self.name, reason)
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
        self._events.put_nowait(_Lost())
        if self.on_trouble is not None:
            self.on_trouble(reason)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(f"port {self.settings.port} lost: {exc.strerror}")
            return
        if not data:
            self._lose(f"port {self.settings.port} closed")
            return
        for event in self._parser.feed(data):
            if isinstance(event, Urc):
                self._urc(event)
            elif isinstance(event, Stray):
                # Content not logged: it may be a late echo of a PDU (an OTP in hex).
                log.debug("modem %s: ignored a stray line of %d chars", self.name,
                          len(event.line))
            else:
                self._events.put_nowait(event)

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._lost is not None:
                raise PortError(self._lost)
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._lose(f"write to {self.settings.port} failed: {exc.strerror}")
                raise PortError(self._lost or "write failed") from None
            view = view[written:]
            if view:
                ready = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().add_writer(self._fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    asyncio.get_running_loop().remove_writer(self._fd)

    # --- URCs ------------------------------------------------------------------------

    def _urc(self, urc: Urc) -> None:
        line = urc.line
        upper = line.upper()
        if upper.startswith("^RSSI:"):
            self.info.csq = replies.rssi_urc(line[6:])
        elif upper.startswith("+CREG:"):
            self.info.registered = replies.creg_urc_registered(line[6:])
        elif upper.startswith(("+CDSI:", "+CMTI:")) and self._report_stored(line):
            pass
        elif upper.startswith("+CMTI:"):
            self.incoming_waiting.set()
        elif upper.startswith("+CDS:") and urc.body is not None:
            self._report_direct(line, urc.body)
        elif upper.startswith("+CUSD:") and self._ussd is not None and not self._ussd.done():
            self._ussd.set_result(line[6:].strip())
        elif upper.startswith(replies.RESTART_URCS) and self.on_trouble is not None:
            self.on_trouble(f"modem restarted ({line})")
        if self.on_urc is not None:
            self.on_urc(urc)

    def _report_stored(self, line: str) -> bool:
        """A ``+CDSI`` (or a ``+CMTI`` into the report storage) to read later."""
        where = replies.stored_at(line.partition(":")[2])
        if where is None:
            return False
        is_report = line.upper().startswith("+CDSI:") or where[0] == replies.REPORT_STORAGE
        if is_report and where not in self._stored_reports:
            self._stored_reports.append(where)
            self.reports_waiting.set()
        return is_report

    def _report_direct(self, line: str, body: str) -> None:
        try:
            report = pdu.decode_listed(body, replies.cds_length(line))
        except pdu.PduError as exc:
            log.warning("modem %s: undecodable status report: %s", self.name, exc)
            return
        if isinstance(report, pdu.StatusReport):
            self._report(report)

    def _report(self, report: pdu.StatusReport) -> None:
        log.debug("modem %s: status report mr %d: 0x%02X (%s)", self.name, report.reference,
                  report.status, report.meaning)
        if self.on_report is not None:
            self.on_report(report)

    # --- exchanges -------------------------------------------------------------------

    async def _next(self, timeout: float) -> Prompt | Reply:
        async with asyncio.timeout(timeout):
            event = await self._events.get()
        if isinstance(event, _Lost):
            raise PortError(self._lost or "port lost")
        assert isinstance(event, Prompt | Reply)
        return event

    async def exchange(
        self,
        line: str,
        timeout: float | None = None,
        *,
        pdu_hex: str | None = None,
        prompt_timeout: float | None = None,
    ) -> Reply:
        """Send one command (and a PDU after the prompt); the modem's final answer."""
        timeout = self.settings.command_timeout if timeout is None else timeout
        async with self._lock:
            if self._fd < 0 or self._lost is not None:
                raise PortError(self._lost or f"port {self.settings.port} is not open")
            while not self._events.empty():  # left-overs of an exchange that timed out
                self._events.get_nowait()
            self._parser.begin(line, expect_prompt=pdu_hex is not None)
            prompted = False
            try:
                await self._write(encode_command(line))
                if pdu_hex is not None:
                    wait = prompt_timeout or self.settings.prompt_timeout
                    first = await self._next(wait)
                    if isinstance(first, Reply):
                        return first  # refused before the prompt
                    prompted = True
                    self._parser.expect_echo(pdu_hex)
                    await self._write(encode_pdu(pdu_hex))
                while True:
                    event = await self._next(timeout)
                    if isinstance(event, Reply):
                        return event
            except TimeoutError:
                partial = self._parser.cancel()
                if pdu_hex is not None and not prompted and self._lost is None:
                    # Abort the input mode a late prompt would open.
                    with contextlib.suppress(ModemError):
                        await self._write(ESC + b"\r")
                stage = "prompt" if pdu_hex is not None and not prompted else "answer"
                raise AtTimeout(f"no {stage} to {_safe(line)}", partial) from None
            finally:
                if self._parser.busy:
                    self._parser.cancel()

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        """Like exchange() but a non-OK final raises CommandError."""
        reply = await self.exchange(line, timeout)
        if not reply.ok:
            raise CommandError(line, reply.final)
        return reply

    async def patient(self, line: str, timeout: float | None = None) -> Reply:
        """exchange(), retried while the modem answers "SIM busy"/"please wait"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.not_ready
        delay = 0.1
        while True:
            reply = await self.exchange(line, timeout)
            if not replies.is_not_ready(reply.final) or loop.time() > deadline:
                return reply
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def ping(self, timeout: float | None = None) -> bool:
        try:
            await self.exchange("AT", timeout)
        except ModemError:
            return False
        return True

    # --- initialisation ------------------------------------------------------------------

    async def open(self) -> None:
        """Open the port and make the modem ready to send (PDU mode, SIM unlocked)."""
        refused = self._pin.opening()
        if refused is not None:
            raise PinError(refused.reason)
        await self.open_port()
        # Another modem (or SIM) may be behind the port now: learn its storage again.
        self._sweep.opened()
        self.sweep_wanted.clear()
        try:
            await self._initialise()
        except BaseException:
            await self.close()
            raise

    async def _initialise(self) -> None:
        await self._sync()
        await self.exchange("ATZ")  # some modems refuse it while PIN-locked: fine
        await self.exchange("ATE0")  # ATZ may have restored echo
        await self.exchange("AT+CMEE=1")  # numeric +CME/+CMS errors
        if await self._unlock_sim():
            # Qualcomm/ZTE refuse everything but AT+CPIN while locked: repeat the setup.
            await self.exchange("ATE0")
            await self.exchange("AT+CMEE=1")
        reply = await self.patient("AT+CMGF=0")
        if not reply.ok:
            raise CommandError("AT+CMGF=0", reply.final)
        await self._select_storage()
        self.reports = await self._setup_reports() if self.settings.delivery_reports else ""
        for line in self.settings.init_commands:
            await self.command(line)
        await self._identify()
        await self.refresh()
        if self.settings.delete_sent:
            await self.cleanup_sent()

    async def _sync(self) -> None:
        # ESC ends an input prompt a previous user (or crash) left open.
        await self._write(ESC + b"\r")
        for _ in range(3):
            try:
                await self.exchange("AT", min(self.timing.sync, self.settings.command_timeout))
                return
            except AtTimeout:
                continue
        raise AtTimeout(f"modem on {self.settings.port} does not answer AT")

    async def _cpin(self) -> str:
        """The SIM state from AT+CPIN? (tolerating a missing OK), or the error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.not_ready
        while True:
            try:
                reply = await self.exchange("AT+CPIN?", self.timing.cpin_grace)
            except AtTimeout as exc:
                answer = replies.cpin_in_partial(exc.partial)
                if answer is not None:
                    return answer
                raise
            state = replies.cpin_state(reply.prefixed("+CPIN:"))
            if state is not None:
                return state
            if replies.is_not_ready(reply.final) and loop.time() < deadline:
                await asyncio.sleep(0.5)
                continue
            if replies.is_sim_absent(reply.final):
                raise ModemError("SIM not inserted")
            raise CommandError("AT+CPIN?", reply.final)

    async def _unlock_sim(self) -> bool:
        """Enter the PIN if the SIM asks for it (pin.py decides); True if it was entered."""
        loop = asyncio.get_running_loop()
        action = self._pin.begin()
        while True:
            if isinstance(action, AskState):
                if action.delay:
                    await asyncio.sleep(action.delay)  # e.g. "NOT READY" while the SIM starts
                action = self._pin.state(await self._cpin(), loop.time())
            elif isinstance(action, EnterPin):
                log.info("modem %s: entering SIM PIN", self.name)
                try:
                    reply = await self.exchange(command("+CPIN", action.pin), 10.0)
                except AtTimeout:
                    action = self._pin.pin_answer(None, "", loop.time())
                else:
                    action = self._pin.pin_answer(reply.ok, reply.final.describe(), loop.time())
            elif isinstance(action, Unlocked):
                return action.entered
            else:
                assert isinstance(action, Refused)
                raise PinError(action.reason)

    async def _select_storage(self) -> None:
        mem = self.settings.storage
        # Wavecom accepts only two storages, some modems only one.
        for count in (3, 2, 1):
            reply = await self.patient(command("+CPMS", *([mem] * count)))
            if reply.ok:
                return
        log.warning("modem %s: cannot select storage %s, using the default", self.name, mem)

    async def _setup_reports(self) -> str:
        """Have the modem pass status reports on; "direct", "stored" or "" (neither taken)."""
        # Service 0: reports need no AT+CNMA (with service 1 an unacked +CDS is lost).
        # Older modems may not know AT+CSMS at all: its answer does not matter.
        with contextlib.suppress(AtTimeout):
            await self.exchange("AT+CSMS=0")
        if (await self.patient(replies.CNMI_DIRECT)).ok:
            return "direct"
        if (await self.patient(replies.CNMI_STORED)).ok:
            return "stored"
        log.warning("modem %s: takes neither %s nor %s; sending without delivery reports",
                    self.name, replies.CNMI_DIRECT, replies.CNMI_STORED)
        return ""

    async def _identify(self) -> None:
        info = self.info
        info.manufacturer = await self._text("AT+CGMI")
        info.model = await self._text("AT+CGMM")
        info.revision = await self._text("AT+CGMR")
        imei = await self._text("AT+CGSN")
        info.imei = replies.imei(imei)
        info.imsi = await self._text("AT+CIMI")

    async def _text(self, line: str) -> str:
        reply = await self.patient(line)
        return replies.identity_text(reply.lines, reply.ok)

    async def refresh(self) -> ModemInfo:
        """Operator, signal and registration (also a liveness check)."""
        reply = await self.exchange("AT+COPS?")
        for value in reply.prefixed("+COPS:"):
            self.info.operator = replies.cops_operator(value)
        reply = await self.exchange("AT+CSQ")
        for value in reply.prefixed("+CSQ:"):
            self.info.csq = replies.csq(value)
        reply = await self.exchange("AT+CREG?")
        for value in reply.prefixed("+CREG:"):
            self.info.registered = replies.creg_registered(value)
        return self.info

    # --- storage ------------------------------------------------------------------------

    async def _listing(self, stat: int) -> list[replies.Listed]:
        """(index, stat, pdu) of stored messages with this status."""
        reply = await self.patient(f"AT+CMGL={stat}", max(self.settings.command_timeout, 10.0))
        if not reply.ok:
            return []
        return replies.cmgl_listing(reply.lines)

    async def cleanup_sent(self) -> int:
        """Delete every stored outgoing message (STO UNSENT, STO SENT); never received ones.

        One sweep at a time: a second one would delete by a stale listing, and an
        index freed by the first may hold a newly received message by then."""
        async with self._sweep_lock:
            parts = self._sweep.sweep_started()
            self.sweep_wanted.clear()
            try:
                deleted, free = await self._delete_stored_copies()
            except BaseException:
                self._sweep.sweep_failed(parts)  # nothing learned: sweep again later
                raise
            self._sweep.sweep_done(parts, deleted, free)
        if deleted:
            log.info("modem %s: deleted %d stored outgoing message(s)", self.name, deleted)
        return deleted

    async def _delete_stored_copies(self) -> tuple[int, int | None]:
        """(copies deleted, free slots after) of one sweep."""
        deleted = 0
        if self.reports:
            await self._take_read_reports()
        for stat in (2, 3):
            for index, listed_stat, _ in await self._listing(stat):
                if listed_stat != stat:  # a modem that ignores the filter: touch nothing else
                    continue
                reply = await self.exchange(f"AT+CMGD={index}")
                if reply.ok:
                    deleted += 1
                else:
                    log.warning("modem %s: cannot delete stored message %d: %s", self.name,
                                index, reply.final.describe())
        return deleted, await self._free_storage()

    async def _take_read_reports(self) -> None:
        """Status reports already read (REC READ) but still stored: pass on, delete.
        Only those: received messages in that listing are left as they are."""
        reply = await self.patient("AT+CMGL=1", max(self.settings.command_timeout, 10.0))
        if not reply.ok:
            return
        lengths = replies.cmgl_lengths(reply.lines)
        for index, stat, body in replies.cmgl_listing(reply.lines):
            if stat == 1:
                await self._take_report(index, body, lengths.get(index))

    async def _take_report(self, index: int, body: str, length: int | None) -> bool:
        """Pass the report at ``index`` on and delete it; anything else stays."""
        try:
            report = pdu.decode_listed(body, length)
        except pdu.PduError:
            return False
        if not isinstance(report, pdu.StatusReport):
            return False
        self._report(report)
        reply = await self.exchange(f"AT+CMGD={index}")
        if not reply.ok:
            log.warning("modem %s: cannot delete stored status report %d: %s", self.name,
                        index, reply.final.describe())
        return True

    async def read_stored_reports(self) -> int:
        """Read, pass on and delete the status reports ``+CDSI`` announced; how many.
        A report in another storage ("SR") is read with that storage selected
        for reading, then the configured one is selected again."""
        taken = 0
        async with self._sweep_lock:  # indexes must not move under a sweep
            self.reports_waiting.clear()
            waiting, self._stored_reports = self._stored_reports, []
            for mem, index in waiting:
                other = mem != self.settings.storage.upper()
                if other and not (await self.exchange(command("+CPMS", mem))).ok:
                    log.warning("modem %s: cannot select storage %s to read a status report",
                                self.name, mem)
                    continue
                try:
                    reply = await self.exchange(f"AT+CMGR={index}")
                    found = replies.cmgr_message(reply.lines) if reply.ok else None
                    if found is not None and await self._take_report(index, *found):
                        taken += 1
                finally:
                    if other:
                        await self.exchange(command("+CPMS", self.settings.storage))
        return taken

    async def _free_storage(self) -> int | None:
        """Free slots in the storage sent messages go to (``<mem2>`` of AT+CPMS?)."""
        reply = await self.exchange("AT+CPMS?")
        for value in reply.prefixed("+CPMS:"):
            free = replies.cpms_free(value)
            if free is not None:
                return free
        return None

    def sweep_due(self) -> bool:
        """Stored copies may be waiting for a sweep."""
        return self._sweep.sweep_due()

    def idle_sweep_at(self, idle: float) -> float | None:
        """Loop time after which a due sweep can run (``idle`` s after the last send)."""
        return self._sweep.idle_sweep_at(idle)

    async def read_incoming(self) -> list[Incoming]:
        """Unread received messages (the modem marks them read; they stay stored)."""
        self.incoming_waiting.clear()
        result: list[Incoming] = []
        reports: list[tuple[int, str, int | None]] = []
        reply = await self.patient("AT+CMGL=0", max(self.settings.command_timeout, 10.0))
        listed = replies.cmgl_listing(reply.lines) if reply.ok else []
        lengths = replies.cmgl_lengths(reply.lines) if reply.ok else {}
        for index, _, body in listed:
            try:
                msg = pdu.decode_listed(body, lengths.get(index))
            except pdu.PduError:
                log.warning("modem %s: undecodable stored message %d", self.name, index)
                continue
            if isinstance(msg, pdu.Deliver):
                result.append(Incoming(index, msg))
            elif isinstance(msg, pdu.StatusReport):
                reports.append((index, body, lengths.get(index)))
        if reports:  # stored status reports come with the unread messages
            async with self._sweep_lock:
                for index, body, length in reports:
                    await self._take_report(index, body, length)
        return result

    # --- sending ---------------------------------------------------------------------------

    def _next_reference(self) -> int:
        self._ref = (self._ref + 1) % 256
        return self._ref

    async def send_sms(
        self, receiver: str, text: str, *, validity: float | None = None
    ) -> list[int]:
        """Send ``text`` (as many parts as needed); the message references.

        Raises MessageTooLong / ValueError (bad receiver) before touching the
        modem, SendError on a refusal, AtTimeout / PortError when the modem fails.
        """
        parts = pdu.encode_submit(
            receiver,
            text,
            reference=self._next_reference(),
            max_parts=self.settings.max_parts,
            validity=validity,
            status_report=bool(self.reports),
        )
        refs: list[int] = []
        healthy = True
        self._sweep.send_started()
        try:
            for part in parts:
                self._sweep.part_sending()  # even a refused part may leave a copy
                refs.append(await self._send_part(part))
        except (AtTimeout, PortError):
            healthy = False
            raise
        finally:
            self._sweep.send_ended(asyncio.get_running_loop().time())
            if healthy and self._sweep.sweep_now():
                try:
                    await self.cleanup_sent()
                except ModemError as exc:
                    log.warning("modem %s: cleanup after sending failed: %s", self.name, exc)
            elif self.sweep_due():
                self.sweep_wanted.set()
        log.info("modem %s: sent %d part(s) to %s (mr %s)", self.name, len(parts),
                 mask(receiver), ",".join(map(str, refs)))
        return refs

    async def _send_part(self, part: pdu.SubmitPdu) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.not_ready
        smsc_fixed = False
        swept = False  # at most one sweep per part
        delay = 0.2
        while True:
            reply = await self.exchange(
                f"AT+CMGS={part.tpdu_length}", self.settings.send_timeout, pdu_hex=part.hex
            )
            if reply.ok:
                return replies.cmgs_reference(reply.prefixed("+CMGS:"))
            final = reply.final
            if replies.is_not_ready(final) and loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if replies.is_storage_full(final) and self._sweep.sweep_when_full(swept):
                swept = True
                log.warning("modem %s: SMS storage full; deleting stored copies", self.name)
                await self.cleanup_sent()
                continue
            if replies.is_smsc_unknown(final) and not smsc_fixed:
                smsc_fixed = True
                if await self._rewrite_smsc():
                    continue
            permanent = replies.is_permanent(final)
            raise SendError(f"modem {self.name}: {final.describe()}", permanent=permanent)

    async def _rewrite_smsc(self) -> bool:
        """Huawei E220: "SMSC unknown" until AT+CSCA is written once, even with the same value."""
        reply = await self.patient("AT+CSCA?")
        for value in reply.prefixed("+CSCA:"):
            smsc = replies.csca(value)
            if smsc is not None:
                number, toa = smsc
                args: list[int | str] = [number] + ([toa] if toa is not None else [])
                written = await self.exchange(command("+CSCA", *args))
                return written.ok
        return False

    # --- USSD ------------------------------------------------------------------------------

    async def ussd(self, code: str, timeout: float = 30.0) -> str:
        """Run a USSD code (e.g. ``*888#``); the network's answer line (``+CUSD:`` value)."""
        if not re.fullmatch(r"[0-9*#+]{1,40}", code):
            raise ValueError("USSD code may contain only digits, *, # and +")
        loop = asyncio.get_running_loop()
        self._ussd = loop.create_future()
        try:
            reply = await self.exchange(command("+CUSD", 1, code, 15))
            if not reply.ok:
                raise CommandError("AT+CUSD", reply.final)
            async with asyncio.timeout(timeout):
                return await self._ussd
        except TimeoutError:
            raise AtTimeout("no USSD answer") from None
        finally:
            self._ussd = None

