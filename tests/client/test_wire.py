"""What the library puts on the wire, with a recording transport (no services):
OTP-Publisher's envelopes, which the daemon's own parser accepts; reply topics
only when an answer is awaited; local refusals publish nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from otpd.client import AsyncOtpClient, OtpResponse, TransportError, parse_client_config
from otpd.client.publishers import Inbox, Transport
from otpd.wire.protocol import parse_request
from otpd.wire.signing import sign_reply


class _Ready(Inbox):
    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()

    async def receive(self) -> bytes:
        return await self.frames.get()


class Recorder(Transport):
    """Keeps what is published; answers requests that carry a reply topic as the
    daemon would (command as sent, receiver/reference/id echoed)."""

    method = "recorder"

    def __init__(self, in_envelope: bool = True, signing_key: str = "") -> None:
        super().__init__(1.0)
        self.callback_in_envelope = in_envelope  # type: ignore[misc]
        self.signing_key = signing_key
        self.sent: list[tuple[dict[str, Any], str | None]] = []

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Inbox]:
        yield _Ready(topic)

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        env = parse_request(body)  # exactly what the daemon parses
        self.sent.append((json.loads(body), inbox.topic if inbox else None))
        if isinstance(inbox, _Ready):
            echo = {k: getattr(env.command, k) for k in ("receiver", "reference", "id")
                    if getattr(env.command, k, None)}
            answer: dict[str, Any] = {"command": env.name, "response_code": "0000",
                                      "data": echo}
            if self.signing_key:
                answer = sign_reply(answer, env.raw.get("signature", ""), self.signing_key)
            inbox.frames.put_nowait(json.dumps(answer).encode())

    async def close(self) -> None:
        return None


def client(transport: Transport, toml: str = "") -> AsyncOtpClient:
    return AsyncOtpClient(parse_client_config(toml), transport=transport)


async def test_envelopes_are_otp_publishers() -> None:
    t = Recorder()
    c = client(t)
    before = int(time.time())
    r = await c.create_otp("08126666666", "12345678901234567890", 60, "Your OTP is %s",
                           ["100000", 1234567890], subject="Kode", id=7)
    assert r.response_code == "1111" and r.local and r.ok and r.data["reference"]
    await c.verify_otp("08126666666", 123456, "12345678901234567890", ["100000", "1234567890"])
    await c.send_sms("08126666666", "Your OTP is 1234", 60, id=123456)
    await c.send_email("someone@domain.tld", "Your OTP Code", "Your OTP is 1234", 60)
    await c.send_message("someone@domain.tld", "hi", 60)
    await c.block_msisdn("08126666666")
    await c.unblock_msisdn("08126666666")
    await c.get_modem_list()
    (otp, t1), (verify, t2), (sms, t3), (mail, _), (msg, _), (block, _), (unblock, _), \
        (modems, t8) = t.sent
    for env, _topic in t.sent:
        assert before <= env["data"]["date_time"] <= int(time.time())
        assert "signature" not in env
    assert otp["command"] == "request-otp" and t1 is None and "callback_topic" not in otp
    assert otp["data"] == {
        "date_time": otp["data"]["date_time"], "expiration": otp["data"]["date_time"] + 60,
        "receiver": "08126666666", "message": "Your OTP is %s",
        "reference": "12345678901234567890", "param1": "100000", "param2": "1234567890",
        "param3": "", "param4": "", "subject": "Kode", "id": 7}
    assert verify["command"] == "verify-otp" and verify["data"]["otp"] == 123456
    assert t2 is not None and t2.startswith("otp-reply-") and verify["callback_topic"] == t2
    assert sms["data"]["id"] == 123456 and t3 is None
    assert sms["data"]["expiration"] == sms["data"]["date_time"] + 60
    assert mail["command"] == "send-email" and mail["data"]["subject"] == "Your OTP Code"
    assert len(mail["data"]["id"]) == 32  # a random id when none is given
    assert msg["command"] == "send-message" and "subject" not in msg["data"]
    assert block["command"] == "block-msisdn" and unblock["command"] == "unblock-msisdn"
    assert block["data"]["receiver"] == "08126666666"
    assert modems["command"] == "get-modem-list" and t8 is not None and t8 != t2


async def test_wait_result_and_reply_addressing() -> None:
    t = Recorder()
    c = client(t, "[client]\nwait_result = true\ncallback_delay = 50\n")
    r = await c.send_sms("0812", "x", 60)
    assert r.response_code == "0000" and not r.local
    env, topic = t.sent[0]
    assert env["callback_topic"] == topic and env["callback_delay"] == 50
    r = await c.send_sms("0812", "x", 60, wait_result=False)
    assert r.pending and "callback_topic" not in t.sent[1][0]
    # A transport with its own reply address (AMQP reply_to) gets no callback_topic.
    amqp_like = Recorder(in_envelope=False)
    await client(amqp_like).verify_otp("0812", "1", "r")
    env, topic = amqp_like.sent[0]
    assert topic is not None and "callback_topic" not in env


async def test_signing_covers_the_callback_topic() -> None:
    from otpd.wire.signing import verify

    t = Recorder(signing_key="k-0123456789abcdef")
    c = client(t, '[client]\nsigning_key = "k-0123456789abcdef"\n')
    assert (await c.verify_otp("0812", "1", "r")).success  # the signed answer is taken
    env, _topic = t.sent[0]
    verify(env, "k-0123456789abcdef")
    env["callback_topic"] = "someone-else"
    with pytest.raises(Exception, match="does not match"):
        verify(env, "k-0123456789abcdef")


async def test_refused_locally_without_publishing() -> None:
    t = Recorder()
    c = client(t)
    for r in [
        await c.create_otp("0812", "r", 60, "no code here"),
        await c.create_otp("0812", "r", 60, "two %s %s"),
        await c.create_otp("0812", "", 60, "%s"),
        await c.send_sms("", "x", 60),
        await c.send_sms("0812", "x" * 5000, 60),
        await c.verify_otp("0812", "", "r"),
    ]:
        assert r.response_code == "1300" and r.local and not r.ok
        assert r.message and r.message.startswith("data.")
    assert not t.sent
    with pytest.raises(ValueError, match="lifetime"):
        await c.send_sms("0812", "x", 0)
    with pytest.raises(ValueError, match="at most 4"):
        await c.create_otp("0812", "r", 60, "%s", ["1", "2", "3", "4", "5"])
    with pytest.raises(TypeError):
        await c.verify_otp("0812", "1", "r", "1234")


def test_response_parsing() -> None:
    r = OtpResponse.from_wire(b'{"command":"send-sms","response_code":"1101","data":{},'
                              b'"message":"no modem"}', "send-sms")
    assert r.code is not None and r.code.value == "1101" and r.message == "no modem"
    assert not r.ok and not r.success and r.to_json()["message"] == "no modem"
    # OTP-Pi / OTP-Publisher spellings.
    r = OtpResponse.from_wire('{"response-code":"1201","error_message":"Duplicated"}', "x")
    assert r.response_code == "1201" and r.message == "Duplicated" and r.command == "x"
    assert OtpResponse.from_wire('{"response_code":"9999"}', "x").code is None
    for bad in (b"", b"[]", b"{}", b"not json"):
        with pytest.raises(TransportError):
            OtpResponse.from_wire(bad, "x")
