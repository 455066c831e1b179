"""``[[smtp]]``: the SMTP accounts the email channel sends through, in order."""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parseaddr

from otpd.settings_reader import Section


@dataclass(frozen=True)
class SmtpAccount:
    name: str
    host: str
    port: int
    security: str  # none | starttls | tls
    username: str
    password: str
    sender: str
    timeout: float
    validate_certs: bool


def parse_smtp_account(s: Section) -> SmtpAccount:
    security = s.str("security", "none", choices=("none", "starttls", "tls"))
    default_port = {"none": 25, "starttls": 587, "tls": 465}[security]
    sender = s.str("sender", "", required=True)
    if sender and "@" not in parseaddr(sender)[1]:
        s.error("sender", 'must be an address, e.g. "OTP <otp@example.com>"')
    username = s.str("username", "")
    out = SmtpAccount(
        name=s.str("name", f"{s.path}"),
        host=s.str("host", "127.0.0.1"),
        port=s.int("port", default_port, min=1, max=65535),
        security=security,
        username=username,
        password=s.secret("password"),
        sender=sender,
        timeout=s.float("timeout", 30.0, min=1.0, max=600.0),
        validate_certs=s.bool("validate_certs", True),
    )
    s.finish()
    return out
