"""MQTT (paho-mqtt 2.x): QoS 1 publish, reply topic subscribed (and SUBACK-ed) first.

One connection per client, opened on first use with a unique client id
(``client_id`` plus a random suffix) and a clean session, reopened when lost.
A request that wants an answer subscribes to its own ``otp-reply-<uuid4>``
at QoS 1, waits for the broker's SUBACK, then publishes; with ``qos = 1`` a
command counts as published once the broker's PUBACK arrives. The daemon
answers at QoS 1 on that topic.

paho runs its network loop in a thread; its callbacks only hand results
to the event loop (``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from otpd.client.config import MqttSettings
from otpd.client.errors import TransportError
from otpd.client.publishers.base import Frames, Inbox, Transport
from otpd.netutil import tls_context


class _MqttInbox(Inbox):
    def __init__(self, topic: str, frames: Frames) -> None:
        super().__init__(topic)
        self.frames = frames

    async def receive(self) -> bytes:
        return await self.frames.get()


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """From paho's thread to the event loop (which may already be closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class _Session:
    """One paho connection and the futures waiting on it."""

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.connected: asyncio.Future[ReasonCode] = loop.create_future()
        self.lost = False
        self.acks: dict[int, asyncio.Future[Any]] = {}
        self.replies: dict[str, Frames] = {}

    def fail_all(self, why: str) -> None:
        self.lost = True
        error = TransportError(why)
        for fut in [self.connected, *self.acks.values()]:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # marked retrieved; awaiting it still raises
        for frames in self.replies.values():
            frames.fail(error)

    # Run on the event loop (scheduled from paho's thread).
    def acked(self, mid: int, value: Any) -> None:
        fut = self.acks.pop(mid, None)
        if fut is not None:
            _settle(fut, value)

    def message(self, topic: str, payload: bytes) -> None:
        frames = self.replies.get(topic)
        if frames is not None:
            frames.put(payload)


class MqttTransport(Transport):
    method = "mqtt"

    def __init__(self, config: MqttSettings, connect_timeout: float) -> None:
        super().__init__(connect_timeout)
        self.config = config
        self._session: _Session | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return f"MQTT {self.config.host}:{self.config.port} topic {self.config.topic!r}"

    def _make_client(self) -> mqtt.Client:
        c = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{c.client_id}-{uuid.uuid4().hex[:12]}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.connect_timeout
        if c.username:
            client.username_pw_set(c.username, c.password or None)
        if c.tls:
            client.tls_set_context(tls_context(c.tls_ca))
        return client

    async def _ensure(self) -> _Session:
        async with self._lock:
            if self._session is not None and not self._session.lost:
                return self._session
            await self._drop()
            loop = asyncio.get_running_loop()
            client = self._make_client()
            session = _Session(client, loop)
            self._wire(session)
            try:
                await loop.run_in_executor(None, functools.partial(
                    client.connect, self.config.host, self.config.port, self.config.keepalive))
            except (OSError, ValueError) as exc:
                raise TransportError(f"{self.describe()}: cannot connect: {exc}") from exc
            client.loop_start()
            self._session = session
            try:
                rc = await session.connected
            except BaseException:
                await self._drop()
                raise
            if rc.is_failure:
                await self._drop()
                raise TransportError(f"{self.describe()}: the broker refused the connection:"
                                     f" {rc}")
            return session

    def _wire(self, s: _Session) -> None:
        loop = s.loop

        # paho's thread: hand everything over to the event loop.
        def on_connect(_c: mqtt.Client, _u: Any, _f: mqtt.ConnectFlags, rc: ReasonCode,
                       _p: Properties | None) -> None:
            _post(loop, _settle, s.connected, rc)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode,
                          _p: Properties | None) -> None:
            _post(loop, s.fail_all, f"{self.describe()}: connection lost ({rc})")

        def on_subscribe(_c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode],
                         _p: Properties | None) -> None:
            _post(loop, s.acked, mid, list(codes))

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                       _p: Properties | None) -> None:
            _post(loop, s.acked, mid, rc)

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            _post(loop, s.message, message.topic, bytes(message.payload))

        s.client.on_connect = on_connect
        s.client.on_disconnect = on_disconnect
        s.client.on_subscribe = on_subscribe
        s.client.on_publish = on_publish
        s.client.on_message = on_message

    async def _drop(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.fail_all(f"{self.describe()}: connection closed")
        with contextlib.suppress(Exception):
            session.client.disconnect()
        await session.loop.run_in_executor(None, session.client.loop_stop)

    def _check(self, rc: MQTTErrorCode, what: str) -> None:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"{self.describe()}: {what} failed: {mqtt.error_string(rc)}")

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Inbox]:
        session = await self._ensure()
        frames = Frames()
        session.replies[topic] = frames
        try:
            rc, mid = session.client.subscribe(topic, qos=1)
            self._check(rc, "subscribe")
            if mid is None:
                raise TransportError(f"{self.describe()}: subscribe failed (no message id)")
            # Registered before any await: the SUBACK callback runs on this loop later.
            suback: asyncio.Future[list[ReasonCode]] = session.loop.create_future()
            session.acks[mid] = suback
            codes = await suback
            if any(code.is_failure for code in codes):
                raise TransportError(f"{self.describe()}: subscription to the reply topic"
                                     f" refused: {codes[0]}")
            yield _MqttInbox(topic, frames)
        finally:
            session.replies.pop(topic, None)
            if not session.lost:
                with contextlib.suppress(Exception):
                    session.client.unsubscribe(topic)

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        session = await self._ensure()
        qos = self.config.qos
        info = session.client.publish(self.config.topic, body, qos=qos)
        self._check(info.rc, "publish")
        if qos == 0:
            return
        puback: asyncio.Future[ReasonCode] = session.loop.create_future()
        if info.is_published():
            return
        session.acks[info.mid] = puback
        rc = await puback
        if rc.is_failure:
            raise TransportError(f"{self.describe()}: the broker refused the command: {rc}")

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
