"""Email receivers and headers at the door, end to end over real HTTP with a real
SMTP server (aiosmtpd): a receiver is one mailbox, compared case-insensitively,
and the only envelope recipient; header values with line breaks are refused
with 1300 when the request arrives, never queued to fail later."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import Running, start_daemon, write_config
from tests.support.mail import SmtpServer, otp_in

INJECTION = "=?utf-8?q?attacker=40evil.test=2C?=victim@example.com"


@pytest.fixture
async def run(tmp_path: Path, smtp: SmtpServer,
              session: aiohttp.ClientSession) -> AsyncIterator[Running]:
    running = await start_daemon(write_config(tmp_path, smtp_port=smtp.port), session)
    try:
        yield running
    finally:
        await running.daemon.stop()


def queued(tmp_path: Path) -> int:
    """Rows in the outbox, sent or not: what the daemon accepted to send."""
    conn = sqlite3.connect(tmp_path / "otpd.db")
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def otp(receiver: str, reference: str, **extra: Any) -> dict[str, Any]:
    return {"receiver": receiver, "reference": reference, "message": "Your OTP is %s", **extra}


def mail(receiver: str, **extra: Any) -> dict[str, Any]:
    return {"receiver": receiver, "subject": "s", "message": "m", **extra}


async def test_encoded_word_receiver_is_refused_without_any_rcpt(
        run: Running, smtp: SmtpServer, tmp_path: Path) -> None:
    for command, data in [("send-email", mail(INJECTION)), ("send-mail", mail(INJECTION)),
                          ("send-message", mail(INJECTION)),
                          ("request-otp", otp(INJECTION, "ref-1"))]:
        status, body = await run.client.call(command, data)
        assert status == 200
        assert body["response_code"] == "1300", (command, body)
        assert body["message"].startswith("data.receiver: "), body
    assert smtp.sink.rcpts == []
    assert queued(tmp_path) == 0


@pytest.mark.parametrize("receiver", [
    "postmaster)@example.com",
    "attacker@evil.test, victim@example.com",
    "victim@example.com, attacker@evil.test",
    "Victim <victim@example.com>",
    "undisclosed: attacker@evil.test;",
    '"attacker@evil.test"@example.com',
    "victim@example.com\r\nRCPT TO:<attacker@evil.test>",
    "victim%evil.test@example.com",
    "victim@localhost",
])
async def test_anything_but_one_mailbox_is_refused(
        run: Running, smtp: SmtpServer, tmp_path: Path, receiver: str) -> None:
    for command, data in [("send-email", mail(receiver)), ("request-otp", otp(receiver, "r"))]:
        _, body = await run.client.call(command, data)
        assert body["response_code"] == "1300", (command, body)
        assert body["message"].startswith("data.receiver: "), body
    # Nor is it taken for a phone number.
    _, body = await run.client.call("send-message", mail(receiver))
    assert body["response_code"] == "1300", body
    assert smtp.sink.rcpts == []
    assert queued(tmp_path) == 0


async def test_block_list_holds_whatever_the_notation(
        run: Running, smtp: SmtpServer, tmp_path: Path) -> None:
    _, body = await run.client.call("block-msisdn", {"receiver": "victim@example.com"})
    assert body["response_code"] == "0000", body
    for receiver in ("Victim@Example.com", "VICTIM@EXAMPLE.COM", "victim@EXAMPLE.com"):
        _, body = await run.client.call("send-email", mail(receiver))
        assert body["response_code"] == "1400", (receiver, body)
        _, body = await run.client.call("request-otp", otp(receiver, f"ref-{receiver}"))
        assert body["response_code"] == "1400", (receiver, body)
        _, body = await run.client.call("send-message", mail(receiver))
        assert body["response_code"] == "1400", (receiver, body)
    for receiver in ("victim(x)@example.com", "victim@(x)example.com", INJECTION):
        _, body = await run.client.call("send-email", mail(receiver))
        assert body["response_code"] == "1300", (receiver, body)
        _, body = await run.client.call("request-otp", otp(receiver, f"ref-{receiver}"))
        assert body["response_code"] == "1300", (receiver, body)
    # Blocking a hostile notation is refused too, rather than blocking a string.
    _, body = await run.client.call("block-msisdn", {"receiver": "victim(x)@example.com"})
    assert body["response_code"] == "1300", body
    assert smtp.sink.rcpts == [] and smtp.sink.messages == []
    assert queued(tmp_path) == 0

    # Unblocked in another notation: the same mailbox, delivered to as canonical.
    _, body = await run.client.call("unblock-msisdn", {"msisdn": "Victim@EXAMPLE.com"})
    assert body["response_code"] == "0000", body
    _, body = await run.client.call("send-email", mail("Victim@Example.com"))
    assert body["response_code"] == "0000", body
    assert smtp.sink.rcpts == ["victim@example.com"]


async def test_duplicate_ids_compare_receivers_case_insensitively(
        run: Running, smtp: SmtpServer) -> None:
    _, body = await run.client.call("send-email", mail("someone@example.org", id="dup-1"))
    assert body["response_code"] == "0000", body
    _, body = await run.client.call("send-email", mail("SomeOne@Example.ORG", id="dup-1"))
    assert body["response_code"] == "1201", body
    assert smtp.sink.rcpts == ["someone@example.org"]


async def test_receiver_limits_compare_case_insensitively(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    limits = "enabled = true\nreceiver_max = 1\nreceiver_cooldown = 0"
    config = write_config(tmp_path, smtp_port=smtp.port, limits=limits)
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("send-email", mail("limited@example.org"))
        assert body["response_code"] == "0000", body
        for receiver in ("Limited@Example.org", "LIMITED@EXAMPLE.ORG"):
            _, body = await run.client.call("send-email", mail(receiver))
            assert body["response_code"] == "1401", (receiver, body)
        assert smtp.sink.rcpts == ["limited@example.org"]
    finally:
        await run.daemon.stop()


async def test_idn_domain_is_sent_to_its_ascii_form(run: Running, smtp: SmtpServer) -> None:
    _, body = await run.client.call("send-email", mail("user@bücher.example"))
    assert body["response_code"] == "0000", body
    assert smtp.sink.rcpts == ["user@xn--bcher-kva.example"]
    assert smtp.sink.envelopes == [("otp@example.com", ("user@xn--bcher-kva.example",))]
    assert smtp.sink.messages[0]["To"] == "user@xn--bcher-kva.example"

    # An OTP is bound to the canonical mailbox: verified in any notation of it.
    _, body = await run.client.call("request-otp", otp("User@Bücher.example", "idn-1"))
    assert body["response_code"] == "0000", body
    assert smtp.sink.rcpts[-1] == "user@xn--bcher-kva.example"
    code = otp_in(smtp.sink.messages[-1])
    _, body = await run.client.call("verify-otp", {
        "receiver": "USER@xn--bcher-kva.EXAMPLE", "reference": "idn-1", "otp": code})
    assert body["response_code"] == "0000", body


@pytest.mark.parametrize("subject", [
    "Your code\r\nBcc: x@evil.test",
    "Your code\nBcc: x@evil.test",
    "Your code\rBcc: x@evil.test",
    "Your code\u2028Bcc: x@evil.test",
    "Your code\x85Bcc: x@evil.test",
    "Your\tcode",
    "Your code\x1b[2J",
])
async def test_subject_with_control_characters_is_refused_at_the_door(
        run: Running, smtp: SmtpServer, tmp_path: Path, subject: str) -> None:
    for command, data in [
        ("send-email", mail("victim@example.com", subject=subject)),
        ("send-message", mail("victim@example.com", subject=subject)),
        ("request-otp", otp("victim@example.com", "subj-1", subject=subject)),
    ]:
        _, body = await run.client.call(command, data)
        assert body["response_code"] == "1300", (command, body)
        assert body["message"].startswith("data.subject: "), body
    assert queued(tmp_path) == 0
    assert smtp.sink.rcpts == []
    # The same reference is still free: nothing of the refused request stayed.
    _, body = await run.client.call("request-otp", otp("victim@example.com", "subj-1",
                                                       subject="Your code"))
    assert body["response_code"] == "0000", body
    assert smtp.sink.messages[-1]["Subject"] == "Your code"
    assert smtp.sink.messages[-1]["Bcc"] is None


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "otpd", "check-config", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)


def test_check_config_refuses_line_breaks_in_header_settings(tmp_path: Path) -> None:
    users = tmp_path / "users"
    base = f'[server]\nusers_file = "{users}"\n'
    config = tmp_path / "otpd.toml"
    config.write_text(base + '[otp]\nemail_subject = "Code\\r\\nBcc: x@evil.test"\n'
                      '[[smtp]]\nsender = "OTP <otp@example.com>\\r\\nBcc: x@evil.test"\n')
    config.chmod(0o640)
    out = check_config(config)
    assert out.returncode == 2, out
    assert "otp.email_subject: must not contain control" in out.stderr
    assert "smtp[0].sender: must not contain control" in out.stderr

    config.write_text(base + '[[smtp]]\nsender = "OTP <otp@example.com>, x@evil.test"\n')
    out = check_config(config)
    assert out.returncode == 2 and "smtp[0].sender: must be one address" in out.stderr

    config.write_text(base + '[otp]\nemail_subject = "Kode OTP ✓"\n'
                      '[[smtp]]\nsender = "OTP <otp@example.com>"\n')
    out = check_config(config)
    assert out.returncode == 0 and "OK" in out.stdout, out



async def test_lone_surrogates_are_refused_not_an_internal_error(
        run: Running, smtp: SmtpServer, tmp_path: Path) -> None:
    # JSON may escape a lone surrogate; no store, sealer or mail writer can encode one.
    for field, data in [
        ("subject", '"receiver":"a@example.org","subject":"\\ud800","message":"m"'),
        ("message", '"receiver":"a@example.org","subject":"s","message":"\\udfff"'),
    ]:
        raw = ('{"command":"send-email","data":{' + data + '}}').encode()
        status, body = await run.client.call("", {}, raw=raw)
        assert status == 200 and body["response_code"] == "1300", body
        assert body["message"].startswith(f"data.{field}: "), body
    assert queued(tmp_path) == 0 and smtp.sink.rcpts == []
