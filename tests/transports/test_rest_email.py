"""End to end over real HTTP: REST -> service -> store -> outbox -> SMTP (aiosmtpd)."""

from __future__ import annotations

import asyncio
import base64
import re
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import API_PASSWORD, API_USER, free_port, start_daemon, write_config
from tests.support.mail import SmtpServer

RECEIVER = "someone@example.org"


def otp_from(smtp: SmtpServer, index: int = -1) -> str:
    body = smtp.sink.messages[index].get_payload(decode=True)
    assert isinstance(body, bytes)
    match = re.search(r"\b(\d{6})\b", body.decode())
    assert match, body
    return match.group(1)


def otp_request(reference: str, **extra: object) -> dict[str, object]:
    data: dict[str, object] = {"date_time": int(time.time()), "receiver": RECEIVER,
                               "message": "Your OTP is %s", "reference": reference,
                               "param1": "100000", "param2": "1234567890"}
    data.update(extra)
    return data


async def test_request_and_verify_otp_by_email(tmp_path: Path, smtp: SmtpServer,
                                               session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port), session)
    try:
        status, body = await run.client.call("request-otp", otp_request("tx-1"))
        assert status == 200
        assert body["response_code"] == "0000", body
        assert body["data"]["reference"] == "tx-1" and body["data"]["receiver"] == RECEIVER
        assert isinstance(body["data"]["date_time"], int)
        msg = smtp.sink.messages[-1]
        assert msg["Subject"] == "Your OTP code"  # OTP-Publisher sends none: the default
        assert msg["From"] == "OTP Gateway <otp@example.com>"
        assert msg["Date"] and msg["Message-ID"]
        code = otp_from(smtp)

        # Params are bound into the hash: a different param1 is an invalid OTP.
        verify: dict[str, object] = {"receiver": RECEIVER, "reference": "tx-1", "otp": code,
                  "param1": "999", "param2": "1234567890"}
        _, body = await run.client.call("verify-otp", verify)
        assert body["response_code"] == "1202"
        verify["param1"] = 100000  # numbers are taken as their decimal string
        _, body = await run.client.call("verify-otp", verify)
        assert body["response_code"] == "0000", body
        _, body = await run.client.call("verify-otp", verify)
        assert body["response_code"] == "1202"  # single use

        _, body = await run.client.call("request-otp", otp_request("tx-1"))
        assert body["response_code"] == "1201"  # reference already used
    finally:
        await run.daemon.stop()


async def test_attempt_limit_burns_the_otp(tmp_path: Path, smtp: SmtpServer,
                                           session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, smtp_port=smtp.port, otp_lines="max_attempts = 3")
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("request-otp", otp_request("tx-2"))
        assert body["response_code"] == "0000"
        code = otp_from(smtp)
        wrong = f"{(int(code) + 1) % 1000000:06d}"
        verify = {"receiver": RECEIVER, "reference": "tx-2", "otp": wrong,
                  "param1": "100000", "param2": "1234567890"}
        codes = []
        for _ in range(3):
            _, body = await run.client.call("verify-otp", verify)
            codes.append(body["response_code"])
        assert codes == ["1202", "1202", "1204"]
        verify["otp"] = code
        _, body = await run.client.call("verify-otp", verify)
        assert body["response_code"] == "1204"  # burned: even the right code fails
    finally:
        await run.daemon.stop()


async def test_expired_otp(tmp_path: Path, smtp: SmtpServer,
                           session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port), session)
    try:
        _, body = await run.client.call(
            "request-otp", otp_request("tx-3", expiration=int(time.time()) + 2))
        assert body["response_code"] == "0000"
        code = otp_from(smtp)
        await asyncio.sleep(2.2)
        _, body = await run.client.call("verify-otp", {
            "receiver": RECEIVER, "reference": "tx-3", "otp": code,
            "param1": "100000", "param2": "1234567890"})
        assert body["response_code"] == "1203"
        _, body = await run.client.call(
            "request-otp", otp_request("tx-4", expiration=int(time.time()) - 5))
        assert body["response_code"] == "1203"
        assert len(smtp.sink.messages) == 1  # nothing sent for the past expiration
    finally:
        await run.daemon.stop()


