"""Which frame on a reply topic is the answer (otpd.client.replies), and the
broker transports' wait for the first acceptable one, without sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from otpd.client.envelope import encode, envelope
from otpd.client.errors import ReplyTimeout, TransportError
from otpd.client.publishers.base import Frames, Inbox, Transport
from otpd.client.replies import ReplyCheck, UnacceptableReply
from otpd.wire.signing import sign_reply

KEY = "reply-check-key-0123456789"
VERIFY = envelope("verify-otp", {"date_time": 1, "receiver": " 08126666666 ", "otp": "1",
                                 "reference": 12345, "param1": "p"})


def body(env: dict[str, Any] = VERIFY, key: str = "") -> bytes:
    return encode(env, callback_topic="otp-reply-1", signing_key=key)


def frame(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def genuine(check: ReplyCheck, code: str = "1202", **data: Any) -> dict[str, Any]:
    """The answer as the daemon makes it (echo of the parsed request)."""
    return {"command": check.command, "response_code": code,
            "data": {"date_time": 1, **check.echo, **data}, "message": "invalid OTP"}


def test_echo_is_what_the_daemon_echoes() -> None:
    check = ReplyCheck.for_request(body())
    # stripped text, a numeric reference as its decimal string; no id when none was sent
    assert check.command == "verify-otp"
    assert dict(check.echo) == {"receiver": "08126666666", "reference": "12345"}
    mail = ReplyCheck.for_request(body(envelope("send-mail", {
        "receiver": "a@b.example", "subject": "s", "message": "m", "id": 7})))
    assert mail.command == "send-mail"  # as sent, not the canonical send-email
    assert dict(mail.echo) == {"receiver": "a@b.example", "id": "7"}
    modems = ReplyCheck.for_request(body(envelope("get-modem-list", {"date_time": 1})))
    assert dict(modems.echo) == {}


def test_the_daemons_answer_is_taken() -> None:
    check = ReplyCheck.for_request(body())
    r = check(frame(genuine(check)))
    assert r.response_code == "1202" and r.data["reference"] == "12345" and not r.local


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"command":"verify-otp","data":{}}', "no response_code"),
    # the attack: a bare success
    (b'{"response_code":"0000"}', "answers another command"),
    (frame({"command": "send-sms", "response_code": "0000",
            "data": {"receiver": "08126666666", "reference": "12345"}}), "another command"),
    (frame({"command": "verify-otp", "response_code": "0000",
            "data": {"receiver": "08126666666"}}), "data.reference: missing"),
    (frame({"command": "verify-otp", "response_code": "0000",
            "data": {"receiver": "08126666666", "reference": "12346"}}),
     "data.reference: not the request's"),
    (frame({"command": "verify-otp", "response_code": "0000",
            "data": {"receiver": "08126666667", "reference": "12345"}}),
     "data.receiver: not the request's"),
    (frame({"command": "verify-otp", "response_code": "0000",
            "data": {"receiver": "08126666666", "reference": 12345}}),
     "data.reference: not the request's"),  # the daemon echoes text, never a number
    (frame({"command": "verify-otp", "response_code": "0000", "data": "x"}),
     "data.receiver: missing"),
])
def test_without_a_key_mismatches_and_junk_are_refused(raw: bytes, reason: str) -> None:
    check = ReplyCheck.for_request(body())
    with pytest.raises(UnacceptableReply, match=reason) as info:
        check(raw)
    assert "0000" not in str(info.value) and "08126666666" not in str(info.value)


def test_with_a_key_only_a_reply_signed_and_bound_to_this_request_is_taken() -> None:
    sent = body(key=KEY)
    check = ReplyCheck.for_request(sent, KEY)
    signature = json.loads(sent)["signature"]
    assert check.request_signature == signature and KEY not in repr(check)
    assert check(frame(sign_reply(genuine(check), signature, KEY))).response_code == "1202"
    other = json.loads(body(key=KEY))["signature"]  # the same command sent again
    forged = [
        (genuine(check, "0000"), "signature: missing"),  # matching fields, unsigned
        ({**genuine(check, "0000"), "signature": "0" * 64, "in_reply_to": signature},
         "does not match"),
        (sign_reply(genuine(check, "0000"), signature, "the-attackers-key"), "does not match"),
        (sign_reply(genuine(check, "0000"), other, KEY), "another command"),  # a replayed reply
        (sign_reply(genuine(check, "0000"), "", KEY), "another command"),
    ]
    for obj, reason in forged:
        with pytest.raises(UnacceptableReply, match=reason):
            check(frame(obj))
    # A signed reply with another command's fields is refused before the signature.
    with pytest.raises(UnacceptableReply, match=r"data\.reference"):
        check(frame(sign_reply(genuine(check, reference="9"), signature, KEY)))


def test_check_needs_a_signed_command_when_a_key_is_set() -> None:
    with pytest.raises(ValueError, match="not signed"):
        ReplyCheck.for_request(body(), KEY)
    with pytest.raises(ValueError, match="would answer"):
        ReplyCheck.for_request(b"{}")


# -- the wait for the first acceptable frame ------------------------------------


class _Queued(Inbox):
    def __init__(self, topic: str, frames: list[bytes]) -> None:
        super().__init__(topic)
        self.frames = Frames()
        for f in frames:
            self.frames.put(f)

    async def receive(self) -> bytes:
        return await self.frames.get()


class Scripted(Transport):
    """Every request's reply topic already holds ``frames``."""

    method = "scripted"

    def __init__(self, frames: list[bytes]) -> None:
        super().__init__(1.0)
        self.frames = frames
        self.inbox: _Queued | None = None

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Inbox]:
        self.inbox = _Queued(topic, self.frames)
        yield self.inbox

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_unacceptable_frames_are_skipped_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    check = ReplyCheck.for_request(body())
    junk = [b'{"response_code":"0000"}', b"not json", frame(genuine(check, "0000", x=1))[:-3]]
    t = Scripted([*junk, frame(genuine(check)), frame(genuine(check, "0000"))])
    with caplog.at_level(logging.DEBUG, logger="otpd.client"):
        r = await t.request(body(), "otp-reply-1", 5.0, "verify-otp", accept=check)
    assert r is not None and r.response_code == "1202"  # the first acceptable one
    skipped = [rec for rec in caplog.records if "not the answer" in rec.getMessage()]
    assert [rec.levelno for rec in skipped] == [logging.WARNING] + [logging.DEBUG] * 2
    assert all("0000" not in rec.getMessage() for rec in skipped)


