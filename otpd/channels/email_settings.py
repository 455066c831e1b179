"""``[[smtp]]``: the SMTP accounts the email channel sends through, in order."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from otpd.channels.smtp_rules import Rests, Reuse
from otpd.msisdn import InvalidReceiver, split_mailbox
from otpd.settings_reader import Section
from otpd.wire.protocol import header_value_problem

# ``Display Name <local@domain>`` or a bare ``local@domain``; the name may be
# quoted. Nothing else (no lists, groups or comments): it is written into the
# From header and the envelope, and must not be re-parsed into something else.
_HELO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]")
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
    # The session pool (otpd.channels.smtp_sessions) and the provider's caps.
    ca_file: str = ""  # trust this CA (PEM) instead of the system store
    helo_name: str = ""  # EHLO name; "" = this host's FQDN
    max_sessions: int = 3  # sessions open at once (the provider's concurrent cap)
    max_messages_per_session: int = 100
    max_session_age: float = 300.0
    idle_timeout: float = 60.0
    pipelining: bool = True  # where the server offers PIPELINING (RFC 2920)
    max_per_minute: int = 0  # 0 = no cap
    max_per_day: int = 0
    rests: Rests = field(default_factory=Rests)

    @property
    def reuse(self) -> Reuse:
        return Reuse(self.max_messages_per_session, self.max_session_age, self.idle_timeout)

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
    helo_name = s.str("helo_name", "")
    if helo_name and not _HELO.fullmatch(helo_name):
        s.error("helo_name", "must be a host name or an address literal such as [192.0.2.1]")
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
        ca_file=s.str("ca_file", ""),
        helo_name=helo_name,
        max_sessions=s.int("max_sessions", 3, min=1, max=64),
        max_messages_per_session=s.int("max_messages_per_session", 100, min=0, max=100000),
        max_session_age=s.float("max_session_age", 300.0, min=1.0, max=86400.0),
        idle_timeout=s.float("idle_timeout", 60.0, min=0.1, max=3600.0),
        pipelining=s.bool("pipelining", True),
        max_per_minute=s.int("max_per_minute", 0, min=0, max=10**6),
        max_per_day=s.int("max_per_day", 0, min=0, max=10**8),
        rests=Rests(
            throttled=s.float("rest_throttled", 60.0, min=1.0, max=86400.0),
            over_quota=s.float("rest_over_quota", 3600.0, min=1.0, max=86400.0),
            refused=s.float("rest_refused", 300.0, min=1.0, max=86400.0),
            unreachable_max=s.float("rest_unreachable_max", 60.0, min=1.0, max=3600.0),
        ),
    )
    s.finish()
    return out
