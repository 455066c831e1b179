"""Durable state: OTP hashes, block list, outbox, replay cache of signed commands."""

from otpd.store.base import Store
from otpd.store.records import (
    MESSAGE_STATES,
    Claim,
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
    "MESSAGE_STATES",
    "Claim",
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
