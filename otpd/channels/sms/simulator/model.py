"""The simulated modem as a pure device model: bytes in, bytes out.

It speaks the AT subset otpd uses (and a little more), keeps an SMS storage,
decodes what it is asked to send, and can misbehave on request: error
replies, hangs, quirks of real modem families (profiles). No I/O and no
clock of its own: ``pty.py`` feeds it the host's bytes (``receive``), writes
what ``data_to_send()`` returns, sleeps while ``pause`` says the device is
busy and then calls ``resume()``; clocks are passed in.

Status reports: a part sent with TP-SRR gets one ``report_delay`` s later,
as the SIM's ``reports`` setting says ("delivered", "failed" with a permanent
error, "never"), passed on as ``AT+CNMI`` asked (ds=1: ``+CDS``; ds=2: stored
and announced with ``+CDSI``; ds=0: dropped). Timed events wait in a queue:
the adapter asks ``next_timer()`` and calls ``run_timers()`` when it is due.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from otpd.channels.sms import pdu
from otpd.channels.sms.at import CME_MEANINGS, CMS_MEANINGS
from otpd.channels.sms.profiles import PROFILES, Profile

_REC_UNREAD, _REC_READ, _STO_UNSENT, _STO_SENT, _ALL = 0, 1, 2, 3, 4
_TEXT_STAT = {"REC UNREAD": 0, "REC READ": 1, "STO UNSENT": 2, "STO SENT": 3, "ALL": 4}
_STAT_TEXT = {v: k for k, v in _TEXT_STAT.items()}
STO_SENT = _STO_SENT  # the stat of a stored copy of a sent message
# Commands that need the SIM's SMS service: they fail while the SIM is "busy".
_SIM_COMMANDS = {"+CMGF", "+CPMS", "+CMGS", "+CMGW", "+CMSS", "+CMGL", "+CMGR", "+CMGD", "+CSCA"}
_FAULTS = ("hang", "error", "not_ready")
# What the network reports for a part sent with TP-SRR, and the default TP-ST of each.
REPORTS = {"delivered": 0x00, "failed": 0x41, "never": None}


@dataclass(frozen=True)
class SentMessage:
    time: float
    receiver: str
    text: str
    parts: int
    modem: str


@dataclass
class Stored:
    stat: int
    pdu: str  # with SMSC field


def _split_args(text: str) -> list[str]:
    args, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    args.append("".join(cur).strip())
    return args


def _unquote(arg: str) -> str:
    return arg[1:-1] if len(arg) >= 2 and arg[0] == arg[-1] == '"' else arg


class DeviceModel:
    """One simulated modem, without the port.

    Tests inspect ``sent`` (complete decoded messages), ``storage`` (SIM
    slots), ``commands`` (every command line received) and ``pin_attempts``.
    ``clock`` is monotonic (SIM busy windows), ``wall_clock`` epoch seconds
    (times of sent and received messages); ``sent_sink`` sees each sent message
    before ``on_sent`` does (the adapter's log file).
    """

    def __init__(
        self,
        *,
        name: str,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        sent_sink: Callable[[SentMessage], None] | None = None,
        delay: float = 0.0,
        fail_rate: float = 0.0,
        profile: str = "generic",
        pin: str = "",
        seed: int | None = None,
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
        if reports not in REPORTS:
            raise ValueError(f"unknown reports {reports!r}; known: {', '.join(REPORTS)}")
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be 0..1")
        self.clock = clock
        self.wall_clock = wall_clock
        self.sent_sink = sent_sink
        self.delay = delay
        self.fail_rate = fail_rate
        self.profile: Profile = PROFILES[profile]
        self.pin = pin
        self.name = name
        # Each simulated SIM its own IMSI (per-SIM quotas tell SIMs apart by it).
        suffix = int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 10**6
        self.imsi = f"{self.profile.imsi[:-6]}{suffix:06d}"
        self.store_sent = store_sent
        self.urc_during_submit = urc_during_submit
        self.urc_interval = self.profile.periodic_interval if urc_interval is None else urc_interval
        self.not_ready = not_ready
        self.smsc = "+6281100000"
        # Huawei E220: "+CMS ERROR: 330" until AT+CSCA is written once.
        self.smsc_written = not smsc_unwritten
        self.capacity = capacity
        self.csq = csq
        self.fail_code = fail_code
        self.reports = reports
        self.report_delay = report_delay
        self.report_status = report_status  # overrides the TP-ST that ``reports`` implies
        self.report_ds = report_ds  # the AT+CNMI <ds> values this device accepts
        self._rng = random.Random(seed)

        self.sent: list[SentMessage] = []
        self.storage: dict[int, Stored] = {}
        self.commands: list[str] = []
        self.pin_attempts = 0
        self.resets = 0
        self.fault: str | None = None
        self.fault_code = 500
        self._fault_after: int | None = None  # parts still sent before the fault starts
        self._pending_fault: str | None = None
        self.status_reports: list[str] = []  # every report PDU the network sent back
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self.on_sent: Callable[[SentMessage], None] | None = None
        # Called with each command line the moment it is complete (benchmarks time it).
        self.on_command: Callable[[str], None] | None = None

        self._locked = bool(pin)
        self._puk = False
        self._mr = 0
        self._parts: dict[tuple[str, int, int], dict[int, str]] = {}
        self._busy_until = 0.0
        self._in = bytearray()  # host bytes not processed yet
        self._out = bytearray()  # device bytes for data_to_send()
        # Set while a command waits for the typed PDU/text after its prompt.
        self._typing: Callable[[str | None], None] | None = None
        # Seconds the device is busy (a send in progress, a USSD request), then _resume.
        self.pause: float | None = None
        self._resume: Callable[[], None] | None = None
        self._set_defaults()

    def _set_defaults(self) -> None:
        self.echo = self.profile.echo_default
        self.cmee = 0
        self.cmgf = 0
        self.cscs = "GSM"
        self.creg_mode = 0
        self.curc = True
        self.cnmi_ds = 0

    # --- lifecycle ----------------------------------------------------------------

    def power_on(self) -> None:
        """Switched on: SIM commands answer "busy" for ``not_ready`` s."""
        self._busy_until = self.clock() + self.not_ready

    def reboot(self) -> None:
        """Back after a USB re-enumeration: defaults again, the SIM locked again."""
        self._set_defaults()
        self._locked = bool(self.pin) and not self._puk
        self.power_on()

    def disconnect(self) -> None:
        """The port went away: unread input, a half-typed PDU and a pending send are lost."""
        self._in.clear()
        self._out.clear()
        self._typing = None
        self.pause = None
        self._resume = None

    # --- fault injection ----------------------------------------------------------

    def set_fault(self, kind: str | None, *, code: int = 500, after_parts: int = 0) -> None:
        """``hang``: answer nothing; ``error``: sends fail with ``+CMS ERROR: code``;
        ``not_ready``: SIM commands answer ``+CME ERROR: 14``; None clears.

        ``after_parts``: that many more parts are sent normally, then the fault
        starts in the middle of the next send, after its prompt and PDU (a
        ``hang`` there is a modem that stops while the message is on its way)."""
        if kind is not None and kind not in _FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(_FAULTS)}")
        if after_parts < 0:
            raise ValueError("after_parts must be >= 0")
        self.fault_code = code
        if kind is not None and after_parts:
            self.fault, self._pending_fault, self._fault_after = None, kind, after_parts
        else:
            self.fault, self._pending_fault, self._fault_after = kind, None, None

    def clear_fault(self) -> None:
        self.set_fault(None)

    def inject_incoming(self, sender: str, text: str) -> int:
        """An SMS arrives: stored as REC UNREAD and announced with +CMTI."""
        index = self._free_index()
        deliver = pdu.encode_deliver(sender, text, datetime.fromtimestamp(self.wall_clock(), UTC))
        self.storage[index] = Stored(_REC_UNREAD, deliver)
        self.emit_urc(f'+CMTI: "SM",{index}')
        return index

    def store_submit(self, receiver: str, text: str, stat: int = _STO_SENT) -> int:
        """Pre-seed a stored outgoing message (as other software would leave)."""
        index = self._free_index()
        self.storage[index] = Stored(stat, pdu.encode_submit(receiver, text)[0].hex)
        return index

    def emit_urc(self, line: str) -> None:
        self._write(f"\r\n{line}\r\n".encode())

    # --- bytes ------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the host; processed at once unless the device is busy (``pause``)."""
        self._in += data
        self._run()

    def data_to_send(self) -> bytes:
        """What the device has written since the last call (and forgets it)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def resume(self) -> None:
        """The ``pause`` is over: finish what was waiting, then go on with the input."""
        resume, self._resume, self.pause = self._resume, None, None
        if resume is not None:
            self._guard(resume)
        self._run()

    def _write(self, data: bytes) -> None:
        if self.fault == "hang":
            return
        self._out += data

    def _take(self, stops: bytes) -> tuple[bytes, int] | None:
        """Bytes up to the first byte in ``stops`` (consumed), and that byte; None: not yet."""
        positions = [p for p in (self._in.find(bytes([s])) for s in stops) if p >= 0]
        if not positions:
            return None
        cut = min(positions)
        data, stop = bytes(self._in[:cut]), self._in[cut]
        del self._in[: cut + 1]
        return data, stop

    def _pause(self, seconds: float, then: Callable[[], None]) -> None:
        """Busy for ``seconds``: input waits, ``then`` runs on resume()."""
        self.pause, self._resume = seconds, then

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except (ValueError, IndexError, KeyError):
            self._reply(final="ERROR")  # a malformed argument

    # --- replies ---------------------------------------------------------------------

    def _reply(self, lines: list[str] | tuple[str, ...] = (), final: str = "OK") -> None:
        out = "".join(f"\r\n{line}\r\n" for line in lines) + f"\r\n{final}\r\n"
        if self.profile.trailing_blank:
            out += "\r\n"
        self._write(out.encode("latin-1", "replace"))

    def _cme(self, code: int) -> None:
        self._error("+CME ERROR", code, CME_MEANINGS.get(code, "unknown"))

    def _cms(self, code: int) -> None:
        self._error("+CMS ERROR", code, CMS_MEANINGS.get(code, "unknown error"))

    def _error(self, prefix: str, code: int, text: str) -> None:
        if self.cmee == 0:
            self._reply(final="ERROR")
        else:
            self._reply(final=f"{prefix}: {code if self.cmee == 1 else text}")

    def _urcs(self, lines: tuple[str, ...]) -> None:
        if self.urc_during_submit:
            for line in lines:
                self.emit_urc(line.format(csq=self.csq))

    # --- command processing --------------------------------------------------------------

    def _run(self) -> None:
        while self.pause is None:
            if self._typing is not None:
                typed = self._take(b"\x1a\x1b")
                if typed is None:
                    return
                done, self._typing = self._typing, None
                data, stop = typed
                self._guard(partial(self._finish_typing, done, data, stop))
                continue
            line = self._take(b"\r")
            if line is None:
                return
            self._line(line[0])

    def _line(self, raw: bytes) -> None:
        # LF after CR, stray ^Z/ESC and NULs from a confused host are line noise.
        text = raw.translate(None, b"\n\x1a\x1b\x00").decode("latin-1").strip()
        if not text:
            return
        self.commands.append(text)
        if self.on_command is not None:
            self.on_command(text)
        if self.fault == "hang":
            return
        if self.echo:
            self._write(text.encode("latin-1") + b"\r")
        if text[:2].upper() != "AT":
            return
        self._guard(lambda: self._command(text[2:]))

    def _command(self, body: str) -> None:
        upper = body.upper()
        m = re.match(r"([+^][A-Z]+)(=\?|\?|=)?(.*)", upper)
        if not m:
            self._basic(upper)
            return
        name, op, _ = m.groups()
        args = body[len(name) + len(op or "") :]
        op = op or ""
        if self._locked and name != "+CPIN" and (self.profile.pin_first or name in _SIM_COMMANDS
                                                 or name in ("+CMGF", "+COPS", "+CIMI", "+CUSD")):
            self._cme(12 if self._puk else 11)
            return
        if name in _SIM_COMMANDS and (
            self.fault == "not_ready" or self.clock() < self._busy_until
        ):
            self._cme(14)
            return
        handler = getattr(self, "_cmd_" + name[1:].lower(), None)
        if handler is None:
            self._reply(final=self.profile.unsupported)
            return
        handler(op, args)

    def _basic(self, body: str) -> None:
        if self._locked and self.profile.pin_first and body != "":
            self._reply(final="ERROR")  # Qualcomm/ZTE: even ATZ fails while PIN-locked
            return
        if body in ("", "&F"):
            self._reply()
        elif body in ("Z", "Z0"):
            self.resets += 1
            self._set_defaults()
            self._reply()
        elif body in ("E0", "E", "E1"):
            self.echo = body == "E1"
            self._reply()
        elif body == "I":
            self._reply([self.profile.manufacturer, self.profile.model, self.profile.revision])
        else:
            self._reply(final=self.profile.unsupported)

    # Each handler gets the operator ("", "?", "=", "=?") and the raw argument text.

    def _cmd_cmee(self, op: str, args: str) -> None:
        if op == "=" and args.strip() in ("0", "1", "2"):
            self.cmee = int(args)
            self._reply()
        elif op == "?":
            self._reply([f"+CMEE: {self.cmee}"])
        elif op == "=?":
            self._reply(["+CMEE: (0-2)"])
        else:
            self._reply(final="ERROR")

    def _cmd_cpin(self, op: str, args: str) -> None:
        if op == "?":
            state = "SIM PUK" if self._puk else "SIM PIN" if self._locked else "READY"
            if self.profile.cpin_ok:
                self._reply([f"+CPIN: {state}"])
            else:
                self._write(f"\r\n+CPIN: {state}\r\n".encode())
            return
        if op != "=":
            self._reply(final="ERROR")
            return
        self.pin_attempts += 1
        given = _unquote(_split_args(args)[0])
        if not self._locked:
            self._cme(3)
        elif self._puk:
            self._cme(12)
        elif given == self.pin:
            self._locked = False
            self._busy_until = self.clock() + self.not_ready
            self._reply()
        else:
            if self.pin_attempts >= 3:
                self._puk = True
            self._cme(16)

    def _cmd_cmgf(self, op: str, args: str) -> None:
        if op == "=" and args.strip() in ("0", "1"):
            self.cmgf = int(args)
            self._reply()
        elif op == "?":
            self._reply([f"+CMGF: {self.cmgf}"])
        else:
            self._reply(["+CMGF: (0,1)"] if op == "=?" else [], "OK" if op == "=?" else "ERROR")

    def _cmd_cscs(self, op: str, args: str) -> None:
        if op == "=" and _unquote(args.strip()) in ("GSM", "IRA", "UCS2"):
            self.cscs = _unquote(args.strip())
            self._reply()
        elif op == "?":
            self._reply([f'+CSCS: "{self.cscs}"'])
        elif op == "=?":
            self._reply(['+CSCS: ("IRA","GSM","UCS2")'])
        else:
            self._reply(final="ERROR")

    def _cmd_csmp(self, op: str, args: str) -> None:
        self._reply(["+CSMP: 17,167,0,0"] if op == "?" else [])

    def _cmd_cnmi(self, op: str, args: str) -> None:
        values = args.replace(" ", "").split(",")
        ds = int(values[3]) if op == "=" and len(values) > 3 and values[3] else 0
        if op == "=" and (args.replace(" ", "") in self.profile.reject_cnmi
                          or ds not in self.report_ds):
            self._reply(final="ERROR")
            return
        if op == "=":
            self.cnmi_ds = ds
        self._reply([f"+CNMI: 2,1,0,{self.cnmi_ds},0"] if op == "?" else [])

    def _cmd_csms(self, op: str, args: str) -> None:
        if op == "=" and args.strip() in ("0", "1"):
            self._reply(["+CSMS: 1,1,1"])
        elif op == "?":
            self._reply(["+CSMS: 0,1,1,1"])
        else:
            self._reply(["+CSMS: (0,1)"] if op == "=?" else [], "OK" if op == "=?" else "ERROR")

    def _cmd_cfun(self, op: str, args: str) -> None:
        if op == "?":
            self._reply(["+CFUN: 1"])
            return
        if args.replace(" ", "") == "1,1":
            self.resets += 1
            self._set_defaults()
        self._reply()

    def _cmd_curc(self, op: str, args: str) -> None:
        if self.profile.name != "huawei":
            self._reply(final=self.profile.unsupported)
            return
        self.curc = args.strip() != "0"
        self._reply()

    def _cmd_csq(self, op: str, args: str) -> None:
        self._reply([f"+CSQ: {self.csq},99"] if op != "=?" else ["+CSQ: (0-31,99),(0-7,99)"])

    def _cmd_creg(self, op: str, args: str) -> None:
        if op == "=":
            self.creg_mode = int(args or "0")
            self._reply()
        elif self.creg_mode == 2:
            self._reply([f"+CREG: {self.creg_mode},1,4CA,81DE445"])
        else:
            self._reply([f"+CREG: {self.creg_mode},1"])

    def _cmd_cops(self, op: str, args: str) -> None:
        self._reply([f'+COPS: 0,0,"{self.profile.operator}",2'] if op == "?" else [])

    def _cmd_cgmi(self, op: str, args: str) -> None:
        self._reply([self.profile.manufacturer])

    def _cmd_cgmm(self, op: str, args: str) -> None:
        self._reply([self.profile.model])

    def _cmd_cgmr(self, op: str, args: str) -> None:
        if self.profile.revision:
            self._reply([self.profile.revision])
        else:
            self._reply(final="ERROR")

    def _cmd_cgsn(self, op: str, args: str) -> None:
        imei = self.profile.imei
        self._reply([f'+CGSN: "{imei}"' if self.profile.cgsn_prefixed else imei])

    def _cmd_cimi(self, op: str, args: str) -> None:
        self._reply([self.imsi])

    def _cmd_csca(self, op: str, args: str) -> None:
        if op == "?":
            toa = 145 if self.smsc.startswith("+") else 129
            self._reply([f'+CSCA: "{self.smsc}",{toa}'])
        elif op == "=":
            self.smsc = _unquote(_split_args(args)[0])
            self.smsc_written = True
            self._reply()
        else:
            self._reply(final="ERROR")

    def _cmd_cusd(self, op: str, args: str) -> None:
        parts = _split_args(args)
        self._reply()
        if op == "=" and parts[0] == "1" and len(parts) > 1:
            # The network answers a moment after the OK.
            self._pause(0.01, lambda: self.emit_urc(
                '+CUSD: 0,"Balance: 10000. Valid until 31-12-2030.",15'))

    # --- storage ------------------------------------------------------------------------

    def _free_index(self) -> int:
        base = self.profile.index_base
        for i in range(base, base + self.capacity):
            if i not in self.storage:
                return i
        raise ValueError("storage full")

    def _cmd_cpms(self, op: str, args: str) -> None:
        used, cap = len(self.storage), self.capacity
        if op == "=?":
            group = "(" + ",".join(f'"{s}"' for s in self.profile.storages) + ")"
            self._reply(["+CPMS: " + ",".join([group] * self.profile.max_storages)])
        elif op == "?":
            groups = [f'"SM",{used},{cap}'] * self.profile.max_storages
            self._reply(["+CPMS: " + ",".join(groups)])
        elif op == "=":
            names = [_unquote(a) for a in _split_args(args)]
            if len(names) > self.profile.max_storages:
                self._reply(final="ERROR")
            elif any(n not in self.profile.storages for n in names):
                self._cms(302)
            else:
                self._reply(["+CPMS: " + ",".join([f"{used},{cap}"] * self.profile.max_storages)])
        else:
            self._reply(final="ERROR")

    def _stat_arg(self, arg: str) -> int:
        arg = arg.strip()
        if self.cmgf == 1:
            return _TEXT_STAT[_unquote(arg).upper()]
        return int(arg) if arg else _REC_UNREAD

    def _cmd_cmgl(self, op: str, args: str) -> None:
        if op == "=?":
            self._reply(["+CMGL: (0-4)"])
            return
        wanted = self._stat_arg(args)
        lines: list[str] = []
        for index in sorted(self.storage):
            item = self.storage[index]
            if wanted not in (_ALL, item.stat):
                continue
            lines += self._listing("+CMGL", index, item)
            if item.stat == _REC_UNREAD:
                item.stat = _REC_READ  # listing marks received messages read (27.005)
        self._reply(lines)

    def _listing(self, prefix: str, index: int, item: Stored) -> list[str]:
        if self.cmgf == 0:
            tpdu_len = len(item.pdu) // 2 - 1 - int(item.pdu[:2], 16)
            head = f"{index}," if prefix == "+CMGL" else ""
            return [f"{prefix}: {head}{item.stat},,{tpdu_len}", item.pdu]
        msg = pdu.decode(item.pdu)
        if isinstance(msg, pdu.StatusReport):  # text mode: 27.005 §3.4.1 report fields
            return [f'{prefix}: {f"{index}," if prefix == "+CMGL" else ""}'
                    f'"{_STAT_TEXT[item.stat]}",6,{msg.reference}']
        who = msg.receiver if isinstance(msg, pdu.Submit) else msg.sender
        head = f"{index}," if prefix == "+CMGL" else ""
        return [f'{prefix}: {head}"{_STAT_TEXT[item.stat]}","{who}"', msg.text]

    def _cmd_cmgr(self, op: str, args: str) -> None:
        item = self.storage.get(int(args))
        if item is None:
            self._cms(321)
            return
        lines = self._listing("+CMGR", int(args), item)
        if item.stat == _REC_UNREAD:
            item.stat = _REC_READ
        self._reply(lines)

    def _cmd_cmgd(self, op: str, args: str) -> None:
        if op == "=?":
            self._reply([f"+CMGD: ({','.join(map(str, sorted(self.storage)))}),(0-4)"])
            return
        parts = _split_args(args)
        index, flag = int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0
        doomed: dict[int, set[int]] = {  # delflag -> stats removed besides <index>
            0: set(),
            1: {_REC_READ},
            2: {_REC_READ, _STO_SENT},
            3: {_REC_READ, _STO_SENT, _STO_UNSENT},
            4: {_REC_UNREAD, _REC_READ, _STO_SENT, _STO_UNSENT},
        }
        stats = doomed[flag]
        # With a delflag above 0 the index is ignored (27.005).
        hit = [i for i, item in self.storage.items()
               if (flag == 0 and i == index) or item.stat in stats]
        for i in hit:
            del self.storage[i]
        self._reply()

    # --- sending -----------------------------------------------------------------------

    def _prompt_input(self, then: Callable[[str | None], None]) -> None:
        """Prompt; ``then`` gets the typed PDU/text, or None when the host aborted with ESC."""
        self._urcs(self.profile.submit_urcs)
        self._write(self.profile.prompt)
        self._typing = then

    def _finish_typing(self, done: Callable[[str | None], None], data: bytes, stop: int) -> None:
        done(self._typed(data, stop))

    def _typed(self, data: bytes, stop: int) -> str | None:
        if self.echo and self.fault != "hang":
            self._write(data + bytes([stop]))
        if stop == 0x1B:
            if self.profile.esc_reply:
                self._reply()
            return None
        return data.translate(None, b"\r\n").decode("latin-1").strip()

    def _cmd_cmgs(self, op: str, args: str) -> None:
        if op != "=":
            self._reply(final="ERROR")
            return
        self._prompt_input(lambda typed: self._cmgs_typed(args, typed))

    def _cmgs_typed(self, args: str, typed: str | None) -> None:
        if typed is None:
            return
        if self.cmgf == 1:
            receiver, text = _unquote(_split_args(args)[0]), self._text_input(typed)
            self._submit(pdu.encode_submit(receiver, text)[0].hex, "+CMGS")
            return
        if not self._valid_pdu(typed, int(args.split(",")[0])):
            self._cms(304)
            return
        self._submit(typed, "+CMGS")

    def _text_input(self, typed: str) -> str:
        if self.cscs == "UCS2":
            return bytes.fromhex(typed).decode("utf-16-be", "replace")
        return typed

    def _valid_pdu(self, hex_pdu: str, length: int) -> bool:
        try:
            raw = bytes.fromhex(hex_pdu)
            msg = pdu.decode(hex_pdu)
        except (ValueError, pdu.PduError):
            return False
        return isinstance(msg, pdu.Submit) and len(raw) - 1 - raw[0] == length

    def _submit(
        self, hex_pdu: str, prefix: str, done: Callable[[bool], None] | None = None
    ) -> None:
        """Send a part; ``done`` learns whether it went (after ``delay`` s, if any)."""
        if not self.smsc_written or not self.smsc:
            self._cms(330)
            return
        if self.store_sent and prefix == "+CMGS" and len(self.storage) >= self.capacity:
            self._cms(322)  # no slot for the copy it keeps: refuses to send
            return
        if self._fault_after is not None:
            if self._fault_after == 0:
                self.fault, self._pending_fault, self._fault_after = (
                    self._pending_fault, None, None)
            else:
                self._fault_after -= 1
        if self.delay:
            self._pause(self.delay, lambda: self._transmit(hex_pdu, prefix, done))
        else:
            self._transmit(hex_pdu, prefix, done)

    def _transmit(self, hex_pdu: str, prefix: str, done: Callable[[bool], None] | None) -> None:
        # Faults are looked at after the delay: one set meanwhile hits this part.
        sent = self._outcome(hex_pdu, prefix)
        if done is not None:
            done(sent)

    def _outcome(self, hex_pdu: str, prefix: str) -> bool:
        if self.fault == "hang":
            return False
        if self.fault == "error":
            self._cms(self.fault_code)
            return False
        if self.fail_rate and self._rng.random() < self.fail_rate:
            self._cms(self.fail_code)
            return False
        self._urcs(self.profile.submit_urcs)
        self._mr = (self._mr + 1) % 256
        self._record(hex_pdu)
        self._expect_report(hex_pdu, self._mr)
        if self.store_sent and prefix == "+CMGS":
            with contextlib.suppress(ValueError):  # filled by an SMS received meanwhile
                self.storage[self._free_index()] = Stored(_STO_SENT, hex_pdu)
        self._reply([f"{prefix}: {self._mr}"])
        return True

    def _cmd_cmgw(self, op: str, args: str) -> None:
        if op != "=":
            self._reply(final="ERROR")
            return
        parts = _split_args(args)
        self._prompt_input(lambda typed: self._cmgw_typed(parts, typed))

    def _cmgw_typed(self, parts: list[str], typed: str | None) -> None:
        if typed is None:
            return
        if self.cmgf == 1:
            hex_pdu = pdu.encode_submit(_unquote(parts[0]), self._text_input(typed))[0].hex
        elif self._valid_pdu(typed, int(parts[0])):
            hex_pdu = typed
        else:
            self._cms(304)
            return
        stat = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else _STO_UNSENT
        try:
            index = self._free_index()
        except ValueError:
            self._cms(322)
            return
        self.storage[index] = Stored(stat, hex_pdu)
        self._reply([f"+CMGW: {index}"])

    def _cmd_cmss(self, op: str, args: str) -> None:
        item = self.storage.get(int(_split_args(args)[0]))
        if item is None or item.stat not in (_STO_UNSENT, _STO_SENT):
            self._cms(321)
            return

        def done(sent: bool) -> None:
            if sent:
                item.stat = _STO_SENT

        self._submit(item.pdu, "+CMSS", done)

    def _record(self, hex_pdu: str) -> None:
        msg = pdu.decode(hex_pdu)
        assert isinstance(msg, pdu.Submit)
        if msg.concat is None or msg.concat.total <= 1:
            self._deliver(msg.receiver, msg.text, 1)
            return
        key = (msg.receiver, msg.concat.reference, msg.concat.total)
        parts = self._parts.setdefault(key, {})
        parts[msg.concat.sequence] = msg.text
        if len(parts) == msg.concat.total:
            del self._parts[key]
            text = pdu.join_texts([parts[i] for i in sorted(parts)])
            self._deliver(msg.receiver, text, msg.concat.total)

    def _deliver(self, receiver: str, text: str, parts: int) -> None:
        item = SentMessage(self.wall_clock(), receiver, text, parts, self.name)
        self.sent.append(item)
        if self.sent_sink is not None:
            self.sent_sink(item)
        if self.on_sent is not None:
            self.on_sent(item)

    # --- status reports -------------------------------------------------------------

    def _expect_report(self, hex_pdu: str, mr: int) -> None:
        msg = pdu.decode(hex_pdu)
        status = REPORTS[self.reports]
        if status is not None and self.report_status is not None:
            status = self.report_status
        if not isinstance(msg, pdu.Submit) or not msg.status_report or status is None:
            return  # "never": the network stays silent
        submitted = self.wall_clock()
        self.after(self.report_delay,
                   partial(self._status_report, mr, msg.receiver, submitted, status))

    def _status_report(self, mr: int, receiver: str, submitted: float, status: int) -> None:
        now = self.wall_clock()
        report = pdu.encode_status_report(
            mr, receiver, datetime.fromtimestamp(submitted, UTC),
            datetime.fromtimestamp(now, UTC), status)
        self.status_reports.append(report)
        if self.cnmi_ds == 1:
            self.emit_urc(f"+CDS: {len(report) // 2 - 1}\r\n{report}")
        elif self.cnmi_ds == 2:
            try:
                index = self._free_index()
            except ValueError:
                return  # storage full: the report is lost, as on a real modem
            self.storage[index] = Stored(_REC_UNREAD, report)
            self.emit_urc(f'+CDSI: "SM",{index}')

    # --- timers -----------------------------------------------------------------------

    def after(self, seconds: float, action: Callable[[], None]) -> None:
        """Run ``action`` once ``seconds`` have passed on ``clock``."""
        heapq.heappush(self._timers, (self.clock() + seconds, next(self._timer_ids), action))

    def next_timer(self) -> float | None:
        """The ``clock`` time of the next timed event, if any."""
        return self._timers[0][0] if self._timers else None

    def run_timers(self) -> None:
        """Run every timed event that is due."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            if self.fault != "hang":
                action()

    def periodic_urc(self, tick: int) -> bool:
        """The ``tick``-th periodic URC of the profile; False while URCs are off (^CURC=0)."""
        if not self.curc:
            return False
        urcs = self.profile.periodic_urcs
        self.emit_urc(urcs[tick % len(urcs)].format(csq=self.csq))
        return True
