"""MQTT consumer (paho-mqtt 2.x), with a persistent session and ack after store.

* Fixed ``client_id`` and a persistent session (MQTT 3.1/3.1.1: clean session
  off; MQTT 5, ``protocol = 5``: clean start off with ``session_expiry``), and
  a QoS 1 subscription to ``topic``: the broker keeps QoS 1 messages while the
  Pi is offline. (Not QoS 2: its PUBREC, which paho sends on receipt, already
  releases the broker's copy, so a crash before storing would lose it.)
  OTP-Publisher publishes at QoS 0, and brokers do not queue QoS 0 messages
  for offline clients (Mosquitto's default), so those are delivered only while
  otpd is connected.
* ``manual_ack``: the PUBACK goes out once the command is stored. One the
  store could not take stays unacknowledged and, after ``retry_delay``, the
  connection is dropped and re-established so the broker redelivers it
  (MQTT redelivers unacknowledged messages only on reconnect).
* Replies are published at QoS 1 to ``callback_topic``; with MQTT 5 also to
  the request's response topic, with its correlation data.
* ``username``/``password``; TLS with ``tls = true`` (or ``tls_ca``).

paho runs its network loop in its own thread; every callback is handed to
the asyncio loop (``call_soon_threadsafe``), where all command handling runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from otpd.transports.consumer import Consumer, Inbound, tls_context
from otpd.transports.settings import MqttSettings

if TYPE_CHECKING:
    from otpd.service import Service

log = logging.getLogger("otpd.transports.mqtt")

HANDSHAKE_TIMEOUT = 15.0


def _properties(packet: int) -> Properties:
    return Properties(packet)  # type: ignore[no-untyped-call]


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class MqttConsumer(Consumer):
    def __init__(self, settings: MqttSettings, service: Service, default_wait: float,
                 name: str = "mqtt") -> None:
        super().__init__(name, settings.common, service, default_wait,
                         secrets=(settings.password,))
        self.settings = settings
        self._client: mqtt.Client | None = None
        self._lost: asyncio.Future[str] | None = None

    @property
    def v5(self) -> bool:
        return self.settings.protocol == 5

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if self.v5 else False,
            protocol={3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}[s.protocol],
            reconnect_on_failure=False,  # reconnecting (with jitter) is ours to do
            manual_ack=True,
        )
        if s.username:
            client.username_pw_set(s.username, s.password or None)
        if s.tls:
            client.tls_set_context(tls_context(s.common.tls_ca))
        client.max_queued_messages_set(1000)  # replies while reconnecting
        return client

    async def _session(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[tuple[ReasonCode, bool]] = loop.create_future()
        subscribed: asyncio.Future[list[ReasonCode]] = loop.create_future()
        lost: asyncio.Future[str] = loop.create_future()
        client = self._make_client()

        # These run on paho's thread: hand everything to the event loop.
        def on_connect(_c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode,
                       _p: Properties | None) -> None:
            loop.call_soon_threadsafe(_settle, connected, (rc, flags.session_present))

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode],
                         _p: Properties | None) -> None:
            loop.call_soon_threadsafe(_settle, subscribed, codes)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode,
                          _p: Properties | None) -> None:
            loop.call_soon_threadsafe(_settle, lost, str(rc))

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            loop.call_soon_threadsafe(self._on_message, client, message)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message

        properties = None
        # MQTT 3: the session flag is the constructor's clean_session=False.
        clean_start: Any = False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.v5:
            properties = _properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry
            properties.ReceiveMaximum = s.common.prefetch
        await loop.run_in_executor(None, functools.partial(
            client.connect, s.host, s.port, s.keepalive, clean_start=clean_start,
            properties=properties))
        client.loop_start()
        self._client = client
        self._lost = lost
        try:
            rc, session_present = await asyncio.wait_for(connected, HANDSHAKE_TIMEOUT)
            if rc.is_failure:
                raise ConnectionRefusedError(f"broker refused the connection: {rc}")
            result, _mid = client.subscribe(s.common.topic, qos=1)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"subscribe failed: {mqtt.error_string(result)}")
            codes = await asyncio.wait_for(subscribed, HANDSHAKE_TIMEOUT)
            if any(code.is_failure for code in codes):
                raise ConnectionError(f"subscription refused: {codes[0]}")
            self._set_connected(True, f"topic {s.common.topic!r} on {s.host}:{s.port} as"
                                      f" {s.client_id!r}, session"
                                      f" {'resumed' if session_present else 'new'}")
            reason = await lost
            raise ConnectionError(f"connection lost: {reason}")
        finally:
            self._client = None
            self._lost = None
            with contextlib.suppress(Exception):
                client.disconnect()
            await loop.run_in_executor(None, client.loop_stop)

    def _on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        mid, qos = message.mid, message.qos

        async def ack() -> None:
            if qos > 0:
                client.ack(mid, qos)

        async def redeliver() -> bool:
            if qos == 0 or client is not self._client:
                return qos > 0  # QoS 0 cannot come back; an old session's will
            # Unacknowledged messages come back when the session resumes.
            self._drop_connection("redelivering a command the store could not take")
            return True

        reply_to: str | None = None
        correlation: bytes | None = None
        props = message.properties
        if self.v5 and props is not None:
            reply_to = getattr(props, "ResponseTopic", None) or None
            correlation = getattr(props, "CorrelationData", None)
        self.admit_nowait(Inbound(bytes(message.payload), ack=ack, redeliver=redeliver,
                                  reply_to=reply_to, correlation=correlation))

    def _drop_connection(self, why: str) -> None:
        if self._lost is not None:
            _settle(self._lost, why)

    async def publish_reply(self, topic: str, body: bytes, correlation: bytes | str | None,
                            callback: bool) -> None:
        client = self._client
        if client is None:
            raise ConnectionError("not connected to the MQTT broker")
        properties = None
        if self.v5 and correlation is not None:
            properties = _properties(PacketTypes.PUBLISH)
            properties.CorrelationData = (correlation.encode() if isinstance(correlation, str)
                                          else correlation)
        info = client.publish(topic, body, qos=1, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
