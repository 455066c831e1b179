"""Durable state: OTP hashes, block list, outbox."""

from otpd.store.records import (
    Duplicate,
    Inserted,
    MessageRow,
    NewMessage,
    NewOtp,
    OtpRecord,
    StoreError,
    VerifyResult,
)
from otpd.store.sqlite import SqliteStore

__all__ = [
    "Duplicate",
    "Inserted",
    "MessageRow",
    "NewMessage",
    "NewOtp",
    "OtpRecord",
    "SqliteStore",
    "StoreError",
    "VerifyResult",
]
