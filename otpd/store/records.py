"""Plain records exchanged with the store (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

# The verify outcome is an OTP rule; the store protocol returns it, so it is re-exported.
from otpd.otp_attempts import VerifyResult as VerifyResult


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
