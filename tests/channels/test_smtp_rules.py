"""The pure rules of the SMTP session pool: what a provider's refusal means, how
long an account rests, when a session is retired (no sockets)."""

from __future__ import annotations

import pytest

from otpd.channels import smtp_rules as rules
from otpd.channels.smtp_rules import Kind, Rests, Reuse

R = Rests(throttled=60, over_quota=3600, refused=300, unreachable_max=60)


@pytest.mark.parametrize(("code", "message", "stage", "kind", "seconds"), [
    # The provider says "too many" or a quota is used up: the account rests.
    (421, "4.7.0 Try again later, closing connection.", rules.MAIL, Kind.REST, 60),
    (421, "4.7.0 Too many concurrent SMTP connections", rules.CONNECT, Kind.REST, 60),
    (451, "4.7.1 Rate limit exceeded", rules.MAIL, Kind.REST, 60),
    (450, "4.7.1 Sending rate too high, slow down", rules.RCPT, Kind.REST, 60),
    (452, "4.3.1 Insufficient system resources", rules.RCPT, Kind.REST, 60),
    (452, "4.5.3 Too many recipients", rules.RCPT, Kind.REST, 60),
    (454, "Throttling failure: Maximum sending rate exceeded.", rules.MAIL, Kind.REST, 60),
    (550, "5.4.5 Daily user sending quota exceeded.", rules.MAIL, Kind.REST, 3600),
    (550, "5.4.5 Daily sending limit", rules.DATA, Kind.REST, 3600),
    (554, "Message rejected: Sending quota exceeded.", rules.DATA, Kind.REST, 3600),
    (550, "5.7.1 Too many messages, try again later", rules.RCPT, Kind.REST, 60),
    # A hint sets the rest.
    (421, "4.7.0 Try again in 5 minutes", rules.MAIL, Kind.REST, 300),
    (450, "4.7.1 rate limited, retry after 90 seconds", rules.MAIL, Kind.REST, 90),
    # Authentication, the sender: the account (its configuration), not the message.
    (535, "5.7.8 Username and Password not accepted", rules.AUTH, Kind.REST, 300),
    (454, "4.7.0 Temporary authentication failure", rules.AUTH, Kind.REST, 60),
    (553, "5.7.1 Sender address rejected: not owned by user", rules.MAIL, Kind.REST, 300),
    (554, "5.7.1 Service unavailable; client host blocked", rules.CONNECT, Kind.REST, 300),
    # The recipient or the message, for good: no other account would do better.
    (550, "5.1.1 The email account that you tried to reach does not exist", rules.RCPT,
     Kind.RECIPIENT, 0),
    (554, "5.7.1 Message rejected as spam", rules.DATA, Kind.RECIPIENT, 0),
    (550, "5.7.1 Relaying denied", rules.RCPT, Kind.RECIPIENT, 0),
    # This message later, the account keeps sending.
    (452, "4.2.2 The email account that you tried to reach is over quota", rules.RCPT,
     Kind.DEFER, 0),
    (450, "4.2.1 The user you are trying to contact is receiving mail at a rate that",
     rules.RCPT, Kind.DEFER, 0),
    (552, "5.2.2 The email account that you tried to reach is over quota", rules.RCPT,
     Kind.RECIPIENT, 0),
    (451, "4.3.0 Local error in processing", rules.DATA, Kind.DEFER, 0),
    (450, "4.2.0 Greylisted, see http://example.org", rules.RCPT, Kind.DEFER, 0),
    # A session closed for idling: a fresh one will do.
    (421, "4.4.2 mx.example.com Error: timeout exceeded", rules.MAIL, Kind.LOST, 0),
    (421, "Connection timed out", rules.MAIL, Kind.LOST, 0),
])
def test_replies(code: int, message: str, stage: str, kind: Kind, seconds: float) -> None:
    verdict = rules.classify_reply(code, message, stage, R)
    assert (verdict.kind, verdict.seconds) == (kind, seconds), verdict
    assert str(code) in verdict.reason


def test_a_hint_is_bounded() -> None:
    assert rules.hinted_wait("try again in 0 seconds") == 1.0
    assert rules.hinted_wait("try again in 900 hours") == rules.MAX_HINT
    assert rules.hinted_wait("4.7.0 Try again later") is None
    assert rules.hinted_wait("wait 2 min") == 120.0


def test_enhanced_codes() -> None:
    assert rules.enhanced_code("5.4.5 Daily user sending quota exceeded") == (5, 4, 5)
    assert rules.enhanced_code("  4.7.0 later") == (4, 7, 0)
    assert rules.enhanced_code("Throttling failure") is None


def test_unreachable_rests_double_up_to_the_cap() -> None:
    seconds = [rules.unreachable(n, "refused", R).seconds for n in range(1, 10)]
    assert seconds == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert all(rules.unreachable(n, "x", R).kind is Kind.REST for n in range(1, 4))
    assert "refused" in rules.unreachable(1, "refused", R).reason


def test_reuse_rules() -> None:
    rule = Reuse(max_messages=3, max_age=300, idle_timeout=60)
    assert rules.reusable(2, opened_at=0, now=299, rule=rule)
    assert not rules.reusable(3, opened_at=0, now=1, rule=rule)  # message cap
    assert not rules.reusable(0, opened_at=0, now=300, rule=rule)  # too old
    assert rules.reusable(10**6, opened_at=0, now=1, rule=Reuse(0, 300, 60))  # 0 = no cap
    assert not rules.idle_expired(last_used=10, now=69.9, rule=rule)
    assert rules.idle_expired(last_used=10, now=70, rule=rule)
    assert rules.next_idle_check([10, 40], now=50, rule=rule) == pytest.approx(20)
    assert rules.next_idle_check([], now=50, rule=rule) == 60
