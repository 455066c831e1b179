"""WebSocket consumer against ``otpd broker`` (BrokerServer) on localhost."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from otpd.aio import within
from otpd.broker import BrokerConfig, BrokerServer
from otpd.transports.ws import WsConsumer
from otpd.wire.brokers import topic_url
from tests.support.brokers import APP_USER, OTPD_PASSWORD, OTPD_USER, command, receiver, unique
from tests.support.gateway import Gateway
from tests.support.mail import otp_in
from tests.support.processes import self_signed
from tests.support.waiting import wait_until


def config(port: int, topic: str, extra: str = "") -> str:
    return f"""
[ws]
url = "ws://127.0.0.1:{port}/ws?topic=ignored"
username = "{OTPD_USER}"
password = "{OTPD_PASSWORD}"
topic = "{topic}"
reconnect_min = 0.1
reconnect_max = 0.5
{extra}
"""


async def start(gw: Gateway, port: int, topic: str, extra: str = "") -> WsConsumer:
    return await gw.start_one(config(port, topic, extra), WsConsumer)


def php_connect(port: int, topic: str) -> connect:
    """OTP-Publisher's WSClient sends ``Basic user:user`` (not base64)."""
    return connect(f"ws://127.0.0.1:{port}/ws/?topic={topic}",
                   additional_headers={"Authorization": f"Basic {APP_USER}:{APP_USER}"},
                   open_timeout=5)


async def php_publish(port: int, topic: str, body: bytes) -> None:
    async with php_connect(port, topic) as ws:
        await ws.send(body.decode())


async def php_request(port: int, topic: str, body: bytes, callback: str) -> dict[str, Any]:
    """Publish, then open the callback topic and read one frame within 10 s."""
    await php_publish(port, topic, body)
    async with php_connect(port, callback) as ws:
        frame = await within(10, ws.recv())
    result: dict[str, Any] = json.loads(frame)
    return result


def test_topic_url_replaces_the_topic_parameter() -> None:
    assert topic_url("wss://h:1/ws/?topic=a&x=1", "b c") == "wss://h:1/ws/?x=1&topic=b+c"
    assert topic_url("ws://h", "sms") == "ws://h/?topic=sms"


async def test_php_client_request_and_verify_with_reply(
        gateway: Gateway, broker: BrokerServer) -> None:
    topic = unique("ws")
    await start(gateway, broker.port, topic)
    to = receiver()
    ref = unique("ref")
    await php_publish(broker.port, topic, command(
        "request-otp", {"receiver": to, "reference": ref, "message": "Your code %s"}))
    code = otp_in(await gateway.mail(to))
    cb = unique("cb")
    reply = await php_request(broker.port, topic, command(
        "verify-otp", {"receiver": to, "reference": ref, "otp": code},
        callback_topic=cb, callback_delay="50"), cb)
    assert reply["command"] == "verify-otp" and reply["response_code"] == "0000"


async def test_malformed_and_oversize_dropped_then_broker_restart_reconnects(
        gateway: Gateway, broker: BrokerServer, users: Path) -> None:
    topic = unique("ws")
    consumer = await start(gateway, broker.port, topic, "max_message = 2048")
    await php_publish(broker.port, topic, b"<html>")
    await php_publish(broker.port, topic, b'{"command":"echo","data":"' + b"y" * 4000 + b'"}')
    cb = unique("cb")
    reply = await php_request(broker.port, topic, json.dumps(
        {"command": "nope", "callback_topic": cb}).encode(), cb)
    assert reply["response_code"] == "1301"
    assert consumer.connected and consumer.status()["errors"] == 3

    port = broker.port
    await broker.stop()
    await wait_until(lambda: not consumer.connected, 10, "disconnect noticed")
    restarted = BrokerServer(BrokerConfig(htpasswd=users, port=port))
    await restarted.start()
    try:
        await wait_until(lambda: consumer.connected, 10, "reconnected")
        to = receiver()
        await php_publish(port, topic, command(
            "send-email", {"receiver": to, "subject": "S", "message": "after restart"}))
        await gateway.mail(to)
    finally:
        await gateway.stop_consumer(consumer)
        await restarted.stop()


async def test_wrong_password_keeps_retrying_without_crashing(
        gateway: Gateway, broker: BrokerServer) -> None:
    (consumer,) = await gateway.start(config(broker.port, unique("ws")).replace(
        OTPD_PASSWORD, "wrong"))
    await wait_until(lambda: consumer.status()["errors"] >= 2, 10, "retries")
    status = consumer.status()
    assert not status["connected"] and "401" in status["last_error"]
    assert "wrong" not in status["last_error"]
    assert base64.b64encode(b"otpd:wrong").decode() not in status["last_error"]


async def test_wss_with_a_private_ca(gateway: Gateway, users: Path, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = BrokerServer(BrokerConfig(htpasswd=users, port=0, tls_cert=cert, tls_key=key))
    await server.start()
    try:
        topic = unique("wss")
        text = config(server.port, topic, f'tls_ca = "{cert}"').replace("ws://", "wss://")
        (consumer,) = await gateway.start(text)
        await wait_until(lambda: consumer.connected, 10, "wss consumer connected")
        # Without the CA the certificate is refused (no silent downgrade).
        (untrusted,) = await gateway.start(
            config(server.port, unique("wss")).replace("ws://", "wss://"))
        await wait_until(lambda: untrusted.status()["errors"] >= 1, 10, "TLS refusal")
        assert not untrusted.connected and "CERTIFICATE" in untrusted.status()["last_error"]
        await gateway.stop_consumer(untrusted)
        to = receiver()
        async with connect(f"wss://127.0.0.1:{server.port}/ws?topic={topic}",
                           additional_headers={"Authorization": f"Basic {APP_USER}:{APP_USER}"},
                           ssl=ssl.create_default_context(cafile=str(cert))) as ws:
            await ws.send(command("send-email", {"receiver": to, "subject": "S",
                                                 "message": "over tls"}).decode())
        await gateway.mail(to)
        await gateway.stop_consumer(consumer)
    finally:
        await server.stop()
