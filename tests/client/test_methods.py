"""Every operation over every method, against a running daemon (simulated modem,
real SMTP sink) that consumes that method on a unique topic."""

from __future__ import annotations

import asyncio
import time

import pytest

from otpd.client import OtpResponse
from tests.support.brokers import receiver
from tests.support.client_config import METHODS, phone
from tests.support.gateway import MakeGateway
from tests.support.mail import body_text, code_in

PARAMS = ["100000", "1234567890", "987654", "674527846556468254"]


def digits(local: str) -> str:
    """The E.164 tail the simulator sees for a local 08... number."""
    return local[1:]


def assert_code(r: OtpResponse, code: str) -> None:
    assert r.response_code == code, r


@pytest.mark.parametrize("method", METHODS)
async def test_every_operation(method: str, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(method)
    broker = method != "rest"
    client = gw.client(client="wait_result = true")
    fire = gw.client()  # wait_result = false (the default)

    # get-modem-list always waits for the daemon's answer.
    r = await client.get_modem_list()
    assert_code(r, "0000")
    assert "sim1" in r.data["modem_list"] and not r.local
    # Many requests at once on one client: each gets its own answer.
    answers = await asyncio.gather(*(client.verify_otp(phone(), "1", f"none-{i}")
                                     for i in range(8)))
    assert [a.data["reference"] for a in answers] == [f"none-{i}" for i in range(8)]
    assert {a.response_code for a in answers} == {"1202"}

    # request-otp by SMS, waiting for the result; then verify.
    number = phone()
    r = await client.create_otp(number, "ref-1", 60, "Kode OTP Anda %s", PARAMS,
                                subject="ignored for SMS", id=int(time.time()))
    assert_code(r, "0000")
    assert r.data["reference"] == "ref-1" and r.data["via"] == "sim1"
    text = await gw.sms_text(digits(number))
    code = code_in(text)
    assert text == f"Kode OTP Anda {code}"
    wrong = "000000" if code != "000000" else "111111"
    assert_code(await client.verify_otp(number, wrong, "ref-1", PARAMS), "1202")
    assert_code(await client.verify_otp(number, code, "ref-1", PARAMS[:3]), "1202")
    r = await client.verify_otp("+62" + number[1:], code, "ref-1", PARAMS)
    assert_code(r, "0000")
    assert r.success and r.ok and r.data["reference"] == "ref-1"
    assert_code(await client.verify_otp(number, code, "ref-1", PARAMS), "1202")
    # The same reference again: duplicated.
    assert_code(await client.create_otp(number, "ref-1", 60, "Again %s", PARAMS), "1201")

    # request-otp fire-and-forget: 1111 "published" at once, the SMS still arrives.
    r = await fire.create_otp(number, "ref-2", 60, "Code %s", PARAMS)
    if broker:
        assert_code(r, "1111")
        assert r.local and r.ok and not r.success and r.pending
    else:
        assert_code(r, "0000")  # REST always answers with the result
    code = code_in(await gw.sms_text(digits(number), count=2))
    assert_code(await fire.verify_otp(number, code, "ref-2", PARAMS), "0000")

    # send-sms, send-email, send-message (email with the daemon's default subject).
    r = await client.send_sms(number, "Saldo Anda Rp 100.000", 60, id="sms-1")
    assert_code(r, "0000")
    assert await gw.sms_text(digits(number), count=3) == "Saldo Anda Rp 100.000"
    address = receiver()
    r = await client.send_email(address, "Kode OTP Anda", "Your OTP is 4321", 60)
    assert_code(r, "0000")
    mail = await gw.mail(address)
    assert mail["Subject"] == "Kode OTP Anda" and "Your OTP is 4321" in body_text(mail)
    address2 = receiver()
    assert_code(await client.send_message(address2, "Hello by mail", 60), "0000")
    mail = await gw.mail(address2)
    assert mail["Subject"] == "Your OTP code" and "Hello by mail" in body_text(mail)
    assert_code(await client.send_message(number, "Hello by SMS", 60, subject="x"), "0000")
    assert await gw.sms_text(digits(number), count=4) == "Hello by SMS"
    # The same id for the same receiver is sent once.
    assert_code(await client.send_sms(number, "Saldo Anda Rp 100.000", 60, id="sms-1"),
                "1201")

    # block / unblock: a blocked receiver gets nothing.
    blocked = phone()
    assert_code(await client.block_msisdn(blocked), "0000")
    r = await client.send_sms(blocked, "never", 60)
    assert_code(r, "1400")
    assert not r.ok
    assert_code(await client.create_otp(blocked, "ref-3", 60, "Code %s"), "1400")
    r = await fire.unblock_msisdn(blocked)
    assert_code(r, "1111" if broker else "0000")
    # Published is not executed yet: give the daemon the time to run it.
    for _ in range(50):
        r = await client.send_sms(blocked, "now it arrives", 60)
        if r.response_code != "1400":
            break
        await asyncio.sleep(0.05)
    assert_code(r, "0000")
    assert await gw.sms_text(digits(blocked)) == "now it arrives"

    # send-sms fire-and-forget.
    r = await fire.send_sms(number, "fire and forget", 60)
    assert_code(r, "1111" if broker else "0000")
    assert await gw.sms_text(digits(number), count=5) == "fire and forget"

    # Refused here without being published: the daemon would answer 1300.
    r = await client.create_otp(number, "ref-4", 60, "no placeholder")
    assert_code(r, "1300")
    assert r.local and "%s" in (r.message or "")
    assert len([m for m in gw.sim.sent if m.receiver.endswith(digits(number))]) == 5
