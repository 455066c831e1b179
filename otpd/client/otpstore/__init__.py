"""Local OTP stores for ``manage_otp`` mode (SQLite file or shared Redis)."""

from __future__ import annotations

from otpd.client.config import ManageOtpSettings
from otpd.client.otpstore.base import Matcher, OtpStore, StoredOtp, VerifyResult


def open_store(config: ManageOtpSettings, connect_timeout: float = 10.0) -> OtpStore:
    """The store ``config.store`` names (opened lazily on first use)."""
    if config.store == "redis":
        from otpd.client.otpstore.redis_store import RedisOtpStore

        return RedisOtpStore(config.redis_url, config.key_prefix, connect_timeout)
    from otpd.client.otpstore.sqlite_store import SqliteOtpStore

    return SqliteOtpStore(config.path)


__all__ = ["Matcher", "OtpStore", "StoredOtp", "VerifyResult", "open_store"]
