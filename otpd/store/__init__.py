"""Durable state: OTP hashes, block list, outbox."""

from otpd.store.base import Store
from otpd.store.records import (
    Duplicate,
    Finished,
    Inserted,
    MessageRow,
    NewMessage,
    NewOtp,
    OtpRecord,
    RateLimit,
    StoreError,
    VerifyResult,
)
from otpd.store.sqlite import SqliteStore

__all__ = [
    "Duplicate",
    "Finished",
    "Inserted",
    "MessageRow",
    "NewMessage",
    "NewOtp",
    "OtpRecord",
    "RateLimit",
    "SqliteStore",
    "Store",
    "StoreError",
    "VerifyResult",
]
