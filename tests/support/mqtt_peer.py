"""A test-side paho client (an app as OTP-Publisher writes it: any protocol
version, QoS 0 or 1, MQTT 5 properties), and MQTT session housekeeping."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties

from tests.support.brokers import unique
from tests.support.services import MQTT_HOST, MQTT_PORT


class Peer:
    """A paho client whose received messages are queued."""

    def __init__(self, host: str = MQTT_HOST, port: int = MQTT_PORT, *,
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

    def open(self, timeout: float = 5.0) -> Peer:
        self.client.connect(self.host, self.port, 30)
        self.client.loop_start()
        assert self.connected.wait(timeout), "peer did not connect"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                properties: Properties | None = None) -> bool:
        """True once the broker acknowledged it (QoS 1: PUBACK) within 5 s."""
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        info.wait_for_publish(5)
        return info.is_published()

    async def next(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        return await asyncio.to_thread(self.inbox.get, True, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def forget_session(host: str, port: int, client_id: str) -> None:
    """Connect once with a clean session so the broker drops a persistent one
    (nothing happens if the broker is not there)."""
    peer = Peer(host, port, client_id=client_id, clean=True)
    try:
        peer.open()
    except (OSError, AssertionError):
        pass
    finally:
        peer.close()


def count_redelivered(host: str, port: int, client_id: str, settle: float = 0.5) -> int:
    """Resume ``client_id``'s persistent session and count what the broker sends
    (queued and unacknowledged messages), acknowledging nothing; then forget it."""
    peer = Peer(host, port, client_id=client_id, clean=False)
    peer.client.manual_ack_set(True)
    try:
        peer.open()
        seen = 0
        while True:
            try:
                peer.inbox.get(True, settle)
            except queue.Empty:
                return seen
            seen += 1
    finally:
        peer.close()
        forget_session(host, port, client_id)
