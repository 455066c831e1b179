"""MQTT consumer against the real Mosquitto on localhost."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from otpd.transports.mqtt import MqttConsumer
from tests.transports.conftest import Gateway, command, otp_in, receiver, unique, wait_until

pytestmark = pytest.mark.services


class Peer:
    """A test-side paho client (the app / OTP-Publisher), received messages queued."""

    def __init__(self, host: str, port: int, *,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv311,
                 client_id: str | None = None, clean: bool = True) -> None:
        self.protocol = protocol
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        kwargs: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or unique("peer"), protocol=protocol,
                                  reconnect_on_failure=False, **kwargs)
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.inbox.put(m)
        self.host, self.port = host, port

    def open(self) -> Peer:
        self.client.connect(self.host, self.port, 30)
        self.client.loop_start()
        assert self.connected.wait(5), "peer did not connect"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                properties: Properties | None = None) -> None:
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        info.wait_for_publish(5)

    async def next(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        return await asyncio.to_thread(self.inbox.get, True, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def forget_session(host: str, port: int, client_id: str) -> None:
    """Connect once with a clean session so Mosquitto drops the test's persistent one."""
    peer = Peer(host, port, client_id=client_id, clean=True)
    try:
        peer.open()
    finally:
        peer.close()


@pytest.fixture
def peers(mosquitto: tuple[str, int]) -> Iterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        peer.close()


@pytest.fixture
async def mqtt_ids(mosquitto: tuple[str, int], gateway: Gateway) -> AsyncIterator[list[str]]:
    """Client ids otpd used; their sessions are removed after the test."""
    ids: list[str] = []
    yield ids
    for consumer in list(gateway.consumers):
        await gateway.stop(consumer)
    for client_id in ids:
        await asyncio.to_thread(forget_session, *mosquitto, client_id)


async def open_peer(peers: list[Peer], mosquitto: tuple[str, int], **kwargs: Any) -> Peer:
    peer = Peer(*mosquitto, **kwargs)
    await asyncio.to_thread(peer.open)
    peers.append(peer)
    return peer


async def start(gw: Gateway, ids: list[str], topic: str, extra: str = "",
                client_id: str | None = None) -> MqttConsumer:
    client_id = client_id or unique("otpd")
    if client_id not in ids:
        ids.append(client_id)
    (consumer,) = await gw.start(f"""
[mqtt]
host = "127.0.0.1"
port = 1883
topic = "{topic}"
client_id = "{client_id}"
reconnect_min = 0.1
reconnect_max = 0.5
retry_delay = 0.1
{extra}
""")
    assert isinstance(consumer, MqttConsumer)
    await wait_until(lambda: consumer.connected, 10, "MQTT consumer connected")
    return consumer


async def test_php_publisher_qos0_mqtt31_request_and_verify_with_reply(
        gateway: Gateway, mqtt_ids: list[str], peers: list[Peer],
        mosquitto: tuple[str, int]) -> None:
    topic = unique("mqtt")
    await start(gateway, mqtt_ids, topic)
    php = await open_peer(peers, mosquitto, protocol=mqtt.MQTTv31)
    to = receiver()
    ref = unique("ref")
    await asyncio.to_thread(php.publish, topic, command(
        "request-otp", {"receiver": to, "reference": ref, "message": "OTP %s",
                        "param1": 5, "param2": "b"}))
    code = otp_in(await gateway.mail(to))
    cb = unique("cb")
    await asyncio.to_thread(php.subscribe, cb)  # the PHP client subscribes first
    await asyncio.to_thread(php.publish, topic, command(
        "verify-otp", {"receiver": to, "reference": ref, "otp": code, "param1": "5",
                       "param2": "b"}, callback_topic=cb, callback_delay="50"))
    reply = json.loads((await php.next()).payload)
    assert reply["command"] == "verify-otp" and reply["response_code"] == "0000"


async def test_persistent_session_keeps_messages_published_while_stopped(
        gateway: Gateway, mqtt_ids: list[str], peers: list[Peer],
        mosquitto: tuple[str, int]) -> None:
    topic = unique("mqtt")
    client_id = unique("otpd")
    consumer = await start(gateway, mqtt_ids, topic, client_id=client_id)
    await gateway.stop(consumer)
    app = await open_peer(peers, mosquitto)
    to = receiver()
    await asyncio.to_thread(app.publish, topic, command(
        "send-email", {"id": 5, "receiver": to, "subject": "S", "message": "queued"}), 1)
    consumer = await start(gateway, mqtt_ids, topic, client_id=client_id)
    await gateway.mail(to)
    assert consumer.status()["received"] == 1


async def test_kicked_by_same_client_id_reconnects_and_keeps_consuming(
        gateway: Gateway, mqtt_ids: list[str], peers: list[Peer],
        mosquitto: tuple[str, int]) -> None:
    topic = unique("mqtt")
    client_id = unique("otpd")
    consumer = await start(gateway, mqtt_ids, topic, client_id=client_id)
    kicker = Peer(*mosquitto, client_id=client_id, clean=False)
    await asyncio.to_thread(kicker.open)
    peers.append(kicker)
    await wait_until(lambda: consumer.status()["errors"] >= 1, 10, "kick noticed")
    await wait_until(lambda: consumer.connected, 10, "reconnected")
    app = await open_peer(peers, mosquitto)
    to = receiver()
    await asyncio.to_thread(app.publish, topic, command(
        "send-email", {"receiver": to, "subject": "S", "message": "after kick"}), 1)
    await gateway.mail(to)


async def test_not_acked_until_stored_redelivered_on_reconnect(
        gateway: Gateway, mqtt_ids: list[str], peers: list[Peer],
        mosquitto: tuple[str, int]) -> None:
    topic = unique("mqtt")
    await start(gateway, mqtt_ids, topic)
    gateway.fail_store(1)
    app = await open_peer(peers, mosquitto)
    to = receiver()
    await asyncio.to_thread(app.publish, topic, command(
        "send-email", {"id": "r1", "receiver": to, "subject": "S", "message": "redelivered"}), 1)
    await gateway.mail(to)
    assert gateway.insert_calls == 2
    await asyncio.sleep(0.3)
    assert len(gateway.mails_to(to)) == 1


async def test_mqtt5_response_topic_correlation_and_malformed(
        gateway: Gateway, mqtt_ids: list[str], peers: list[Peer],
        mosquitto: tuple[str, int]) -> None:
    topic = unique("mqtt")
    consumer = await start(gateway, mqtt_ids, topic, "protocol = 5")
    app = await open_peer(peers, mosquitto, protocol=mqtt.MQTTv5)
    responses = unique("resp")
    await asyncio.to_thread(app.subscribe, responses)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = responses
    props.CorrelationData = b"\x00corr"
    await asyncio.to_thread(app.publish, topic, b"\x00garbage", 1, props)
    await asyncio.to_thread(app.publish, topic, command("echo", {"hello": "pi"}), 1, props)
    first = await app.next()
    second = await app.next()
    replies = sorted([json.loads(first.payload), json.loads(second.payload)],
                     key=lambda r: r["response_code"])
    assert [r["response_code"] for r in replies] == ["0000", "1300"]
    assert replies[0]["data"]["hello"] == "pi"
    for reply in (first, second):
        assert getattr(reply.properties, "CorrelationData", None) == b"\x00corr"
    to = receiver()
    await asyncio.to_thread(app.publish, topic, command(
        "send-email", {"receiver": to, "subject": "S", "message": "after garbage"}), 1)
    await gateway.mail(to)
    assert consumer.status()["errors"] >= 1
