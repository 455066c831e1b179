"""What modem replies mean: pure functions over the lines the AT parser yields.

Input is a reply's lines or one ``Reply.prefixed()`` value (prefix stripped),
output a typed value. No I/O here: the driver (``modem.py``) asks, these read
the answers. Real answers, quirks included: ``reference/modem-quirks.md``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from otpd.channels.sms.at import Final, FinalKind

# Answers meaning "not yet, ask again shortly" (SIM still initialising, busy).
NOT_READY = frozenset({(FinalKind.CME, 14), (FinalKind.CME, 515), (FinalKind.CMS, 314)})
# Send failures that no other modem or later attempt can fix.
PERMANENT_CMS = frozenset({1, 96, 195})
# "Memory full": the SMS storage has no free slot (CMS 322, CME 20).
STORAGE_FULL = frozenset({(FinalKind.CMS, 322), (FinalKind.CME, 20)})
# Unsolicited lines a modem sends when it has (re)started on its own.
RESTART_URCS = ("RDY", "^SYSSTART")

_CMGL = re.compile(r"\+CMGL:\s*(\d+)\s*,\s*(\d+)(?:\s*,[^,]*,\s*(\d+))?", re.IGNORECASE)
_CMGL_SPLIT = re.compile(r"\+CMGL:", re.IGNORECASE)
_USSD = re.compile(r'\s*(\d)\s*(?:,\s*"?(.*?)"?\s*(?:,\s*(\d+))?)?\s*$', re.DOTALL)
_UCS2_HEX = re.compile(r"(?:[0-9A-Fa-f]{4})+")


# One stored message of an ``AT+CMGL`` listing (PDU mode): (index, stat, pdu).
Listed = tuple[int, int, str]

# AT+CNMI settings that pass status reports on, best first: ``+CDS`` with the PDU
# (ds=1; SIM800L takes only the 5-field form), else stored and announced with
# ``+CDSI`` (ds=2; Huawei, Wavecom). mt=1 keeps incoming SMS stored (+CMTI).
CNMI_DIRECT = "AT+CNMI=2,1,0,1,0"
CNMI_STORED = "AT+CNMI=2,1,0,2"
# Storage that holds status reports apart on some modems.
REPORT_STORAGE = "SR"


def fields(value: str) -> list[str]:
    """Comma-separated fields, blanks and quotes stripped (no quoted commas in these)."""
    return [f.strip().strip('"') for f in value.split(",")]


def to_int(text: str) -> int | None:
    """A non-negative decimal, or None (empty, signed, not a number)."""
    text = text.strip()
    return int(text) if text.isdigit() else None


# --- final answers ------------------------------------------------------------------


def is_not_ready(final: Final) -> bool:
    return (final.kind, final.code) in NOT_READY


def is_storage_full(final: Final) -> bool:
    return (final.kind, final.code) in STORAGE_FULL


def is_permanent(final: Final) -> bool:
    """A send refusal that retrying (here or on another modem) cannot fix."""
    return final.kind is FinalKind.CMS and final.code in PERMANENT_CMS


def is_sim_absent(final: Final) -> bool:
    return final.kind is FinalKind.CME and final.code == 10


def is_smsc_unknown(final: Final) -> bool:
    return final.kind is FinalKind.CMS and final.code == 330


# --- SIM and identity ------------------------------------------------------------------


def cpin_state(values: Sequence[str]) -> str | None:
    """The SIM state ("READY", "SIM PIN", ...) from the ``+CPIN:`` values, if any."""
    return values[0].upper() if values else None


def cpin_in_partial(lines: Sequence[str]) -> str | None:
    """The SIM state from the lines of an answer whose OK never came (Wavecom)."""
    for line in lines:
        if line.upper().startswith("+CPIN:"):
            return line[6:].strip().upper()
    return None


def identity_text(lines: Sequence[str], ok: bool) -> str:
    """An AT+CGMI/CGMM/CGMR/CIMI answer: its lines joined; "" when refused."""
    return " ".join(lines).strip() if ok else ""


def imei(text: str) -> str:
    """The IMEI from an AT+CGSN answer, bare or as ``+CGSN: "<imei>"`` (SIM76xx)."""
    return text.removeprefix("+CGSN:").strip().strip('"')


# --- network ------------------------------------------------------------------------------


def cops_operator(value: str) -> str:
    """Operator name of a ``+COPS:`` value (``0,0,"Telkomsel",2``); "" when not registered."""
    f = fields(value)
    return f[2] if len(f) >= 3 else ""


def csq(value: str) -> int | None:
    """Signal 0..31 of a ``+CSQ:`` value (``18,99``); None for unknown (99) or junk."""
    level = to_int(fields(value)[0])
    return level if level is not None and 0 <= level <= 31 else None


def rssi_urc(value: str) -> int | None:
    """The level of a Huawei ``^RSSI:`` URC value, as sent (not range-checked)."""
    return to_int(value)


def creg_registered(value: str) -> bool:
    """Registered (home or roaming) from an ``AT+CREG?`` value ``<n>,<stat>[,...]``."""
    f = fields(value)
    stat = f[1] if len(f) >= 2 else f[0]
    return stat in ("1", "5")


def creg_urc_registered(value: str) -> bool:
    """Registered from a ``+CREG:`` URC value ``<stat>[,<lac>,<ci>]``."""
    return fields(value)[0] in ("1", "5")


def csq_to_dbm(csq: int | None) -> int | None:
    return None if csq is None or not 0 <= csq <= 31 else -113 + 2 * csq


def signal_condition(csq: int | None) -> str:
    if csq is None or not 0 <= csq <= 31:
        return "unknown"
    if csq < 10:
        return "marginal"
    if csq < 15:
        return "ok"
    if csq < 20:
        return "good"
    return "excellent"


def signal_report(csq: int | None) -> dict[str, int | str | None]:
    """The ``signal`` object of get-modem-list and ``otpd modem``: CSQ (99 = unknown,
    as modems say it), dBm and a word."""
    return {"csq": csq if csq is not None else 99, "rssi_dbm": csq_to_dbm(csq),
            "condition": signal_condition(csq)}


# --- SMS ----------------------------------------------------------------------------------


def cmgs_reference(values: Sequence[str]) -> int:
    """The message reference of a ``+CMGS:`` answer; -1 when the modem gave none."""
    mr = to_int(fields(values[0])[0]) if values else None
    return -1 if mr is None else mr


def cmgl_listing(lines: Sequence[str]) -> list[Listed]:
    """The messages of an ``AT+CMGL`` answer in PDU mode (header line, then the PDU)."""
    found: list[Listed] = []
    for i, line in enumerate(lines):
        # A "+CMGL:" may be glued to the end of the previous PDU line.
        m = _CMGL.search(line)
        if not m:
            continue
        body = lines[i + 1] if i + 1 < len(lines) else ""
        body = _CMGL_SPLIT.split(body)[0].strip()
        found.append((int(m.group(1)), int(m.group(2)), body))
    return found


def cmgl_lengths(lines: Sequence[str]) -> dict[int, int]:
    """index -> announced TPDU ``<length>`` of an ``AT+CMGL`` answer, where given."""
    found: dict[int, int] = {}
    for line in lines:
        m = _CMGL.search(line)
        if m and m.group(3) is not None:
            found[int(m.group(1))] = int(m.group(3))
    return found


def cmgr_message(lines: Sequence[str]) -> tuple[str, int | None] | None:
    """(pdu, TPDU length) of an ``AT+CMGR`` answer in PDU mode (``+CMGR: <stat>,
    [<alpha>],<length>`` then the PDU; ZTE leaves out the stat); None: empty slot."""
    for i, line in enumerate(lines):
        if line.upper().startswith("+CMGR:") and i + 1 < len(lines):
            length = to_int(fields(line[6:])[-1])
            return lines[i + 1].strip(), length
    return None


def cds_length(line: str) -> int | None:
    """The TPDU length of a PDU-mode ``+CDS: <length>`` line (the PDU follows)."""
    head, _, value = line.partition(":")
    return to_int(value) if head.strip().upper() == "+CDS" else None


def stored_at(value: str) -> tuple[str, int] | None:
    """(storage, index) of a ``+CDSI:`` / ``+CMTI:`` value such as ``"SR",3``."""
    f = fields(value)
    if len(f) < 2:
        return None
    index = to_int(f[1])
    return (f[0].upper(), index) if index is not None else None


def cpms_free(value: str) -> int | None:
    """Free slots in ``<mem2>`` (where sent copies go) of an ``AT+CPMS?`` value.

    ``"SM",used,total`` for ``<mem1>``, then ``<mem2>`` and ``<mem3>`` where
    supported; None when the counts are missing or the total is 0."""
    f = fields(value)
    at = 4 if len(f) >= 6 else 1
    used, total = (to_int(f[at]), to_int(f[at + 1])) if len(f) > at + 1 else (None, None)
    if used is not None and total:
        return max(total - used, 0)
    return None


def csca(value: str) -> tuple[str, int | None] | None:
    """(number, type of address) of a ``+CSCA:`` value; None when no SMSC is set."""
    f = fields(value)
    number = f[0]
    if not number or number == "+":
        return None
    return number, to_int(f[1]) if len(f) > 1 else None


# --- USSD ----------------------------------------------------------------------------------


def decode_ussd(value: str) -> tuple[str, bool]:
    """(text, replyable) from a ``+CUSD:`` value such as ``0,"Balance 10",15``."""
    m = _USSD.match(value)
    if not m:
        return value, False
    status, text, dcs = m.group(1), m.group(2) or "", m.group(3)
    if dcs is not None and int(dcs) == 72 and _UCS2_HEX.fullmatch(text):
        text = bytes.fromhex(text).decode("utf-16-be", "replace")
    return text, status == "1"
