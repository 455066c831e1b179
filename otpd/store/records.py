"""Plain records exchanged with the store (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from otpd.wire.codes import Code


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


class VerifyResult(Enum):
    OK = "ok"
    WRONG = "wrong"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    BURNED = "burned"


# What verify-otp answers for each outcome (the daemon and the client's manage_otp).
VERIFY_RESPONSES: dict[VerifyResult, tuple[Code, str | None]] = {
    VerifyResult.OK: (Code.SUCCESS, None),
    VerifyResult.WRONG: (Code.INVALID_OTP, "invalid OTP"),
    VerifyResult.UNKNOWN: (Code.INVALID_OTP, "invalid OTP"),
    VerifyResult.USED: (Code.INVALID_OTP, "invalid OTP"),
    VerifyResult.EXPIRED: (Code.EXPIRED, "OTP expired"),
    VerifyResult.BURNED: (Code.TOO_MANY_ATTEMPTS, "too many attempts: the OTP is no longer valid"),
}
