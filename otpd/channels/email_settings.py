"""``[[smtp]]``: the SMTP accounts the email channel sends through, in order."""

from __future__ import annotations

import re
from dataclasses import dataclass

from otpd.msisdn import InvalidReceiver, split_mailbox
from otpd.settings_reader import Section
from otpd.wire.protocol import header_value_problem

# ``Display Name <local@domain>`` or a bare ``local@domain``; the name may be
# quoted. Nothing else (no lists, groups or comments): it is written into the
# From header and the envelope, and must not be re-parsed into something else.
_NAMED = re.compile(r'(?:"(?P<quoted>[^"\\]*)"|(?P<plain>[^"<>]*?))\s*<(?P<address>[^<>]*)>')


@dataclass(frozen=True)
class Sender:
    """A validated ``sender``: the From display name and the one mailbox."""

    display_name: str
    local: str
    domain: str  # ASCII, lower case

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_sender(text: str) -> Sender:
    """``"OTP <otp@example.com>"`` or ``"otp@example.com"``; ValueError saying why not."""
    problem = header_value_problem(text)
    if problem is not None:
        raise ValueError(problem)
    text = text.strip()
    match = _NAMED.fullmatch(text)
    name, address = "", text
    if match is not None:
        name = (match.group("quoted") or match.group("plain") or "").strip()
        address = match.group("address").strip()
    try:
        local, domain = split_mailbox(address)
    except InvalidReceiver as exc:
        raise ValueError(f'must be one address, e.g. "OTP <otp@example.com>": {exc}') from None
    return Sender(name, local, domain)


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

    @property
    def sender_parts(self) -> Sender:
        """The sender, validated (check-config refused any other)."""
        return parse_sender(self.sender)


def parse_smtp_account(s: Section) -> SmtpAccount:
    security = s.str("security", "none", choices=("none", "starttls", "tls"))
    default_port = {"none": 25, "starttls": 587, "tls": 465}[security]
    sender = s.str("sender", "", required=True)
    if sender.strip():
        try:
            parse_sender(sender)
        except ValueError as exc:
            s.error("sender", str(exc))
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