async def test_send_email_alias_duplicate_id_and_block(tmp_path: Path, smtp: SmtpServer,
                                                       session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port), session)
    try:
        data = {"date_time": 1629685778, "expiration": int(time.time()) + 60, "id": 123456,
                "receiver": RECEIVER, "subject": "Your OTP Code", "message": "Halo ünïcode ✓"}
        # OTP-Publisher posts send-email to /api/sms: the command decides.
        _, body = await run.client.call("send-email", data, path="/api/sms")
        assert body["response_code"] == "0000", body
        assert body["command"] == "send-email"
        assert smtp.sink.messages[-1]["Subject"] == "Your OTP Code"
        payload = smtp.sink.messages[-1].get_payload(decode=True)
        assert isinstance(payload, bytes) and payload.decode("utf-8").strip() == "Halo ünïcode ✓"
        _, body = await run.client.call("send-mail", data)
        assert body["command"] == "send-mail"
        assert body["response_code"] == "1201"
        assert body["data"]["status"] == "sent"
        assert len(smtp.sink.messages) == 1

        _, body = await run.client.call("block-msisdn", {"receiver": RECEIVER}, path="/api/block")
        assert body["response_code"] == "0000"
        data["id"] = 2
        _, body = await run.client.call("send-email", data)
        assert body["response_code"] == "1400"
        _, body = await run.client.call("request-otp", otp_request("tx-b"))
        assert body["response_code"] == "1400"
        _, body = await run.client.call("unblock-msisdn", {"msisdn": RECEIVER})
        assert body["response_code"] == "0000"
        _, body = await run.client.call("send-email", data)
        assert body["response_code"] == "0000"
        assert len(smtp.sink.messages) == 2
    finally:
        await run.daemon.stop()


async def test_block_list_survives_restart_and_canonicalises(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path)
    run = await start_daemon(config, session)
    _, body = await run.client.call("block-msisdn", {"receiver": "08126666666"})
    assert body["response_code"] == "0000"
    await run.daemon.stop()
    run = await start_daemon(config, session)
    try:
        # Same number written another way is still blocked.
        _, body = await run.client.call("send-sms", {"receiver": "+62 812 6666 666",
                                                     "message": "hi"})
        assert body["response_code"] == "1400"
        # No modem configured at all: 1000 for an unblocked number.
        _, body = await run.client.call("send-sms", {"receiver": "08120000000", "message": "hi"})
        assert body["response_code"] == "1000"
    finally:
        await run.daemon.stop()


