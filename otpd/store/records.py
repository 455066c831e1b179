"""Plain records exchanged with the store (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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


@dataclass(frozen=True)
class Inserted:
    id: int


@dataclass(frozen=True)
class Duplicate:
    kind: str  # "reference" (request-otp) or "id" (message id already accepted)
    message: MessageRow | None


class VerifyResult(Enum):
    OK = "ok"
    WRONG = "wrong"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    BURNED = "burned"
