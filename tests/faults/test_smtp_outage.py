"""The SMTP server is down, then back: what was accepted (1111) is mailed when it
returns; what expired meanwhile is never mailed and its failure is on record
(the operator's outbox, and the answer to a repeated ``id``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from otpd.app import control
from tests.support.daemon import free_port, start_daemon, write_config
from tests.support.mail import SmtpServer, SmtpSink, tagged
from tests.support.waiting import wait_until

RCPT = "outage@example.org"


async def test_smtp_down_then_back(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    sink = SmtpSink()
    smtp = SmtpServer(sink, free_port())  # not started: the server is down
    config = write_config(tmp_path, smtp_port=smtp.port, wait=0)
    run = await start_daemon(config, session)
    try:
        now = int(time.time())
        lasting = [f"keep-{i}" for i in range(5)]
        doomed = [f"gone-{i}" for i in range(3)]
        for tag in lasting + doomed:
            life = 600 if tag.startswith("keep") else 2
            _, body = await run.client.call("send-email", {
                "id": tag, "receiver": RCPT, "subject": "outage", "message": tagged(tag),
                "expiration": now + life})
            assert body["response_code"] == "1111", body
        # An OTP whose mail cannot go out before it expires.
        _, body = await run.client.call("request-otp", {
            "receiver": RCPT, "reference": "otp-gone", "message": "Code %s",
            "expiration": now + 2})
        assert body["response_code"] == "1111", body

        # The short-lived ones expire while the server is down.
        await asyncio.sleep(now + 3 - time.time())
        smtp.start()
        await wait_until(lambda: set(lasting) <= set(sink.tags()), 15, "the pending mail")
        await asyncio.sleep(1.0)  # anything expired would have gone out by now
        tags = sink.tags()
        assert sorted(tags) == sorted(lasting), tags  # each once, none of the expired
        assert not [m for m in sink.messages if "otp" in str(m["Subject"]).lower()]

        # The failures are recorded: a repeated id says how the first one ended...
        for tag in doomed:
            _, body = await run.client.call("send-email", {
                "id": tag, "receiver": RCPT, "subject": "outage", "message": tagged(tag)})
            assert body["response_code"] == "1201", body
            assert body["data"]["status"] == "expired", body
            assert body["data"]["first_response_code"] in ("1102", "1203"), body
        _, body = await run.client.call("send-email", {
            "id": "keep-0", "receiver": RCPT, "subject": "outage", "message": "again"})
        assert body["data"]["status"] == "sent", body
        # ...and so does the operator's view of the outbox, with the reason.
        answer = await control.request(tmp_path / "control.sock",
                                       {"op": "outbox", "states": ["expired", "failed"]})
        rows = answer["messages"]
        assert len(rows) == len(doomed) + 1, rows
        assert all(r["state"] == "expired" and r["reason"] for r in rows), rows
        assert any("Connect" in r["reason"] or "refused" in r["reason"].lower()
                   for r in rows), rows
        # The OTP whose mail never went out is gone: the reference may be used again.
        _, body = await run.client.call("verify-otp", {
            "receiver": RCPT, "reference": "otp-gone", "otp": "000000"})
        assert body["response_code"] == "1202", body
        _, body = await run.client.call("request-otp", {
            "receiver": RCPT, "reference": "otp-gone", "message": "Code %s [[otp-again]]"})
        assert body["response_code"] in ("0000", "1111"), body
        await wait_until(lambda: "otp-again" in sink.tags(), 10, "the new OTP mail")
    finally:
        await run.daemon.stop()
        smtp.stop()
