"""``[delivery]``: how long a request waits for its result, retries, message lifetimes."""

from __future__ import annotations

from dataclasses import dataclass

from otpd.settings_reader import Section


@dataclass(frozen=True)
class DeliverySettings:
    wait: float
    email_workers: int
    retry_base: float
    retry_max: float
    default_lifetime: int  # for send-* without expiration
    max_lifetime: int


def parse_delivery_settings(s: Section, otp_default_lifetime: int,
                            otp_max_lifetime: int) -> DeliverySettings:
    """The lifetimes default to the OTP ones (plain messages live at least an hour)."""
    default_lifetime = s.int("default_lifetime", otp_default_lifetime, min=10, max=7 * 86400)
    max_lifetime = s.int("max_lifetime", max(otp_max_lifetime, 3600), min=10, max=7 * 86400)
    if max_lifetime < default_lifetime:
        s.error("max_lifetime", "must be >= delivery.default_lifetime")
    out = DeliverySettings(
        wait=s.float("wait", 20.0, min=0.0, max=300.0),
        email_workers=s.int("email_workers", 2, min=1, max=32),
        retry_base=s.float("retry_base", 2.0, min=0.1, max=600.0),
        retry_max=s.float("retry_max", 60.0, min=0.1, max=3600.0),
        default_lifetime=default_lifetime,
        max_lifetime=max_lifetime,
    )
    s.finish()
    return out
