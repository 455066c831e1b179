"""Plain records exchanged with the store (no I/O)."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

# The verify outcome is an OTP rule; the store protocol returns it, so it is re-exported.
from otpd.otp_attempts import VerifyResult as VerifyResult

# An outbox row's states (the schema's CHECK spells the same four).
MESSAGE_STATES = ("pending", "sent", "failed", "expired")
# A sent SMS's delivery as the network reported it (the ``delivery`` column;
# NULL: sent without a report request, or not an SMS).
DELIVERY_STATES = ("sent", "delivered", "undeliverable", "unknown")
FINAL_DELIVERY = ("delivered", "undeliverable", "unknown")
# What a status report made of one part (``sms_parts.status``), by report outcome.
PART_STATUS = {"delivered": "delivered", "trying": "trying", "failed": "failed",
               "gave_up": "failed"}


class StoreError(Exception):
    """The store could not complete a read or write (disk full, I/O error...)."""


@dataclass(frozen=True)
class NewOtp:
    reference: str
    receiver: str
    salt: bytes
    digest: bytes
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class OtpRecord:
    reference: str
    receiver: str
    salt: bytes
    digest: bytes
    expires_at: float
    attempts: int
    state: str  # active | used | burned


@dataclass(frozen=True)
class NewMessage:
    command: str
    channel: str  # sms | email
    receiver: str
    subject: str
    sealed: bytes  # text sealed with otpd.sealing
    created_at: float
    expires_at: float
    dedupe_key: str | None = None
    otp_reference: str | None = None  # request-otp: the OTP this message carries


@dataclass(frozen=True)
class MessageRow:
    id: int
    command: str
    channel: str
    receiver: str
    subject: str
    sealed: bytes | None
    otp_reference: str | None
    state: str  # pending | sent | failed | expired
    code: str | None
    reason: str | None
    via: str | None
    attempts: int
    created_at: float
    expires_at: float
    next_attempt_at: float
    finished_at: float | None
    attempt_started: float | None  # set while a channel has it: a crash then = maybe sent
    delivery: str | None = None  # sent | delivered | undeliverable | unknown (SMS reports)
    delivery_at: float | None = None  # when ``delivery`` was last set
    delivered_at: float | None = None  # discharge time (the SC's) of the last part delivered
    reported_at: float | None = None  # when the last status report arrived
    dedupe_key: str | None = None  # "<message id>|<receiver>": one send per id


@dataclass(frozen=True)
class SmsPart:
    """One part of an SMS sent with a status report request."""

    message_id: int
    part: int  # 1-based
    parts: int
    modem: str
    sim: str
    mr: int  # TP-MR (0..255) from +CMGS
    receiver: str
    sent_at: float


@dataclass(frozen=True)
class SmsReport:
    """A status report, to match against the parts sent with ``sim``."""

    sim: str
    mr: int
    recipient: str
    outcome: str  # delivered | trying | failed | gave_up (TP-ST's class)
    status: int  # TP-ST
    at: float  # arrival
    discharged: float | None = None  # TP-DT, the SC's clock


@dataclass(frozen=True)
class SmsReportMatch:
    message_id: int
    modem: str  # the part's
    sim: str
    delivery: str  # the message's, after this report
    became_final: bool
    first_sent_at: float


@dataclass(frozen=True)
class SmsUnreported:
    message_id: int
    modem: str
    sim: str
    sent_at: float  # the last part's


@dataclass(frozen=True)
class SmsOutcome:
    modem: str
    sim: str
    delivery: str
    at: float


@dataclass(frozen=True)
class HourActivity:
    """Outbox messages of one channel and sender (``via``: a modem or SMTP account)
    in the hour starting at ``hour`` (epoch s): finished sent or failed then, or
    reported delivered then (SMS with delivery reports)."""

    hour: int
    channel: str
    via: str
    sent: int
    failed: int
    delivered: int


# Digits compared from the end: an SC may write the recipient nationally
# ("0812...") or without the "+" while otpd sent "+62812...".
_MATCH_DIGITS = 8


def receivers_match(sent: str, reported: str) -> bool:
    """Is ``reported`` (a report's TP-RA) the number a part was sent to?"""
    a = "".join(c for c in sent if c.isdigit())
    b = "".join(c for c in reported if c.isdigit())
    if not a or not b:
        return False
    if min(len(a), len(b)) < _MATCH_DIGITS:
        return a == b  # short numbers: the whole number
    return a[-_MATCH_DIGITS:] == b[-_MATCH_DIGITS:]


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` hits per sliding ``window`` seconds under ``key``.

    With ``member`` set, hits count distinct members (e.g. distinct receivers
    per user per day) instead of events."""

    key: str
    window: float
    limit: int
    member: str | None = None


@dataclass(frozen=True)
class Finished:
    """What a shared-state backend must update once a message is final."""

    otp_reference: str | None
    dedupe_key: str | None


@dataclass(frozen=True)
class Inserted:
    id: int


@dataclass(frozen=True)
class Duplicate:
    kind: str  # "reference" (request-otp) or "id" (message id already accepted)
    state: str | None = None  # the first message's state and code, for kind "id"
    code: str | None = None


class Claim(enum.Enum):
    """The answer of ``claim_command`` (the replay cache of signed commands)."""

    NEW = "new"  # first time: the caller now holds the claim and executes the command
    SEEN = "seen"  # already executed (settled): a replay, refuse it
    BUSY = "busy"  # claimed and not settled yet: hand the message back for redelivery later


# ASCII only: str.isdigit-style checks would let other scripts' digits through.
_COMMAND_KEY = re.compile(r"[0-9a-fA-F]{1,128}")
_MAX_HOLDER = 256


def command_key(key: object) -> str:
    """The canonical (lowercase) form of a replay-cache key, or ValueError.

    Lowercased because a signature verifies in either case: ``ABC...`` must
    not escape the entry of ``abc...``."""
    if not isinstance(key, str) or _COMMAND_KEY.fullmatch(key) is None:
        raise ValueError("command key: must be 1 to 128 hex digits")
    return key.lower()


def check_holder(holder: object) -> str:
    if not isinstance(holder, str) or not holder or len(holder) > _MAX_HOLDER:
        raise ValueError(f"command holder: must be 1 to {_MAX_HOLDER} characters")
    return holder


def check_time(name: str, value: float, *, positive: bool = False) -> float:
    # NaN would be stored as NULL by SQLite and compare false everywhere.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number")
    if positive and value <= 0:
        raise ValueError(f"{name}: must be positive")
    return float(value)
