"""Every command end to end, per broker, through a running daemon that started its
own consumer from its configuration: the application publishes on the real
broker, SMS reach the modem simulator over a pseudo-terminal, mail reaches
aiosmtpd, and replies come back on the ``callback_topic``."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.brokers import command, receiver, unique
from tests.support.daemon import phone_number
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer, body_text, otp_in
from tests.support.services import MQTT_HOST, MQTT_PORT, require_tcp
from tests.support.waiting import wait_until
from tests.transports.links import (
    AmqpLink,
    Link,
    MqttLink,
    RedisPubsubLink,
    RedisStreamLink,
    WsLink,
    running_node,
)

pytestmark = pytest.mark.services

LINKS: dict[str, tuple[Callable[[Path], Link], tuple[str, int] | None]] = {
    "amqp": (lambda _users: AmqpLink(), ("127.0.0.1", 5672)),
    "redis-pubsub": (lambda _users: RedisPubsubLink(), ("127.0.0.1", 6379)),
    "redis-stream": (lambda _users: RedisStreamLink(), ("127.0.0.1", 6379)),
    "mqtt": (lambda _users: MqttLink(), (MQTT_HOST, MQTT_PORT)),
    "ws": (WsLink, None),  # an ``otpd broker`` started by the link
}


@pytest.fixture(params=list(LINKS))
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    service = LINKS[name][1]
    if service is not None:
        require_tcp(name, *service)
    return name


@pytest.fixture
async def node(kind: str, users: Path, tmp_path: Path, smtp: SmtpServer,
               session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    link = LINKS[kind][0](users)
    async with running_node(tmp_path, link, smtp, session) as started:
        yield started


def sms_code(text: str) -> str:
    match = re.search(r"\b(\d{6})\b", text)
    assert match, "no code in the SMS"
    return match.group(1)


async def test_sms_commands_and_otp_verified_through_the_callback_topic(node: Gateway) -> None:
    link = node.link
    local, number = phone_number()
    await link.publish(command("send-sms", {"id": 1, "receiver": local,
                                            "message": "Pesanan Anda dikirim"}))
    assert (await node.sms(number)).text == "Pesanan Anda dikirim"

    local, number = phone_number()
    await link.publish(command("send-message", {"id": 2, "receiver": local, "subject": "",
                                                "message": "send-message to a number"}))
    assert (await node.sms(number)).text == "send-message to a number"

    local, number = phone_number()
    ref = unique("ref")
    params = {"param1": "100000", "param2": 42}
    reply = await link.ask("request-otp", {"receiver": local, "reference": ref,
                                           "message": "Kode OTP %s", **params})
    # A reply is wanted, so it carries the send result (not 1111).
    assert reply["command"] == "request-otp" and reply["response_code"] == "0000", reply
    assert reply["data"]["reference"] == ref and reply["data"]["via"] == "sim1"
    sms = await node.sms(number)
    code = sms_code(sms.text)
    assert sms.text == f"Kode OTP {code}"

    verify = {"receiver": local, "reference": ref, **params}
    wrong = "000000" if code != "000000" else "111111"
    assert (await link.ask("verify-otp", {**verify, "otp": wrong}))["response_code"] == "1202"
    assert (await link.ask("verify-otp", {**verify, "otp": code, "param2": 43})
            )["response_code"] == "1202"  # bound to the params
    ok = await link.ask("verify-otp", {**verify, "otp": code})
    assert ok["command"] == "verify-otp" and ok["response_code"] == "0000"
    assert ok["data"]["reference"] == ref
    # Single use.
    assert (await link.ask("verify-otp", {**verify, "otp": code}))["response_code"] == "1202"
    assert len(node.sim.sent) == 3
    assert node.consumer.status()["received"] == 7


async def test_email_commands_and_otp_by_email(node: Gateway) -> None:
    link = node.link
    to = receiver()
    await link.publish(command("send-email", {"id": "e1", "receiver": to, "subject": "Invoice",
                                              "message": "Your invoice is ready"}))
    mail = await node.mail(to)
    assert mail["Subject"] == "Invoice" and "Your invoice is ready" in body_text(mail)

    to2 = receiver()
    await link.publish(command("send-mail", {"id": "e2", "receiver": to2, "subject": "Alias",
                                             "message": "send-mail works too"}))
    mail = await node.mail(to2)
    assert mail["Subject"] == "Alias" and "send-mail works too" in body_text(mail)

    to3 = receiver()
    ref = unique("ref")
    await link.publish(command("request-otp", {"receiver": to3, "reference": ref,
                                               "message": "Your code is %s"}))
    code = otp_in(await node.mail(to3))
    reply = await link.ask("verify-otp", {"receiver": to3, "reference": ref, "otp": code})
    assert reply["response_code"] == "0000" and reply["data"]["receiver"] == to3
    assert not node.sim.sent


async def test_block_and_unblock_msisdn(node: Gateway) -> None:
    link = node.link
    local, number = phone_number()
    reply = await link.ask("block-msisdn", {"receiver": local})
    assert reply["command"] == "block-msisdn" and reply["response_code"] == "0000"
    refused = await link.ask("send-sms", {"id": 7, "receiver": number, "message": "blocked"})
    assert refused["response_code"] == "1400"
    refused = await link.ask("request-otp", {"receiver": local, "reference": unique("ref"),
                                             "message": "%s"})
    assert refused["response_code"] == "1400"

    reply = await link.ask("unblock-msisdn", {"receiver": number})
    assert reply["command"] == "unblock-msisdn" and reply["response_code"] == "0000"
    await link.publish(command("send-sms", {"id": 8, "receiver": local, "message": "free"}))
    assert (await node.sms(number)).text == "free"
    # Nothing of the blocked period went out, then or later.
    assert [m.text for m in node.sms_to(number)] == ["free"]


async def test_poison_messages_are_dropped_and_the_topic_keeps_flowing(node: Gateway) -> None:
    link = node.link
    await link.publish(b"\xff\xfe not json")
    await link.publish(b"[1, 2]")
    await link.publish(b'{"command": "send-sms", "data": "' + b"x" * 10_000 + b'"}')
    callback = unique("cb")
    unknown = await link.request(json.dumps({"command": "set-gpio-value", "data": {},
                                             "callback_topic": callback}).encode(), callback)
    assert unknown["response_code"] == "1301"
    invalid = await link.ask("request-otp", {"receiver": "08121111", "reference": "r"})
    assert invalid["response_code"] == "1300" and "data.message" in invalid["message"]

    local, number = phone_number()
    await link.publish(command("send-sms", {"receiver": local, "message": "still flowing"}))
    assert (await node.sms(number)).text == "still flowing"
    status = node.consumer.status()
    assert status["connected"] and status["received"] == 6 and status["errors"] == 5
    await wait_until(lambda: node.run.daemon.engine and not node.run.daemon.engine
                     .pending_count(), 5, "outbox drained")
    await node.stop()
    # Every message was acknowledged: nothing is waiting to be redelivered.
    assert await link.leftovers() == 0
