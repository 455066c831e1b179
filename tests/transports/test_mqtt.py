"""MQTT consumer against the real Mosquitto on localhost."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from otpd.transports.mqtt import MqttConsumer
from tests.support.brokers import BROKER_FAST, command, receiver, unique
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer, otp_in
from tests.support.mqtt_peer import Peer, forget_session
from tests.support.processes import Process, own_mosquitto, self_signed
from tests.support.services import MQTT_HOST, MQTT_PORT
from tests.support.waiting import wait_until
from tests.transports.links import MqttLink, start_node

pytestmark = pytest.mark.services


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
        await gateway.stop_consumer(consumer)
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
    return await gw.start_one(f"""
[mqtt]
host = "{MQTT_HOST}"
port = {MQTT_PORT}
topic = "{topic}"
client_id = "{client_id}"
{BROKER_FAST}{extra}
""", MqttConsumer)


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
    await gateway.stop_consumer(consumer)
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


async def test_session_lost_by_the_broker_is_reported(
        gateway: Gateway, mqtt_ids: list[str], mosquitto: tuple[str, int]) -> None:
    client_id = unique("otpd")
    consumer = await start(gateway, mqtt_ids, unique("mqtt"), client_id=client_id)
    assert consumer.status()["errors"] == 0
    # A clean-session login with otpd's id throws otpd out and drops its session,
    # as a broker restarted without persistence would.
    await asyncio.to_thread(forget_session, *mosquitto, client_id)
    await wait_until(lambda: consumer.status()["last_error"] == "the broker did not keep"
                     " the session", 10, "lost session reported")
    await wait_until(lambda: consumer.connected, 10, "reconnected")


# -- shared subscriptions: several otpd nodes ----------------------------------------


@pytest.fixture
async def nodes(tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession,
                mosquitto: tuple[str, int]) -> AsyncIterator[SharedNodes]:
    shared = SharedNodes(tmp_path, smtp, session, unique("shared"), unique("group"))
    yield shared
    await shared.close()


class SharedNodes:
    """otpd nodes, each its own daemon, store and client id, in one shared group."""

    def __init__(self, tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession,
                 topic: str, group: str) -> None:
        self.tmp_path, self.smtp, self.session = tmp_path, smtp, session
        self.topic, self.group = topic, group
        self.running: dict[str, Gateway] = {}
        self.links: dict[str, MqttLink] = {}
        self.client_ids: set[str] = set()

    async def start(self, name: str) -> Gateway:
        link = MqttLink(topic=self.topic, client_id=f"{self.topic}-{name}",
                        extra=f'shared_group = "{self.group}"')
        self.client_ids.add(link.client_id)
        self.links[name] = link
        await link.open()
        state = self.tmp_path / name
        state.mkdir(exist_ok=True)
        node = await start_node(state, link, self.smtp, self.session, modem=False)
        self.running[name] = node
        return node

    async def stop(self, name: str) -> None:
        node = self.running.pop(name)
        await node.stop()
        # Not link.close(), which would clear the node's session.
        await self.links[name].hang_up()

    async def close(self) -> None:
        for name in list(self.running):
            await self.stop(name)
        for client_id in self.client_ids:
            await asyncio.to_thread(forget_session, MQTT_HOST, MQTT_PORT, client_id)


def mail_counts(smtp: SmtpServer, address: str) -> Counter[str]:
    return Counter(str(m["Subject"]) for m in smtp.sink.messages
                   if address in str(m.get("To", "")))


async def publish_many(link: MqttLink, to: str, first: int, count: int) -> set[str]:
    """QoS 1 publishes, each acknowledged by the broker (PUBACK)."""
    subjects = set()
    for i in range(first, first + count):
        subjects.add(f"s{i}")
        await link.publish(command("send-email", {"id": i, "receiver": to, "subject": f"s{i}",
                                                  "message": "shared"}))
    return subjects


async def test_shared_group_nodes_receive_disjoint_sets(nodes: SharedNodes) -> None:
    a = await nodes.start("a")
    b = await nodes.start("b")
    assert isinstance(a.consumer, MqttConsumer)
    assert a.consumer.settings.subscription == f"$share/{nodes.group}/{nodes.topic}"
    to = receiver()
    sent = await publish_many(nodes.links["a"], to, 0, 30)
    await wait_until(lambda: set(mail_counts(nodes.smtp, to)) == sent, 10, "all mailed")
    await asyncio.sleep(0.3)
    # Separate stores: a message handed to both nodes would be mailed twice.
    assert set(mail_counts(nodes.smtp, to).values()) == {1}
    got_a, got_b = a.consumer.status()["received"], b.consumer.status()["received"]
    assert got_a + got_b == 30 and got_a > 0 and got_b > 0


async def test_shared_group_node_down_loses_nothing(nodes: SharedNodes) -> None:
    a = await nodes.start("a")
    await nodes.start("b")
    await nodes.stop("b")
    to = receiver()
    sent = await publish_many(nodes.links["a"], to, 0, 20)
    # Whatever the broker assigned to b's session waits for b (Mosquitto 2.0
    # keeps its round robin over offline members): all is there once b is back.
    b = await nodes.start("b")
    await wait_until(lambda: set(mail_counts(nodes.smtp, to)) == sent, 10, "all mailed")
    await asyncio.sleep(0.3)
    assert set(mail_counts(nodes.smtp, to).values()) == {1}
    assert a.consumer.status()["received"] + b.consumer.status()["received"] == 20


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[tuple[Process, Path]]:
    cert, key = self_signed(tmp_path)
    for process in own_mosquitto(tmp_path, f"certfile {cert}\nkeyfile {key}\n"):
        yield process, cert


def tls_publish(port: int, ca: Path, topic: str, bodies: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, reconnect_on_failure=False)
    client.tls_set(ca_certs=str(ca))
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        infos = [client.publish(topic, body, qos=1) for body in bodies]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def test_tls_with_a_private_ca_and_a_burst(
        gateway: Gateway, tls_mosquitto: tuple[Process, Path]) -> None:
    server, ca = tls_mosquitto
    topic = unique("mqtts")
    (consumer,) = await gateway.start(f"""
[mqtt]
host = "127.0.0.1"
port = {server.port}
tls_ca = "{ca}"
topic = "{topic}"
client_id = "{unique("otpd")}"
""")
    assert isinstance(consumer, MqttConsumer) and consumer.settings.tls
    await wait_until(lambda: consumer.connected, 10, "TLS consumer connected")
    to = receiver()
    # A burst, one of them large: TLS records are read out of the SSL buffer too.
    bodies = [command("send-email", {"id": i, "receiver": to, "subject": f"t{i}",
                                     "message": "burst"}, padding="x" * (30_000 if i == 7 else 1))
              for i in range(40)]
    await asyncio.to_thread(tls_publish, server.port, ca, topic, bodies)
    await wait_until(lambda: len(gateway.mails_to(to)) == 40, 15, "40 mails")
    assert {str(m["Subject"]) for m in gateway.mails_to(to)} == {f"t{i}" for i in range(40)}
    assert consumer.status()["received"] == 40 and consumer.connected
