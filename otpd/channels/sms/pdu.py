"""SMS PDU codec (3GPP TS 23.040): SMS-SUBMIT encode/decode, SMS-DELIVER encode/decode,
SMS-STATUS-REPORT encode/decode (the delivery report of a submitted part).

Long text becomes a concatenated SMS: each part carries a UDH with the
reference, the part count and the part number. Parts never split a GSM
escape sequence or a UTF-16 surrogate pair, so every part decodes on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum

from otpd.channels.sms import gsm7

DCS_GSM7 = 0x00
DCS_8BIT = 0x04
DCS_UCS2 = 0x08

_SINGLE_GSM7 = 160  # septets
_SINGLE_UCS2 = 140  # octets
_MAX_UD = 140  # octets of user data in one TPDU


class PduError(ValueError):
    """A PDU that cannot be decoded."""


class MessageTooLong(ValueError):
    """The text needs more parts than allowed."""


@dataclass(frozen=True)
class Concat:
    reference: int
    total: int
    sequence: int


@dataclass(frozen=True)
class SubmitPdu:
    hex: str  # full PDU including the leading "00" (use the SIM's SMSC)
    tpdu_length: int  # octets without the SMSC part: the <length> of AT+CMGS


@dataclass(frozen=True)
class Submit:
    receiver: str
    text: str
    dcs: int
    concat: Concat | None
    validity: int | None  # seconds (relative format), None if absent
    status_report: bool
    reference: int  # TP-MR


@dataclass(frozen=True)
class Deliver:
    sender: str
    text: str
    dcs: int
    concat: Concat | None
    timestamp: datetime


class ReportOutcome(StrEnum):
    """What a TP-Status (23.040 §9.2.3.15) says about the submitted part."""

    DELIVERED = "delivered"  # transaction completed (0x00-0x1F)
    TRYING = "trying"  # temporary error, the SC is still trying (0x20-0x3F)
    FAILED = "failed"  # permanent error, the SC makes no more attempts (0x40-0x5F)
    GAVE_UP = "gave_up"  # temporary error, the SC makes no more attempts (0x60-0x7F)

    @property
    def final(self) -> bool:
        return self is not ReportOutcome.TRYING


# TP-ST values that 23.040 names; the others are reserved or SC-specific.
STATUS_MEANINGS: dict[int, str] = {
    0x00: "received by the SME",
    0x01: "forwarded to the SME, delivery not confirmed",
    0x02: "replaced by the SC",
    0x20: "congestion (still trying)",
    0x21: "SME busy (still trying)",
    0x22: "no response from SME (still trying)",
    0x23: "service rejected (still trying)",
    0x24: "quality of service not available (still trying)",
    0x25: "error in SME (still trying)",
    0x40: "remote procedure error",
    0x41: "incompatible destination",
    0x42: "connection rejected by SME",
    0x43: "not obtainable",
    0x44: "quality of service not available",
    0x45: "no interworking available",
    0x46: "SM validity period expired",
    0x47: "SM deleted by originating SME",
    0x48: "SM deleted by SC administration",
    0x49: "SM does not exist",
    0x60: "congestion (no more attempts)",
    0x61: "SME busy (no more attempts)",
    0x62: "no response from SME (no more attempts)",
    0x63: "service rejected (no more attempts)",
    0x64: "quality of service not available (no more attempts)",
    0x65: "error in SME (no more attempts)",
}


def status_outcome(status: int) -> ReportOutcome:
    """The class of a TP-ST value: bits 6..5 choose it, for reserved and
    SC-specific values of a range too. Bit 7 set is reserved as a whole: read
    as "service rejected" (0x63), a final failure, so an unknown code never
    counts as delivered nor keeps a message waiting."""
    if not 0 <= status <= 0xFF:
        raise ValueError("TP-ST is one octet")
    if status & 0x80:
        return ReportOutcome.GAVE_UP
    return (ReportOutcome.DELIVERED, ReportOutcome.TRYING, ReportOutcome.FAILED,
            ReportOutcome.GAVE_UP)[status >> 5]


def status_meaning(status: int) -> str:
    if status in STATUS_MEANINGS:
        return STATUS_MEANINGS[status]
    if status & 0x80:
        return "reserved"
    low = status & 0x1F
    return "SC-specific" if low >= 0x10 else "reserved"


@dataclass(frozen=True)
class StatusReport:
    """An SMS-STATUS-REPORT: what became of the part sent with TP-MR ``reference``."""

    reference: int  # TP-MR of the SMS-SUBMIT it reports on
    recipient: str  # TP-RA, as the SC wrote it (may be national, or lack the "+")
    submitted: datetime  # TP-SCTS: when the SC received the part
    discharged: datetime  # TP-DT: delivery, or the time of this status
    status: int  # TP-ST
    command: bool = False  # TP-SRQ: reports on an SMS-COMMAND, not a submit

    @property
    def outcome(self) -> ReportOutcome:
        return status_outcome(self.status)

    @property
    def meaning(self) -> str:
        return status_meaning(self.status)


# --- addresses -------------------------------------------------------------------


def _encode_address(number: str) -> bytes:
    international = number.startswith("+")
    digits = number[1:] if international else number
    if not digits or not all(c in "0123456789*#" for c in digits) or len(digits) > 20:
        raise ValueError("receiver must be a phone number of 1..20 digits")
    toa = 0x91 if international else 0x81
    return bytes([len(digits), toa]) + _semi_octets(digits)


def _semi_octets(digits: str) -> bytes:
    table = {**{str(d): d for d in range(10)}, "*": 0xA, "#": 0xB}
    nibbles = [table[c] for c in digits]
    if len(nibbles) % 2:
        nibbles.append(0xF)
    return bytes(nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, len(nibbles), 2))


def _semi_decode(data: bytes, count: int | None = None) -> str:
    chars = "0123456789*#abc"
    out: list[str] = []
    for octet in data:
        for nib in (octet & 0xF, octet >> 4):
            if nib != 0xF:
                out.append(chars[nib])
    return "".join(out if count is None else out[:count])


def _decode_address(data: bytes, pos: int) -> tuple[str, int]:
    if pos + 2 > len(data):
        raise PduError("address truncated")
    digits, toa = data[pos], data[pos + 1]
    size = (digits + 1) // 2
    raw = data[pos + 2 : pos + 2 + size]
    if len(raw) < size:
        raise PduError("address truncated")
    if (toa >> 4) & 0x7 == 0x5:  # alphanumeric sender (e.g. "Telkomsel")
        text = gsm7.decode(gsm7.unpack(raw, digits * 4 // 7))
        return text, pos + 2 + size
    number = _semi_decode(raw, digits)
    if (toa >> 4) & 0x7 == 0x1:
        number = "+" + number
    return number, pos + 2 + size


# --- validity period -----------------------------------------------------------------


def validity_octet(seconds: float) -> int:
    """Relative TP-VP covering at least ``seconds`` (rounded up; 5 min minimum)."""
    minutes = max(1, math.ceil(seconds / 60))
    if minutes <= 720:
        return max(0, math.ceil(minutes / 5) - 1)
    if minutes <= 1440:
        return 143 + math.ceil((minutes - 720) / 30)
    days = math.ceil(minutes / 1440)
    if days <= 30:
        return 166 + days
    weeks = math.ceil(days / 7)
    return min(255, 192 + weeks)


def validity_seconds(octet: int) -> int:
    if octet <= 143:
        return (octet + 1) * 5 * 60
    if octet <= 167:
        return 12 * 3600 + (octet - 143) * 30 * 60
    if octet <= 196:
        return (octet - 166) * 86400
    return (octet - 192) * 7 * 86400


# --- splitting text into parts -------------------------------------------------------


def _udh(concat: Concat) -> bytes:
    """UDH (with its length octet) for a concatenated part: IEI 00 or 16-bit IEI 08."""
    if concat.reference > 0xFF:
        ie = bytes([0x08, 4, concat.reference >> 8, concat.reference & 0xFF])
    else:
        ie = bytes([0x00, 3, concat.reference])
    ie += bytes([concat.total, concat.sequence])
    return bytes([len(ie)]) + ie


def _split_gsm7(text: str, per_part: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for ch in text:
        septets = gsm7.char_septets(ch)
        if len(parts[-1]) + len(septets) > per_part:
            parts.append([])  # an escape pair always stays together
        parts[-1].extend(septets)
    return parts


def _split_ucs2(text: str, per_part_units: int) -> list[bytes]:
    parts: list[bytes] = [b""]
    for ch in text:
        units = ch.encode("utf-16-be")  # 2 bytes, or 4 for a surrogate pair
        if len(parts[-1]) + len(units) > per_part_units * 2:
            parts.append(b"")
        parts[-1] += units
    return parts


def encode_submit(
    receiver: str,
    text: str,
    *,
    reference: int = 0,
    max_parts: int = 6,
    validity: float | None = None,
    status_report: bool = False,
) -> list[SubmitPdu]:
    """SMS-SUBMIT PDUs for ``text`` (one, or several concatenated parts).

    ``reference`` is the concatenation reference (0..65535; above 255 uses the
    16-bit IE). ``validity`` in seconds becomes a relative validity period.
    """
    if not 0 <= reference <= 0xFFFF:
        raise ValueError("concatenation reference must be 0..65535")
    address = _encode_address(receiver)
    use_gsm7 = gsm7.can_encode(text)
    udh_size = 6 if reference <= 0xFF else 7
    if use_gsm7:
        septets = gsm7.encode(text)
        if len(septets) <= _SINGLE_GSM7:
            chunks: list[list[int]] | list[bytes] = [septets]
        else:
            per_part = (_MAX_UD * 8 - math.ceil(udh_size * 8 / 7) * 7) // 7
            chunks = _split_gsm7(text, per_part)
    else:
        data = text.encode("utf-16-be")
        if len(data) <= _SINGLE_UCS2:
            chunks = [data]
        else:
            chunks = _split_ucs2(text, (_MAX_UD - udh_size) // 2)
    if len(chunks) > max_parts:
        raise MessageTooLong(f"text needs {len(chunks)} SMS parts, at most {max_parts} allowed")

    first = 0x01  # SMS-SUBMIT
    if validity is not None:
        first |= 0x10  # TP-VPF relative
    if status_report:
        first |= 0x20
    if len(chunks) > 1:
        first |= 0x40  # TP-UDHI
    vp = bytes([validity_octet(validity)]) if validity is not None else b""
    dcs = DCS_GSM7 if use_gsm7 else DCS_UCS2
    result: list[SubmitPdu] = []
    for seq, chunk in enumerate(chunks, start=1):
        udh = _udh(Concat(reference, len(chunks), seq)) if len(chunks) > 1 else b""
        if isinstance(chunk, bytes):
            ud, udl = udh + chunk, len(udh) + len(chunk)
        else:
            header_septets = math.ceil(len(udh) * 8 / 7)
            fill = header_septets * 7 - len(udh) * 8
            ud = udh + gsm7.pack(chunk, fill)
            udl = header_septets + len(chunk)
        tpdu = bytes([first, 0x00]) + address + bytes([0x00, dcs]) + vp + bytes([udl]) + ud
        result.append(SubmitPdu("00" + tpdu.hex().upper(), len(tpdu)))
    return result


def encode_deliver(
    sender: str, text: str, timestamp: datetime, *, concat: Concat | None = None
) -> str:
    """One SMS-DELIVER PDU (with an empty SMSC field), for simulated incoming messages."""
    use_gsm7 = gsm7.can_encode(text)
    udh = _udh(concat) if concat else b""
    first = 0x04 | (0x40 if concat else 0)  # MTI deliver, TP-MMS (no more messages)
    if use_gsm7:
        septets = gsm7.encode(text)
        header_septets = math.ceil(len(udh) * 8 / 7)
        fill = header_septets * 7 - len(udh) * 8
        ud, udl = udh + gsm7.pack(septets, fill), header_septets + len(septets)
        if udl > _SINGLE_GSM7:
            raise MessageTooLong("deliver text longer than one SMS")
    else:
        body = text.encode("utf-16-be")
        ud, udl = udh + body, len(udh) + len(body)
        if udl > _SINGLE_UCS2:
            raise MessageTooLong("deliver text longer than one SMS")
    dcs = DCS_GSM7 if use_gsm7 else DCS_UCS2
    tpdu = bytes([first]) + _encode_address(sender) + bytes([0x00, dcs])
    tpdu += _encode_timestamp(timestamp) + bytes([udl]) + ud
    return "00" + tpdu.hex().upper()


def _encode_timestamp(ts: datetime) -> bytes:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    offset = ts.utcoffset() or timedelta(0)
    quarters = int(offset.total_seconds() // 900)
    digits = ts.strftime("%y%m%d%H%M%S")
    tz = f"{abs(quarters):02d}"
    octets = _semi_octets(digits + tz)
    if quarters < 0:
        octets = octets[:-1] + bytes([octets[-1] | 0x08])
    return octets


def _decode_timestamp(data: bytes) -> datetime:
    if len(data) < 7:
        raise PduError("timestamp truncated")
    sign = -1 if data[6] & 0x08 else 1
    last = bytes([data[6] & 0xF7])
    digits = _semi_decode(data[:6] + last)
    if len(digits) < 14 or not digits.isdigit():
        raise PduError("bad timestamp digits")
    quarters = int(digits[12:14])
    try:
        tz = timezone(timedelta(minutes=15 * quarters * sign))
        return datetime.strptime(digits[:12], "%y%m%d%H%M%S").replace(tzinfo=tz)
    except ValueError as exc:
        raise PduError(f"bad timestamp: {exc}") from None


# --- decoding --------------------------------------------------------------------------


def _alphabet(dcs: int) -> int:
    group = dcs >> 4
    if group <= 0x7:  # general coding (bits 7..6 = 00 or 01: automatic deletion)
        return (dcs >> 2) & 0x3
    if group == 0xF:
        return 1 if dcs & 0x04 else 0
    if group == 0xE:
        return 2
    return 0  # message waiting groups C/D: GSM 7-bit


def _parse_udh(udh: bytes) -> Concat | None:
    pos = 0
    concat: Concat | None = None
    while pos + 2 <= len(udh):
        iei, size = udh[pos], udh[pos + 1]
        value = udh[pos + 2 : pos + 2 + size]
        if iei == 0x00 and len(value) == 3:
            concat = Concat(value[0], value[1], value[2])
        elif iei == 0x08 and len(value) == 4:
            concat = Concat((value[0] << 8) | value[1], value[2], value[3])
        pos += 2 + size
    return concat


def _user_data(tpdu: bytes, pos: int, dcs: int, udhi: bool) -> tuple[str, Concat | None]:
    if pos >= len(tpdu):
        raise PduError("user data length missing")
    udl = tpdu[pos]
    ud = tpdu[pos + 1 :]
    concat: Concat | None = None
    header = b""
    if udhi:
        if not ud:
            raise PduError("user data header missing")
        header = ud[: 1 + ud[0]]
        if len(header) < 1 + ud[0]:
            raise PduError("user data header truncated")
        concat = _parse_udh(header[1:])
    alphabet = _alphabet(dcs)
    if alphabet == 0:
        header_septets = math.ceil(len(header) * 8 / 7)
        fill = header_septets * 7 - len(header) * 8
        count = udl - header_septets
        if count < 0 or (pos + 1 + math.ceil(udl * 7 / 8)) > len(tpdu):
            raise PduError("user data shorter than its length")
        return gsm7.decode(gsm7.unpack(ud[len(header) :], count, fill)), concat
    body = ud[len(header) : udl]
    if udl > len(ud):
        raise PduError("user data shorter than its length")
    if alphabet == 2:
        # surrogatepass keeps half of a pair that another sender split across parts;
        # join_texts() puts such halves back together.
        return body[: len(body) // 2 * 2].decode("utf-16-be", "surrogatepass"), concat
    return body.decode("latin-1"), concat


def _split_smsc(pdu: str, with_smsc: bool) -> bytes:
    try:
        raw = bytes.fromhex(pdu.strip())
    except ValueError:
        raise PduError("PDU is not hex") from None
    if not with_smsc:
        return raw
    if not raw:
        raise PduError("empty PDU")
    return raw[1 + raw[0] :]


def decode(pdu: str, *, with_smsc: bool = True) -> Submit | Deliver | StatusReport:
    """Decode an SMS-SUBMIT, SMS-DELIVER or SMS-STATUS-REPORT given as hex (as in
    AT+CMGS/+CMGL). MTI 2 is read as a status report: stored and received
    messages come from the SC, and an SMS-COMMAND is never stored."""
    tpdu = _split_smsc(pdu, with_smsc)
    try:
        return _decode_tpdu(tpdu)
    except IndexError:
        raise PduError("PDU truncated") from None


def decode_listed(pdu: str, tpdu_length: int | None) -> Submit | Deliver | StatusReport:
    """Decode a PDU that a modem announced with its TPDU ``<length>`` (+CDS,
    +CMGL, +CMGR): 27.005 puts the SMSC address first, but some modems leave
    it out; the length tells which (None: trust the standard)."""
    try:
        raw = bytes.fromhex(pdu.strip())
    except ValueError:
        raise PduError("PDU is not hex") from None
    bare = (tpdu_length is not None and len(raw) == tpdu_length
            and not (raw and 1 + raw[0] + tpdu_length == len(raw)))
    try:
        return decode(pdu, with_smsc=not bare)
    except PduError:
        if not bare:
            raise
        # A length that counted the SMSC octets too (seen on some modems).
        return decode(pdu, with_smsc=True)


def _decode_tpdu(tpdu: bytes) -> Submit | Deliver | StatusReport:
    if not tpdu:
        raise PduError("empty TPDU")
    first = tpdu[0]
    mti = first & 0x03
    udhi = bool(first & 0x40)
    if mti == 0x01:
        mr = tpdu[1]
        receiver, pos = _decode_address(tpdu, 2)
        dcs = tpdu[pos + 1]
        pos += 2
        vpf = (first >> 3) & 0x3
        validity: int | None = None
        if vpf == 0x2:
            validity = validity_seconds(tpdu[pos])
            pos += 1
        elif vpf in (0x1, 0x3):
            pos += 7
        text, concat = _user_data(tpdu, pos, dcs, udhi)
        return Submit(receiver, text, dcs, concat, validity, bool(first & 0x20), mr)
    if mti == 0x00:
        sender, pos = _decode_address(tpdu, 1)
        dcs = tpdu[pos + 1]
        stamp = _decode_timestamp(tpdu[pos + 2 : pos + 9])
        text, concat = _user_data(tpdu, pos + 9, dcs, udhi)
        return Deliver(sender, text, dcs, concat, stamp)
    if mti == 0x02:
        return _decode_status_report(tpdu)
    raise PduError(f"unsupported message type {mti}")


def _decode_status_report(tpdu: bytes) -> StatusReport:
    """Fo, TP-MR, TP-RA, TP-SCTS, TP-DT, TP-ST; the optional TP-PI and what it
    announces (PID, DCS, user data) say nothing about delivery: not read."""
    if len(tpdu) < 2:
        raise PduError("status report truncated")
    first, mr = tpdu[0], tpdu[1]
    recipient, pos = _decode_address(tpdu, 2)
    if pos + 15 > len(tpdu):
        raise PduError("status report truncated")
    submitted = _decode_timestamp(tpdu[pos : pos + 7])
    discharged = _decode_timestamp(tpdu[pos + 7 : pos + 14])
    return StatusReport(mr, recipient, submitted, discharged, tpdu[pos + 14],
                        command=bool(first & 0x20))


def encode_status_report(
    reference: int,
    recipient: str,
    submitted: datetime,
    discharged: datetime,
    status: int,
    *,
    smsc: bool = True,
) -> str:
    """One SMS-STATUS-REPORT PDU (for the simulator): first octet 0x06 (MTI 2,
    TP-MMS no more messages), no TP-PI. ``smsc``: with an empty SMSC field."""
    if not 0 <= reference <= 0xFF or not 0 <= status <= 0xFF:
        raise ValueError("TP-MR and TP-ST are one octet")
    tpdu = bytes([0x06, reference]) + _encode_address(recipient)
    tpdu += _encode_timestamp(submitted) + _encode_timestamp(discharged) + bytes([status])
    return ("00" if smsc else "") + tpdu.hex().upper()


def join_texts(parts: list[str]) -> str:
    """Concatenate decoded parts, re-pairing surrogate halves split between parts."""
    return "".join(parts).encode("utf-16-be", "surrogatepass").decode("utf-16-be", "replace")
