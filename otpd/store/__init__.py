"""Durable state: OTP hashes, block list, outbox, replay cache of signed commands."""

from otpd.store.base import Store
from otpd.store.records import (
    DELIVERY_STATES,
    MESSAGE_STATES,
    Claim,
    Duplicate,
    Finished,
    HourActivity,
    Inserted,
    MessageRow,
    NewMessage,
    NewOtp,
    OtpRecord,
    RateLimit,
    SmsOutcome,
    SmsPart,
    SmsReport,
    SmsReportMatch,
    SmsUnreported,
    StoreError,
    VerifyResult,
)
from otpd.store.sqlite import SqliteStore

__all__ = [
    "DELIVERY_STATES",
    "MESSAGE_STATES",
    "Claim",
    "Duplicate",
    "Finished",
    "HourActivity",
    "Inserted",
    "MessageRow",
    "NewMessage",
    "NewOtp",
    "OtpRecord",
    "RateLimit",
    "SmsOutcome",
    "SmsPart",
    "SmsReport",
    "SmsReportMatch",
    "SmsUnreported",
    "SqliteStore",
    "Store",
    "StoreError",
    "VerifyResult",
]
