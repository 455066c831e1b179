"""Sans-I/O AT command layer: builds safe command lines and parses modem output.

No serial port here: :class:`AtParser` is fed bytes and returns events, so every
framing quirk (echo, prompts without line end, URCs in the middle of a reply,
vendor final codes, garbage) is testable without a device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

CTRL_Z = b"\x1a"
ESC = b"\x1b"

# Characters never allowed inside a command line or a quoted argument: they would
# end the command (CR), start PDU/text input (^Z), abort it (ESC) or close a quote.
_FORBIDDEN_IN_ARG = frozenset('\r\n\x1a\x1b"')
_HEX = re.compile(r"\A(?:[0-9A-F]{2})+\Z")
_MAX_COMMAND = 512


class AtSyntaxError(ValueError):
    """A command or argument that must not be sent to a modem."""


# --- building commands -------------------------------------------------------


def quote(value: str) -> str:
    """A string argument in double quotes; refuses anything that could escape it."""
    bad = sorted({c for c in value if c in _FORBIDDEN_IN_ARG or not c.isprintable()})
    if bad:
        raise AtSyntaxError(f"argument contains forbidden characters {bad!r}")
    if not value.isascii():
        raise AtSyntaxError("argument must be ASCII")
    return f'"{value}"'


def command(name: str, *args: int | str | None) -> str:
    """``command("+CMGS", 23)`` -> ``AT+CMGS=23``; str args are quoted, None leaves a gap."""
    check_command(f"AT{name}")
    if not args:
        return f"AT{name}"
    parts: list[str] = []
    for arg in args:
        if arg is None:
            parts.append("")
        elif isinstance(arg, bool):
            raise AtSyntaxError("boolean is not an AT argument")
        elif isinstance(arg, int):
            parts.append(str(arg))
        else:
            parts.append(quote(arg))
    return check_command(f"AT{name}=" + ",".join(parts))


def check_command(line: str) -> str:
    """Validate a whole command line (e.g. a user's ``init_commands`` entry)."""
    if not line[:2].upper() == "AT":
        raise AtSyntaxError("command must start with AT")
    if len(line) > _MAX_COMMAND:
        raise AtSyntaxError(f"command longer than {_MAX_COMMAND} characters")
    if not line.isascii() or any(c in "\r\n\x1a\x1b" or not c.isprintable() for c in line):
        raise AtSyntaxError("command contains control or non-ASCII characters")
    if line.count('"') % 2:
        raise AtSyntaxError("command has an unbalanced quote")
    return line


def encode_command(line: str) -> bytes:
    return check_command(line).encode("ascii") + b"\r"


def encode_pdu(hex_pdu: str) -> bytes:
    """The bytes typed after the ``>`` prompt: upper-case hex then ^Z."""
    if not _HEX.match(hex_pdu):
        raise AtSyntaxError("PDU must be upper-case hex octets")
    return hex_pdu.encode("ascii") + CTRL_Z


def response_prefix(line: str) -> str | None:
    """``AT+CREG?`` -> ``+CREG:``; lines with this prefix belong to the reply."""
    m = re.match(r"AT([+^$%][A-Za-z0-9]+)", line, re.IGNORECASE)
    return m.group(1).upper() + ":" if m else None


# --- final result codes --------------------------------------------------------


class FinalKind(Enum):
    OK = "OK"
    ERROR = "ERROR"
    CME = "+CME ERROR"
    CMS = "+CMS ERROR"
    VENDOR = "VENDOR"  # COMMAND NOT SUPPORT, TOO MANY PARAMETERS, NO CARRIER, MODEM ERROR


CME_MEANINGS: dict[int, str] = {
    0: "phone failure",
    1: "no connection to phone",
    2: "phone adaptor link reserved",
    3: "operation not allowed",
    4: "operation not supported",
    5: "PH-SIM PIN required",
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    14: "SIM busy",
    15: "SIM wrong",
    16: "incorrect password",
    17: "SIM PIN2 required",
    18: "SIM PUK2 required",
    20: "memory full",
    21: "invalid index",
    22: "not found",
    23: "memory failure",
    24: "text string too long",
    25: "invalid characters in text string",
    26: "dial string too long",
    27: "invalid characters in dial string",
    30: "no network service",
    31: "network timeout",
    32: "network not allowed - emergency calls only",
    100: "unknown",
    515: "please wait, init or command processing in progress",
    536: "device stuck (vendor)",
}

CMS_MEANINGS: dict[int, str] = {
    1: "unassigned (unallocated) number",
    8: "operator determined barring",
    10: "call barred",
    21: "short message transfer rejected",
    27: "destination out of service",
    28: "unidentified subscriber",
    29: "facility rejected",
    30: "unknown subscriber",
    38: "network out of order",
    41: "temporary failure",
    42: "congestion",
    47: "resources unavailable",
    50: "requested facility not subscribed",
    69: "requested facility not implemented",
    96: "invalid mandatory information",
    111: "protocol error",
    127: "interworking unspecified",
    192: "SC busy",
    193: "no SC subscription",
    195: "invalid SME address",
    196: "destination SME barred",
    208: "SIM SMS storage full",
    209: "no SMS storage capability in SIM",
    211: "memory capacity exceeded",
    212: "SIM application toolkit busy",
    300: "ME failure",
    301: "SMS service of ME reserved",
    302: "operation not allowed",
    303: "operation not supported",
    304: "invalid PDU mode parameter",
    305: "invalid text mode parameter",
    310: "SIM not inserted",
    311: "SIM PIN required",
    312: "PH-SIM PIN required",
    313: "SIM failure",
    314: "SIM busy",
    315: "SIM wrong",
    316: "SIM PUK required",
    317: "SIM PIN2 required",
    318: "SIM PUK2 required",
    320: "memory failure",
    321: "invalid memory index",
    322: "memory full",
    330: "SMSC address unknown",
    331: "no network service",
    332: "network timeout",
    340: "no +CNMA acknowledgement expected",
    350: "submission failed (vendor catch-all)",
    500: "unknown error",
}

_VENDOR_FINALS = ("COMMAND NOT SUPPORT", "TOO MANY PARAMETERS", "NO CARRIER", "MODEM ERROR")
_FINAL_RE = re.compile(r"\A\+(CME|CMS) ERROR:\s*(.*)\Z", re.IGNORECASE)


@dataclass(frozen=True)
class Final:
    kind: FinalKind
    code: int | None = None  # numeric CME/CMS code when known
    text: str = ""  # the line as received

    @property
    def ok(self) -> bool:
        return self.kind is FinalKind.OK

    @property
    def meaning(self) -> str:
        table = CME_MEANINGS if self.kind is FinalKind.CME else CMS_MEANINGS
        if self.code is not None and self.kind in (FinalKind.CME, FinalKind.CMS):
            return table.get(self.code, "unknown code")
        return self.text

    def describe(self) -> str:
        if self.kind in (FinalKind.CME, FinalKind.CMS) and self.code is not None:
            return f"{self.kind.value}: {self.code} ({self.meaning})"
        return self.text or self.kind.value


def parse_final(line: str) -> Final | None:
    """The final result code on this line, or None if the line is not one."""
    upper = line.upper()
    if upper == "OK":
        return Final(FinalKind.OK, text="OK")
    if upper == "ERROR":
        return Final(FinalKind.ERROR, text="ERROR")
    m = _FINAL_RE.match(line)
    if m:
        kind = FinalKind.CME if m.group(1).upper() == "CME" else FinalKind.CMS
        return Final(kind, _error_code(m.group(2).strip(), kind), line)
    if any(upper.startswith(v) for v in _VENDOR_FINALS):
        return Final(FinalKind.VENDOR, text=line)
    return None


def _error_code(value: str, kind: FinalKind) -> int | None:
    if value.lstrip("-").isdigit():
        return int(value)
    # AT+CMEE=2 text form: map back to the number where the text is a known one.
    table = CME_MEANINGS if kind is FinalKind.CME else CMS_MEANINGS
    wanted = value.lower()
    for code, meaning in table.items():
        if meaning.lower() == wanted:
            return code
    return None


# --- unsolicited result codes ------------------------------------------------------

# Prefixes of lines a modem sends on its own. A line with the running command's
# own prefix (``+CREG:`` for ``AT+CREG?``) is part of the reply instead.
_URC_PREFIXES = (
    "+CMTI:", "+CMT:", "+CDS:", "+CDSI:", "+CBM:", "+CBMI:", "+CREG:", "+CGREG:",
    "+CEREG:", "+CUSD:", "+CLIP:", "+CRING:", "+CPIN:", "+CFUN:", "+CSQ:", "+CIEV:",
    "+CGEV:", "+CTZV:", "+NITZ:", "+CNSMOD:", "+QIND:", "+QUSIM:", "+WIND:", "+STIN:",
    "+CUSATP:", "+CUSATEND", "+PACSP", "+ZDONR:", "+ZPASR:", "+ZUSIMR:", "+ZEND",
    "+ZPSTM:", "+ZPAS:",
)  # fmt: skip
_URC_WORDS = (
    "RING", "RDY", "CALL READY", "SMS READY", "PB DONE", "SMS DONE", "NORMAL POWER DOWN",
    "UNDER-VOLTAGE", "OVER-VOLTAGE",
)  # fmt: skip
# These URCs carry a second line (a PDU in PDU mode, the text in text mode).
_TWO_LINE = ("+CMT:", "+CBM:")


def is_urc(line: str) -> bool:
    upper = line.upper()
    if upper.startswith("^"):
        return True
    return upper.startswith(_URC_PREFIXES) or upper.startswith(_URC_WORDS)


def _urc_has_body(line: str) -> bool:
    upper = line.upper()
    if upper.startswith(_TWO_LINE):
        return True
    # PDU-mode status report: "+CDS: <length>" (one number); text mode has 6+ fields.
    return upper.startswith("+CDS:") and upper[5:].strip().isdigit()


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class Urc:
    line: str
    body: str | None = None  # second line of +CMT/+CDS/+CBM


@dataclass(frozen=True)
class Prompt:
    """The modem waits for PDU/text input (``> ``)."""


@dataclass(frozen=True)
class Reply:
    command: str
    lines: tuple[str, ...]
    final: Final

    @property
    def ok(self) -> bool:
        return self.final.ok

    def prefixed(self, prefix: str) -> list[str]:
        """Values of lines starting with ``prefix`` (``+CSQ:``), prefix stripped."""
        n = len(prefix)
        return [ln[n:].strip() for ln in self.lines if ln.upper().startswith(prefix.upper())]


@dataclass(frozen=True)
class Stray:
    """A line that belongs to nothing (late final after a timeout, garbage)."""

    line: str


Event = Urc | Prompt | Reply | Stray


@dataclass
class _Exchange:
    command: str
    prefix: str | None
    expect_prompt: bool
    lines: list[str] = field(default_factory=list)
    echo: set[str] = field(default_factory=set)
    prompted: bool = False


class AtParser:
    """Turns modem bytes into events for at most one running exchange.

    ``begin()`` before writing a command; ``feed()`` with whatever arrived;
    ``cancel()`` on timeout (returns the lines gathered so far, which is how a
    ``+CPIN: READY`` without ``OK`` is still understood).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._exchange: _Exchange | None = None
        self._urc_waiting_body: str | None = None

    @property
    def busy(self) -> bool:
        return self._exchange is not None

    def begin(self, line: str, *, expect_prompt: bool = False) -> None:
        if self._exchange is not None:
            raise RuntimeError("an AT exchange is already running")
        self._exchange = _Exchange(
            line, response_prefix(line), expect_prompt, echo={line.strip().upper()}
        )

    def expect_echo(self, text: str) -> None:
        """Input typed after the prompt (a PDU) may come back as echo: ignore it."""
        if self._exchange is not None:
            self._exchange.echo.add(text.strip().upper())

    def cancel(self) -> list[str]:
        ex, self._exchange = self._exchange, None
        return list(ex.lines) if ex else []

    def reset(self) -> None:
        self._buf.clear()
        self._exchange = None
        self._urc_waiting_body = None

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        self._buf += data
        while True:
            cut = _line_end(self._buf)
            if cut < 0:
                break
            raw = bytes(self._buf[:cut])
            del self._buf[: cut + 1]
            self._line(_text(raw), events)
        if self._waiting_prompt():
            # The prompt is "> " with no line end after it (some modems add CRLF).
            pending = _text(bytes(self._buf))
            if pending in (">", "> ") or pending.startswith("> "):
                self._buf.clear()
                self._prompt(events)
        if len(self._buf) > 4096:  # a modem spewing without line ends: drop it
            events.append(Stray(_text(bytes(self._buf[:80]))))
            self._buf.clear()
        return events

    def _waiting_prompt(self) -> bool:
        ex = self._exchange
        return ex is not None and ex.expect_prompt and not ex.prompted

    def _prompt(self, events: list[Event]) -> None:
        assert self._exchange is not None
        self._exchange.prompted = True
        events.append(Prompt())

    def _line(self, line: str, events: list[Event]) -> None:
        if not line:
            return
        if self._urc_waiting_body is not None:
            head, self._urc_waiting_body = self._urc_waiting_body, None
            events.append(Urc(head, line))
            return
        ex = self._exchange
        if ex is None:
            self._unsolicited(line, events)
            return
        if line.upper() in ex.echo:
            return
        if self._waiting_prompt() and line.startswith(">") and line[1:].strip() == "":
            self._prompt(events)
            return
        final = parse_final(line)
        if final is not None:
            self._exchange = None
            events.append(Reply(ex.command, tuple(ex.lines), final))
            return
        own = ex.prefix is not None and line.upper().startswith(ex.prefix)
        if not own and is_urc(line):
            self._unsolicited(line, events)
            return
        ex.lines.append(line)

    def _unsolicited(self, line: str, events: list[Event]) -> None:
        if is_urc(line):
            if _urc_has_body(line):
                self._urc_waiting_body = line
            else:
                events.append(Urc(line))
        else:
            events.append(Stray(line))


def _line_end(buf: bytearray) -> int:
    cr, lf = buf.find(b"\r"), buf.find(b"\n")
    if cr < 0:
        return lf
    if lf < 0:
        return cr
    return min(cr, lf)


def _text(raw: bytes) -> str:
    # Modems send ASCII, but noisy lines and NUL spew must never raise.
    return raw.replace(b"\x00", b"").decode("utf-8", errors="replace").strip()
