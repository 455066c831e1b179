"""The SMTP channel sends to exactly one envelope recipient, the job's validated
mailbox, against a real SMTP server (aiosmtpd); headers come from validated
values only; a receiver or subject that is not (a row stored before the checks)
fails for good at once. And the [[smtp]] / [otp] settings that become headers."""

from __future__ import annotations

import logging
import time

import pytest

from otpd.app.settings import parse_settings
from otpd.channels.email import SmtpChannel, build_message
from otpd.channels.email_settings import SmtpAccount, parse_sender
from otpd.delivery.channel import Delivered, Failed, Job
from otpd.settings_reader import ConfigError
from tests.support.mail import SmtpServer


def account(port: int, sender: str = "OTP Gateway <otp@example.com>") -> SmtpAccount:
    return SmtpAccount(name="local", host="127.0.0.1", port=port, security="none",
                       username="", password="", sender=sender, timeout=5.0,
                       validate_certs=True)


def job(receiver: str, subject: str = "Your code", text: str = "Your OTP is 123456") -> Job:
    now = time.time()
    return Job(id=1, channel="email", receiver=receiver, subject=subject, text=text,
               expires_at=now + 60, attempts=0, created_at=now)


def channel(port: int, sender: str = "OTP Gateway <otp@example.com>") -> SmtpChannel:
    return SmtpChannel((account(port, sender),), workers=1, retry_base=0.1, retry_max=0.2)


async def test_the_envelope_recipient_is_the_one_mailbox(smtp: SmtpServer) -> None:
    outcome = await channel(smtp.port).deliver(job("user@xn--bcher-kva.example"))
    assert isinstance(outcome, Delivered), outcome
    assert smtp.sink.rcpts == ["user@xn--bcher-kva.example"]
    assert smtp.sink.envelopes == [("otp@example.com", ("user@xn--bcher-kva.example",))]
    msg = smtp.sink.messages[0]
    assert msg["To"] == "user@xn--bcher-kva.example"
    assert msg["From"] == "OTP Gateway <otp@example.com>"
    assert msg["Subject"] == "Your code"


@pytest.mark.parametrize("receiver", [
    "=?utf-8?q?attacker=40evil.test=2C?=victim@example.com",
    "postmaster)@example.com",
    "victim(x)@example.com",
    "attacker@evil.test, victim@example.com",
    "undisclosed: attacker@evil.test, victim@example.com;",
    "Victim <victim@example.com>",
])
async def test_a_stored_hostile_receiver_fails_at_once_without_any_rcpt(
        smtp: SmtpServer, receiver: str, caplog: pytest.LogCaptureFixture) -> None:
    # Rows queued before receivers were validated reach the channel as they are.
    with caplog.at_level(logging.WARNING, "otpd.channels.email"):
        outcome = await channel(smtp.port).deliver(job(receiver))
    assert isinstance(outcome, Failed), outcome
    assert smtp.sink.rcpts == [] and smtp.sink.messages == []
    assert not any(r.exc_info for r in caplog.records)  # a refusal, not a traceback


@pytest.mark.parametrize("subject", ["a\r\nBcc: x@evil.test", "a\nb", "a\u2028b", "a\x85b"])
async def test_a_stored_subject_with_a_line_break_fails_at_once(
        smtp: SmtpServer, subject: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "otpd.channels.email"):
        outcome = await channel(smtp.port).deliver(job("victim@example.com", subject))
    assert isinstance(outcome, Failed), outcome  # not a Retry until it expires
    assert smtp.sink.rcpts == []
    assert not any(r.exc_info for r in caplog.records)


async def test_headers_are_not_reparsed_into_recipients(smtp: SmtpServer) -> None:
    # A display name with a comma, quotes and non-ASCII text stays a display name.
    sender = '"Bank, Inc: =?utf-8?q?x=40evil.test?=" <otp@example.com>'
    outcome = await channel(smtp.port, sender).deliver(job("victim@example.com", "Kode ✓"))
    assert isinstance(outcome, Delivered), outcome
    assert smtp.sink.envelopes == [("otp@example.com", ("victim@example.com",))]
    msg = smtp.sink.messages[0]
    assert msg["To"] == "victim@example.com"
    assert "otp@example.com" in msg["From"]


def test_build_message_returns_the_validated_envelope() -> None:
    msg, sender, recipient = build_message(account(25), job("victim@example.com"))
    assert (sender, recipient) == ("otp@example.com", "victim@example.com")
    assert msg["To"] == "victim@example.com"
    assert msg["Message-ID"].endswith("@example.com>")


@pytest.mark.parametrize(("text", "name", "address"), [
    ("OTP Gateway <otp@example.com>", "OTP Gateway", "otp@example.com"),
    ("otp@Example.COM", "", "otp@example.com"),
    ('"OTP, Inc" <OTP@example.com>', "OTP, Inc", "OTP@example.com"),
    ("Bücher <otp@bücher.example>", "Bücher", "otp@xn--bcher-kva.example"),
])
def test_senders(text: str, name: str, address: str) -> None:
    sender = parse_sender(text)
    assert (sender.display_name, sender.address) == (name, address)


@pytest.mark.parametrize("text", [
    "OTP <otp@example.com>\r\nBcc: x@evil.test", "otp@example.com\n", "OTP\u2028 <a@b.example>",
    "a@b.example, c@evil.test", "OTP <a@b.example>, c@evil.test", "a@b.example (comment)",
    "x", "OTP <>", "OTP <postmaster>", "<a@b.example> <c@evil.test>", "g: a@b.example;",
])
def test_bad_senders(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sender(text)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text)
    return info.value.errors


def test_header_settings_with_line_breaks_are_refused_naming_the_key() -> None:
    errors = errors_of('[otp]\nemail_subject = "Code\\r\\nBcc: x@evil.test"\n'
                       '[[smtp]]\nsender = "OTP <otp@example.com>\\r\\nBcc: x@evil.test"\n'
                       '[[smtp]]\nsender = "OTP <a@b.example>, c@evil.test"\n'
                       '[[smtp]]\nsender = "ok@example.com"\n')
    assert any(e.startswith("otp.email_subject: must not contain control") for e in errors)
    assert any(e.startswith("smtp[0].sender: must not contain control") for e in errors)
    assert any(e.startswith("smtp[1].sender: must be one address") for e in errors)
    assert not any(e.startswith("smtp[2]") for e in errors), errors
    for bad in ("\\u2028", "\\t", "\\u0085", "\\u007f"):
        errors = errors_of(f'[otp]\nemail_subject = "a{bad}b"\n')
        assert errors[0].startswith("otp.email_subject: "), (bad, errors)
    errors = errors_of(f'[otp]\nemail_subject = "{"x" * 999}"\n')
    assert errors[0].startswith("otp.email_subject: must be at most 998")
    s = parse_settings('[otp]\nemail_subject = "Kode OTP — ünïcode ✓"\n'
                       '[[smtp]]\nsender = "Bücher <otp@bücher.example>"\n')
    assert s.otp.email_subject == "Kode OTP — ünïcode ✓"