async def test_http_errors_are_json(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path), session)
    base = run.client.base
    try:
        status, body = await run.client.call("echo", {}, password="wrong")
        assert status == 401 and body["response_code"] == "1100"
        async with session.post(base + "/api/otp", data=b"{}") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
            assert (await resp.json())["response_code"] == "1100"
        async with session.get(base + "/api/otp") as resp:
            assert resp.status == 405 and (await resp.json())["response_code"] == "1300"
        async with session.post(base + "/nope") as resp:
            assert resp.status == 404 and "response_code" in await resp.json()
        status, body = await run.client.call("", {}, raw=b"{not json")
        assert status == 400 and body["response_code"] == "1300"
        status, body = await run.client.call("", {}, raw=b"x" * 70000)
        assert status == 413 and body["response_code"] == "1300"
        status, body = await run.client.call("bogus", {})
        assert status == 200 and body["response_code"] == "1301"
        # OTP-Publisher: form content type, JSON body.
        status, body = await run.client.call(
            "echo", {"a": 1}, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200 and body["response_code"] == "0000" and body["data"] == {"a": 1}
        # Invalid UTF-8 from the PHP client arrives as an empty chunked body.
        token = base64.b64encode(f"{API_USER}:{API_PASSWORD}".encode()).decode()

        async def empty() -> object:
            if False:
                yield b""

        async with session.post(base + "/api/otp", data=empty(),
                                headers={"Authorization": f"Basic {token}",
                                         "Expect": "100-continue"}) as resp:
            assert resp.status == 400 and (await resp.json())["response_code"] == "1300"
        status, body = await run.client.call("echo", {"still": "serving"})
        assert body["data"] == {"still": "serving"}
    finally:
        await run.daemon.stop()


async def test_pending_mail_survives_restart_and_is_sent(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    smtp.stop()  # mail server down
    config = write_config(tmp_path, smtp_port=smtp.port, wait=1)
    run = await start_daemon(config, session)
    data = {"id": "m-1", "receiver": RECEIVER, "subject": "s", "message": "Your OTP is 424242",
            "expiration": int(time.time()) + 60}
    _, body = await run.client.call("send-email", data)
    assert body["response_code"] == "1111"  # durably queued, still pending
    await run.daemon.stop()
    db = b"".join(p.read_bytes() for p in tmp_path.glob("otpd.db*"))
    assert b"424242" not in db  # sealed at rest
    smtp.start()
    run = await start_daemon(config, session)
    try:
        for _ in range(100):
            if smtp.sink.messages:
                break
            await asyncio.sleep(0.1)
        assert len(smtp.sink.messages) == 1
        _, body = await run.client.call("send-email", data)
        assert body["response_code"] == "1201" and body["data"]["status"] == "sent"
        conn = sqlite3.connect(tmp_path / "otpd.db")
        left = conn.execute("SELECT count(*) FROM outbox WHERE sealed IS NOT NULL").fetchone()[0]
        assert left == 0
        conn.close()
    finally:
        await run.daemon.stop()


async def test_message_expires_when_smtp_stays_down(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    smtp.stop()
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port, wait=5), session)
    try:
        _, body = await run.client.call("send-email", {
            "receiver": RECEIVER, "subject": "s", "message": "m",
            "expiration": int(time.time()) + 2})
        assert body["response_code"] == "1102", body  # failed for good at expiration
        assert "expiration" in body["message"]
        _, body = await run.client.call("request-otp", otp_request(
            "tx-x", expiration=int(time.time()) + 2))
        assert body["response_code"] == "1102"
        smtp.start()
        # The failed request-otp left no OTP behind: the same reference works now.
        _, body = await run.client.call("request-otp", otp_request("tx-x"))
        assert body["response_code"] == "0000"
        await asyncio.sleep(0.5)
        assert len(smtp.sink.messages) == 1  # the expired ones were never sent later
    finally:
        await run.daemon.stop()


async def test_smtp_recipient_rejected_fails_at_once(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    smtp.sink.reject_with = "550 no such user"
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port), session)
    try:
        t0 = time.monotonic()
        _, body = await run.client.call("send-email", {"receiver": RECEIVER, "subject": "s",
                                                       "message": "m"})
        assert body["response_code"] == "1102" and "550" in body["message"]
        assert time.monotonic() - t0 < 4  # no retries for a permanent refusal
    finally:
        await run.daemon.stop()


async def test_failover_to_the_next_smtp_account(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    dead = free_port()
    extra = f"""
        [[smtp]]
        name = "dead-first"
        host = "127.0.0.1"
        port = {dead}
        sender = "a@example.com"
        timeout = 2
    """
    # The dead account is listed first; the live one comes from smtp_port.
    config = write_config(tmp_path, extra, smtp_port=None)
    config.write_text(config.read_text() + f"""
[[smtp]]
name = "live-second"
host = "127.0.0.1"
port = {smtp.port}
sender = "OTP <otp@example.com>"
""")
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("send-email", {"receiver": RECEIVER, "subject": "s",
                                                       "message": "m"})
        assert body["response_code"] == "0000"
        assert body["data"]["via"] == "live-second"
        assert len(smtp.sink.messages) == 1
        status = run.daemon.status()["channels"]["email"]["accounts"]
        assert [a["healthy"] for a in status] == [False, True]
    finally:
        await run.daemon.stop()


async def test_stop_answers_waiting_requests_at_once(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    smtp.stop()  # nothing can be delivered: the request waits for delivery.wait
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port, wait=60), session)
    call = asyncio.create_task(run.client.call("send-email", {
        "receiver": RECEIVER, "subject": "s", "message": "m"}))
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    await run.daemon.stop()
    _, body = await call
    assert body["response_code"] == "1111"  # still pending, kept in the outbox
    assert time.monotonic() - t0 < 10


async def test_an_internal_error_is_still_a_json_answer(
        tmp_path: Path, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    run = await start_daemon(write_config(tmp_path), session)
    try:
        assert run.daemon.service is not None

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(run.daemon.service, "execute", broken)
        status, body = await run.client.call("echo", {})
        assert status == 500 and body["response_code"] == "1102"
        monkeypatch.undo()
        status, body = await run.client.call("echo", {"ok": 1})
        assert status == 200 and body["data"] == {"ok": 1}  # still serving
    finally:
        await run.daemon.stop()
