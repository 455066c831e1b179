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
* ``shared_group``: several otpd nodes subscribe to ``$share/<group>/<topic>``
  (MQTT 5 shared subscriptions; Mosquitto >= 1.6, EMQX and HiveMQ accept them
  from MQTT 3.1.1 clients too) and the broker hands each message to one of
  them. Each node needs its own ``client_id`` (the default with a group is
  ``otpd-<hostname>``). Sessions stay persistent, so nothing is lost, but a
  message stays with the session it was assigned to: one a node did not
  acknowledge before it went down, and (Mosquitto 2.0 keeps its round robin
  over offline members) that node's share of what is published while it is
  down, wait until it comes back. A node retired for good must have its
  session cleared (connect once with its ``client_id`` and a clean session),
  which drops whatever was still queued for it.
* Several nodes (``shared_group``) and capacity: the broker assigns each
  message to a member when it is published (Mosquitto: round robin, offline
  members included), whatever the member can send, and a message not
  acknowledged goes back to the same session only. So a node cannot leave
  work to the others through MQTT flow control: with the node's intake
  attached, a delivered command waits (unacknowledged: within the receive
  window) only while the node's backlog is full; what it stores and cannot
  send in time is re-published to the topic (``publish_command``) for the
  group, which may assign it to any member, this one included.
* ``username``/``password``; TLS with ``tls = true`` (or ``tls_ca``).
* A **retained** command is never executed: the broker hands it to every new
  subscription again, so it would run at every connect (a retained
  ``send-sms`` sends one SMS per restart). It is acknowledged and dropped,
  with one warning per topic advising to publish without retain.

paho runs on the asyncio loop through its external-loop API (the socket
is watched with ``add_reader``/``add_writer``, ``loop_misc`` keeps the
keepalive): no network thread, so a message and its PUBACK cost no thread
hand-over. Only the blocking ``connect`` (DNS, TCP, TLS) runs in an executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from otpd.aio import within
from otpd.netutil import tls_context
from otpd.transports.consumer import Consumer, Inbound
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


