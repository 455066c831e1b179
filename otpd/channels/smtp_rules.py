"""What an SMTP failure means and for how long an account rests (pure: no I/O).

The session pool (``smtp_sessions``) reports every failure as a stage and,
when the server answered, its reply; these rules decide:

- ``RECIPIENT``: this message is refused for good (5xx to RCPT or to the
  message itself): never retried, on no account.
- ``DEFER``: this message only, later (a 4xx about the recipient's mailbox, a
  greylisting or local-error 4xx): the account is fine and keeps sending.
- ``REST``: the account must not send for ``seconds`` (the provider said
  "too many", a quota is used up, authentication or the sender was refused,
  the server is unreachable); the message goes to the next account at once
  instead of burning retries on this one.
- ``LOST``: the session is gone (closed while idle, dropped mid-stream): a
  fresh session of the same account may well work.

Providers' wording varies (Gmail ``550 5.4.5 Daily user sending quota
exceeded``, ``421 4.7.0 Try again later``, SES ``454 Throttling failure:
Maximum sending rate exceeded`` and ``554 Message rejected: Sending quota
exceeded``, Office 365 ``452 4.3.1 ... message rate limit``), so the enhanced
status code (RFC 3463) and the text both count, and a "try again in N
minutes" hint sets the rest when there is one.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# Where in the conversation a failure happened.
CONNECT = "connect"  # TCP, TLS, greeting, EHLO, STARTTLS
AUTH = "auth"
MAIL = "mail"  # MAIL FROM (and the RSET before it)
RCPT = "rcpt"
DATA = "data"  # the DATA command and the message itself

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
# "too many"/rate/quota wording of the big providers (case-insensitive).
_RATE = re.compile(r"rate|quota|too many|limit|exceed|throttl|slow down|try again later"
                   r"|too fast|concurren", re.IGNORECASE)
_DAILY = re.compile(r"dai|day|24 ?h|quota", re.IGNORECASE)
_IDLE_CLOSE = re.compile(r"timeout|timed out|idle", re.IGNORECASE)
_HINT = re.compile(r"(?:in|after|wait)\s+(\d+(?:\.\d+)?)\s*"
                   r"(s|sec|seconds?|m|min|minutes?|h|hours?)\b", re.IGNORECASE)
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}

MAX_HINT = 86400.0  # a hint never rests an account longer than a day


class Kind(enum.Enum):
    RECIPIENT = "recipient"
    DEFER = "defer"
    REST = "rest"
    LOST = "lost"


@dataclass(frozen=True)
class Rests:
    """How long an account rests after each kind of refusal ([[smtp]] rest_*)."""

    throttled: float = 60.0  # 421, "too many", a 4xx rate reply
    over_quota: float = 3600.0  # a 5xx quota reply (daily caps: probed again hourly)
    refused: float = 300.0  # authentication, sender or TLS certificate refused
    unreachable_max: float = 60.0  # connection trouble: 1 s, doubled per failure, up to this


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    seconds: float = 0.0  # REST: how long
    reason: str = ""  # why, for logs, status and the outbox

    @property
    def rests(self) -> bool:
        return self.kind is Kind.REST


def enhanced_code(message: str) -> tuple[int, int, int] | None:
    """The RFC 3463 status code that starts a reply's text (``5.4.5``), if any."""
    match = _ENHANCED.match(message)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def hinted_wait(message: str) -> float | None:
    """Seconds the server asks us to wait ("try again in 5 minutes"), if it says."""
    match = _HINT.search(message)
    if match is None:
        return None
    seconds = float(match.group(1)) * _UNIT[match.group(2)[0].lower()]
    return min(max(seconds, 1.0), MAX_HINT)


def _rest(seconds: float, message: str, reason: str) -> Verdict:
    hint = hinted_wait(message)
    return Verdict(Kind.REST, hint if hint is not None else seconds, reason)


