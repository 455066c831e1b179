"""``[otp]``: code length, lifetimes, attempts, the key file and the country code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otpd.otp_attempts import DEFAULT_MAX_ATTEMPTS
from otpd.settings_reader import Section
from otpd.wire.protocol import MAX_SUBJECT_CHARS, header_value_problem


@dataclass(frozen=True)
class OtpSettings:
    length: int
    default_lifetime: int
    max_lifetime: int
    max_attempts: int
    key_file: Path
    country_code: str
    email_subject: str


def parse_otp_settings(s: Section) -> OtpSettings:
    country = s.str("country_code", "62")
    if not (country.isdigit() and country.isascii() and 1 <= len(country) <= 3):
        s.error("country_code", "must be 1 to 3 digits, e.g. \"62\"")
        country = "62"
    default_lifetime = s.int("default_lifetime", 300, min=10, max=86400)
    max_lifetime = s.int("max_lifetime", 600, min=10, max=86400)
    if max_lifetime < default_lifetime:
        s.error("max_lifetime", "must be >= otp.default_lifetime")
    # The subject of every email command without one: a header line.
    subject = s.str("email_subject", "Your OTP code")
    problem = header_value_problem(subject)
    if problem is not None:
        s.error("email_subject", problem)
        subject = "Your OTP code"
    elif len(subject) > MAX_SUBJECT_CHARS:
        s.error("email_subject", f"must be at most {MAX_SUBJECT_CHARS} characters")
    out = OtpSettings(
        length=s.int("length", 6, min=4, max=10),
        default_lifetime=default_lifetime,
        max_lifetime=max_lifetime,
        max_attempts=s.int("max_attempts", DEFAULT_MAX_ATTEMPTS, min=1, max=100),
        key_file=Path(s.str("key_file", "/var/lib/otpd/otp.key")),
        country_code=country,
        email_subject=subject,
    )
    s.finish()
    return out