class _OnLoop:
    """Drives one paho client from the asyncio loop (paho's external-loop API).

    paho reports its socket through callbacks; ``connect`` runs in an executor
    thread, so what it reports meanwhile is applied on the loop once it
    returns (``connect`` is done with the socket by then)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: mqtt.Client,
                 on_error: Callable[[str], None]) -> None:
        self.loop = loop
        self.client = client
        self.on_error = on_error
        self.thread = threading.get_ident()
        self.deferred: list[Callable[[], None]] = []
        self.connecting = False
        self.sock: mqtt.SocketLike | None = None
        self.keepalive: asyncio.Task[None] | None = None
        client.on_socket_open = lambda _c, _u, sock: self._call(lambda: self._open(sock))
        client.on_socket_close = lambda _c, _u, sock: self._call(lambda: self._close(sock))
        client.on_socket_register_write = lambda _c, _u, sock: self._call(
            lambda: self._writer(sock, True))
        client.on_socket_unregister_write = lambda _c, _u, sock: self._call(
            lambda: self._writer(sock, False))

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        self.connecting = True
        try:
            await self.loop.run_in_executor(None, functools.partial(
                self.client.connect, *args, **kwargs))
        finally:
            self.connecting = False
            actions, self.deferred = self.deferred, []
            for action in actions:
                action()

    def _call(self, action: Callable[[], None]) -> None:
        if threading.get_ident() == self.thread:
            action()
        elif self.connecting:
            self.deferred.append(action)
        else:
            self.loop.call_soon_threadsafe(action)

    def _open(self, sock: mqtt.SocketLike) -> None:
        if sock.fileno() < 0:
            return  # closed again before the loop saw it
        self.sock = sock
        self.loop.add_reader(sock, self._readable)
        self.keepalive = self.loop.create_task(self._misc())

    def _close(self, sock: mqtt.SocketLike) -> None:
        if sock is self.sock:
            self.close()

    def _writer(self, sock: mqtt.SocketLike, on: bool) -> None:
        if sock is not self.sock or sock.fileno() < 0:
            return
        if on:
            self.loop.add_writer(sock, self._writable)
        else:
            self.loop.remove_writer(sock)

    def _readable(self) -> None:
        try:
            self.client.loop_read()
        except Exception as exc:  # paho reports most failures itself (on_disconnect)
            self.close()
            self.on_error(f"read failed: {exc}")
            return
        # TLS: bytes already decrypted inside the SSL object never make the
        # socket readable again: read them now.
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending() > 0:
            self.loop.call_soon(self._readable)

    def _writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as exc:
            self.close()
            self.on_error(f"write failed: {exc}")

    async def _misc(self) -> None:
        # Keepalive: PINGREQ when idle, and a dead broker noticed.
        while True:
            await asyncio.sleep(1.0)
            if self.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def close(self) -> None:
        """Stop watching the socket (paho closes it, or the client is dropped)."""
        sock, self.sock = self.sock, None
        if sock is not None and sock.fileno() >= 0:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None


class MqttConsumer(Consumer):
    def __init__(self, settings: MqttSettings, service: Service, default_wait: float,
                 name: str = "mqtt") -> None:
        super().__init__(name, settings.common, service, default_wait,
                         secrets=(settings.password,))
        self.settings = settings
        self._client: mqtt.Client | None = None
        self._lost: asyncio.Future[str] | None = None
        self._subscribed_once = False  # a session was set up earlier in this process
        self._retained_warned: set[str] = set()  # topics already warned about

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

        # paho calls these from the loop (from loop_read), or from the executor
        # thread while connect runs: hand the rare ones over safely.
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
            self._on_message(client, message)  # in loop_read, on the loop

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        driver = _OnLoop(loop, client, lambda why: _settle(lost, why))

        properties = None
        # MQTT 3: the session flag is the constructor's clean_session=False.
        clean_start: Any = False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.v5:
            properties = _properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry
            properties.ReceiveMaximum = s.common.prefetch
        try:
            await driver.connect(s.host, s.port, s.keepalive, clean_start=clean_start,
                                 properties=properties)
            self._client = client
            self._lost = lost
            rc, session_present = await within(HANDSHAKE_TIMEOUT, connected)
            if rc.is_failure:
                raise ConnectionRefusedError(f"broker refused the connection: {rc}")
            result, _mid = client.subscribe(s.subscription, qos=1)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"subscribe failed: {mqtt.error_string(result)}")
            codes = await within(HANDSHAKE_TIMEOUT, subscribed)
            if any(code.is_failure for code in codes):
                raise ConnectionError(f"subscription refused: {codes[0]}")
            self._set_connected(True, f"topic {s.subscription!r} on {s.host}:{s.port} as"
                                      f" {s.client_id!r}, session"
                                      f" {'resumed' if session_present else 'new'}")
            if self._subscribed_once and not session_present and self._keeps_session:
                # Restarted without persistence, expired, or taken over with a clean
                # session: what was queued for otpd meanwhile is gone.
                self._note_error("the broker did not keep the session")
                log.warning("%s: the broker did not keep the session of %r: QoS 1 messages"
                            " published while otpd was disconnected are lost (broker"
                            " restarted without persistence?)", self.name, s.client_id)
            self._subscribed_once = True
            reason = await lost
            raise ConnectionError(f"connection lost: {reason}")
        finally:
            self._client = None
            self._lost = None
            if driver.sock is not None:
                # A clean DISCONNECT (the broker keeps the session), written now.
                with contextlib.suppress(Exception):
                    client.disconnect()
                    client.loop_write()
            driver.close()
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    @property
    def _keeps_session(self) -> bool:
        return not self.v5 or self.settings.session_expiry > 0

    def _on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        mid, qos = message.mid, message.qos
        if message.retain:
            self._drop_retained(client, message)
            return

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

    def _drop_retained(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        self._received += 1
        self._note_error("dropped a retained message")
        if message.qos > 0:
            client.ack(message.mid, message.qos)
        topic = message.topic
        if topic not in self._retained_warned and len(self._retained_warned) < 1000:
            self._retained_warned.add(topic)
            log.warning("%s: dropped a retained message on %r: a retained command would run"
                        " again at every connect. Publish commands without retain, and clear"
                        " this one (publish an empty retained message to the topic).",
                        self.name, topic)

    @property
    def shares_work(self) -> bool:  # type: ignore[override]
        return bool(self.settings.shared_group)

    @property
    def can_hand_back(self) -> bool:
        return True

    async def publish_command(self, body: bytes) -> None:
        """A hand-over, to the plain topic: the broker gives it to one group member."""
        client = self._client
        if client is None:
            raise ConnectionError("not connected to the MQTT broker")
        info = client.publish(self.settings.common.topic, body, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")

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