def classify_reply(code: int, message: str, stage: str, rests: Rests) -> Verdict:
    """What a refusal (any reply but the expected one) at ``stage`` means."""
    text = f"{code} {message}".strip()
    enhanced = enhanced_code(message)
    rate = bool(_RATE.search(message)) or (enhanced is not None and enhanced[1:] == (4, 5))
    mailbox = enhanced is not None and enhanced[1] == 2  # x.2.x: the recipient's mailbox
    if code == 421:
        # The server closes the session. Postfix says "421 4.4.2 ... timeout exceeded"
        # to a session idle too long: a fresh one will do. Otherwise it is throttling.
        if (enhanced is not None and enhanced[1:] == (4, 2)) or _IDLE_CLOSE.search(message):
            return Verdict(Kind.LOST, 0.0, f"session closed by the server: {text}")
        return _rest(rests.throttled, message, f"throttled: {text}")
    if stage == AUTH:
        if 400 <= code < 500:
            return _rest(rests.throttled, message, f"authentication deferred: {text}")
        return _rest(rests.refused, message, f"authentication failed: {text}")
    if stage == CONNECT:
        if 400 <= code < 500:
            return _rest(rests.throttled, message, f"not accepting sessions: {text}")
        return _rest(rests.refused, message, f"session refused: {text}")
    if 400 <= code < 500:
        if mailbox:
            # The recipient's mailbox is full or takes mail too fast: that one
            # recipient waits, every other keeps going through this account.
            return Verdict(Kind.DEFER, 0.0, f"deferred by the server: {text}")
        if rate or code in (452, 454):
            # 452 with one recipient is the account or the server out of room.
            return _rest(rests.throttled, message, f"throttled: {text}")
        return Verdict(Kind.DEFER, 0.0, f"deferred by the server: {text}")
    if 500 <= code < 600:
        if rate and not mailbox:
            seconds = rests.over_quota if _DAILY.search(message) or (
                enhanced is not None and enhanced[1:] == (4, 5)) else rests.throttled
            return _rest(seconds, message, f"over quota: {text}")
        if stage == MAIL:
            # The sender (this account's address) is refused: another account may
            # be allowed to send; this one is misconfigured.
            return _rest(rests.refused, message, f"sender refused: {text}")
        return Verdict(Kind.RECIPIENT, 0.0, f"rejected: {text}")
    # Not an SMTP status at all (a garbled reply): treat the session as gone.
    return Verdict(Kind.LOST, 0.0, f"unexpected reply: {text}")


def unreachable(failures_in_row: int, reason: str, rests: Rests) -> Verdict:
    """Connection trouble (refused, reset, timed out): rest 1 s, then doubled per
    failure in a row, up to ``rests.unreachable_max``: an outage costs a few probes,
    a blip costs a second."""
    seconds = min(2.0 ** max(failures_in_row - 1, 0), rests.unreachable_max)
    return Verdict(Kind.REST, seconds, f"unreachable: {reason}")


def refused(reason: str, rests: Rests) -> Verdict:
    """A configuration problem the server will not change its mind about soon
    (TLS certificate not trusted, no AUTH offered): rest as for a refused login."""
    return Verdict(Kind.REST, rests.refused, reason)


@dataclass(frozen=True)
class Reuse:
    """When a session is retired instead of reused ([[smtp]] settings)."""

    max_messages: int  # per session, then QUIT (providers cap it; 0 = no cap)
    max_age: float  # s since it opened (a fresh TLS session now and then)
    idle_timeout: float  # s unused, then closed (the server would drop it anyway)


def reusable(messages: int, opened_at: float, now: float, rule: Reuse) -> bool:
    """May a session that sent ``messages`` and opened at ``opened_at`` send more?"""
    if rule.max_messages and messages >= rule.max_messages:
        return False
    return now - opened_at < rule.max_age


def idle_expired(last_used: float, now: float, rule: Reuse) -> bool:
    return now - last_used >= rule.idle_timeout


def next_idle_check(last_used: list[float], now: float, rule: Reuse) -> float:
    """Seconds until the next idle session is due to close (idle_timeout with none)."""
    if not last_used:
        return rule.idle_timeout
    return max(min(t + rule.idle_timeout for t in last_used) - now, 0.05)