async def test_only_unacceptable_frames_end_in_a_reply_timeout_that_says_so() -> None:
    check = ReplyCheck.for_request(body())
    t = Scripted([b'{"response_code":"0000"}', b"[]"])
    with pytest.raises(ReplyTimeout, match=r"2 message\(s\) on it were ignored.*not a JSON"):
        await t.request(body(), "otp-reply-1", 0.2, "verify-otp", accept=check)


async def test_without_accept_the_first_frame_is_returned_raw() -> None:
    t = Scripted([b"anything", b"more"])
    assert await t.request(b"{}", "otp-reply-1", 1.0) == b"anything"


async def test_frames_keep_order_then_fail_and_drop_a_flood() -> None:
    frames = Frames(limit=2)
    waiter = asyncio.ensure_future(frames.get())
    await asyncio.sleep(0)  # let it wait: put() must wake it
    frames.put(b"1")
    assert await waiter == b"1"
    frames.put(b"2")
    frames.put(b"3")
    frames.put(b"4")  # beyond the limit: dropped
    frames.fail(TransportError("lost"))
    frames.put(b"5")  # after the failure: nothing more
    assert [await frames.get(), await frames.get()] == [b"2", b"3"]
    assert frames.dropped == 1
    with pytest.raises(TransportError, match="lost"):
        await frames.get()
