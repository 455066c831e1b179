"""A running daemon whose broker consumer the daemon itself started, and the
application side of each broker (a *link*: publish, request with a reply on a
callback topic, count what the broker still holds for otpd).

Used by the end-to-end, restart and shared-subscription tests. Every link
talks to a real broker: RabbitMQ, Redis (pub/sub or stream), Mosquitto, or an
``otpd broker`` started by the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import random
import textwrap
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import paho.mqtt.client as mqtt
from aio_pika.abc import AbstractChannel, AbstractConnection
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from otpd.aio import within
from otpd.broker import BrokerConfig, BrokerServer
from otpd.channels.sms.simulator import ModemSimulator, SentMessage
from otpd.transports.consumer import Consumer
from tests.conftest import (
    MQTT_HOST,
    MQTT_PORT,
    RABBIT_URL,
    REDIS_URL,
    Running,
    SmtpServer,
    start_daemon,
    wait_until,
    write_config,
)
from tests.transports.conftest import APP_USER, OTPD_PASSWORD, OTPD_USER, command, unique

# Fast reconnects, so that restarts and kills are noticed and healed quickly; a
# max_message below every broker's own limit, so that otpd is the one refusing.
COMMON = """
reconnect_min = 0.1
reconnect_max = 0.5
retry_delay = 0.1
max_message = 8192
"""


def phone() -> tuple[str, str]:
    """A fresh Indonesian mobile number: (as an app writes it, as the modem sees it)."""
    digits = f"{random.randrange(10**8):08d}"
    return f"0812{digits}", f"+62812{digits}"


class Link(ABC):
    """The application side of one broker."""

    kind: str

    def __init__(self, topic: str | None = None) -> None:
        self.topic = topic or unique(self.kind.replace("-", ""))

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abstractmethod
    def table(self) -> str:
        """The daemon's TOML table for this broker."""

    @abstractmethod
    async def publish(self, body: bytes) -> None:
        """Publish one command (returns once the broker has it, where it says so)."""

    @abstractmethod
    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        """Publish a command whose envelope names ``callback`` and return the reply.
        The reply topic is listened to before publishing, so no delay is needed."""

    async def ask(self, name: str, data: dict[str, Any], timeout: float = 10.0
                  ) -> dict[str, Any]:
        """Send command ``name`` with a fresh callback topic; return the reply."""
        callback = unique("cb")
        return await self.request(command(name, data, callback_topic=callback), callback,
                                  timeout)

    async def ready(self) -> bool:
        """True once the broker routes the topic to otpd (after it says connected)."""
        return True

    async def leftovers(self) -> int:
        """With otpd stopped: messages the broker would still hand to otpd (not
        acknowledged). Pub/sub brokers keep nothing: 0."""
        return 0


class AmqpLink(Link):
    kind = "amqp"

    def __init__(self, url: str = RABBIT_URL) -> None:
        super().__init__()
        self.url = url
        self.queues = [self.topic]
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def open(self) -> None:
        self._conn = await aio_pika.connect(self.url, timeout=5)
        self._channel = await self._conn.channel()

    async def close(self) -> None:
        if self._conn is None:
            return
        await self.reopen()
        channel = self.channel
        for name in self.queues:
            try:
                await channel.queue_delete(name)
            except Exception:
                channel = await self._conn.channel()
        await self._conn.close()

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None
        return self._channel

    async def reopen(self) -> None:
        """A new connection if the old one is gone (a broker restart closes it)."""
        if self._conn is not None and not self._conn.is_closed:
            try:
                self._channel = await self._conn.channel()
                return
            except Exception:
                with contextlib.suppress(Exception):
                    await self._conn.close()
        await self.open()

    def table(self) -> str:
        return f'[amqp]\nurl = "{self.url}"\ntopic = "{self.topic}"\n{COMMON}'

    async def publish(self, body: bytes) -> None:
        # What OTP-Publisher does: default exchange, routing key = queue, transient.
        await self.channel.default_exchange.publish(aio_pika.Message(body),
                                                    routing_key=self.topic)

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        self.queues.append(callback)
        # The PHP client's reply queue flags: durable, not auto-delete, not exclusive.
        reply_queue = await self.channel.declare_queue(callback, durable=True,
                                                       auto_delete=False, exclusive=False)
        await self.publish(body)
        async with asyncio.timeout(timeout):
            while True:
                message = await reply_queue.get(no_ack=True, fail=False)
                if message is not None:
                    result: dict[str, Any] = json.loads(message.body)
                    return result
                await asyncio.sleep(0.02)

    async def leftovers(self) -> int:
        # Unacknowledged messages went back to "ready" when otpd's channel closed.
        await self.reopen()
        queue_ = await self.channel.declare_queue(self.topic, passive=True)
        return int(queue_.declaration_result.message_count or 0)


class RedisPubsubLink(Link):
    kind = "redis-pubsub"

    def __init__(self, url: str = REDIS_URL) -> None:
        super().__init__()
        self.url = url
        self._client: Redis | None = None

    async def open(self) -> None:
        self._client = Redis.from_url(self.url, socket_connect_timeout=5)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    @property
    def client(self) -> Redis:
        assert self._client is not None
        return self._client

    def table(self) -> str:
        return f'[redis]\nurl = "{self.url}"\ntopic = "{self.topic}"\n{COMMON}'

    async def publish(self, body: bytes) -> None:
        await self.client.publish(self.topic, body)

    async def ready(self) -> bool:
        # SUBSCRIBE is sent without waiting for its confirmation: make sure Redis took it.
        subscribers: Any = await self.client.pubsub_numsub(self.topic)
        return int(subscribers[0][1]) >= 1

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(callback)
        try:
            await self.publish(body)
            async with asyncio.timeout(timeout):
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        result: dict[str, Any] = json.loads(message["data"])
                        return result
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisStreamLink(RedisPubsubLink):
    kind = "redis-stream"
    GROUP = "otpd"

    def __init__(self, url: str = REDIS_URL) -> None:
        super().__init__(url)
        self.keys = [self.topic]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.delete(*self.keys)
        await super().close()

    def table(self) -> str:
        return (super().table() + f'mode = "stream"\ngroup = "{self.GROUP}"\n'
                'consumer = "pi-1"\nclaim_idle = 0.5\n')

    async def publish(self, body: bytes) -> None:
        await self.client.xadd(self.topic, {"message": body})

    async def ready(self) -> bool:
        return True

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        self.keys.append(callback)
        await self.publish(body)
        # Replies are XADDed to a stream named by the callback topic.
        reply: Any = await self.client.xread({callback: "0"}, count=1,
                                             block=int(timeout * 1000))
        assert reply, f"no reply on stream {callback} within {timeout} s"
        result: dict[str, Any] = json.loads(reply[0][1][0][1][b"message"])
        return result

    async def leftovers(self) -> int:
        groups: Any = await self.client.xinfo_groups(self.topic)
        group = next(g for g in groups if g["name"] in (self.GROUP, self.GROUP.encode()))
        # Handed out but not acknowledged, plus never handed out.
        return int(group["pending"]) + int(group.get("lag") or 0)


class Peer:
    """A test-side paho client (the app / OTP-Publisher), received messages queued."""

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
    """Connect once with a clean session so the broker drops a persistent one."""
    peer = Peer(host, port, client_id=client_id, clean=True)
    try:
        peer.open()
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


class MqttLink(Link):
    kind = "mqtt"

    def __init__(self, host: str = MQTT_HOST, port: int = MQTT_PORT, *,
                 client_id: str | None = None, extra: str = "",
                 topic: str | None = None) -> None:
        super().__init__(topic)
        self.host, self.port = host, port
        self.client_id = client_id or unique("otpd")
        self.extra = extra
        self._peer: Peer | None = None
        self._checked = False

    async def open(self) -> None:
        self._peer = await asyncio.to_thread(Peer(self.host, self.port).open)

    async def close(self) -> None:
        if self._peer is not None:
            await asyncio.to_thread(self._peer.close)
        if not self._checked:
            await asyncio.to_thread(forget_session, self.host, self.port, self.client_id)

    @property
    def peer(self) -> Peer:
        assert self._peer is not None
        return self._peer

    def table(self) -> str:
        return (f'[mqtt]\nhost = "{self.host}"\nport = {self.port}\ntopic = "{self.topic}"\n'
                f'client_id = "{self.client_id}"\n{COMMON}{self.extra}\n')

    async def publish(self, body: bytes) -> None:
        assert await asyncio.to_thread(self.peer.publish, self.topic, body, 1), "no PUBACK"

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        await asyncio.to_thread(self.peer.subscribe, callback)
        await self.publish(body)
        result: dict[str, Any] = json.loads((await self.peer.next(timeout)).payload)
        return result

    async def leftovers(self) -> int:
        self._checked = True
        return await asyncio.to_thread(count_redelivered, self.host, self.port, self.client_id)


class WsLink(Link):
    kind = "ws"

    def __init__(self, users: Path) -> None:
        super().__init__()
        self.users = users
        self._server: BrokerServer | None = None

    async def open(self) -> None:
        self._server = BrokerServer(BrokerConfig(htpasswd=self.users, port=0))
        await self._server.start()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    def table(self) -> str:
        # The test listens on the reply topic before publishing: no long floor needed.
        return (f'[ws]\nurl = "ws://127.0.0.1:{self.port}/ws"\nusername = "{OTPD_USER}"\n'
                f'password = "{OTPD_PASSWORD}"\ntopic = "{self.topic}"\n'
                f'reply_min_delay = 50\n{COMMON}')

    def _connect(self, topic: str) -> connect:
        # OTP-Publisher's WSClient sends "Basic user:user" (not base64).
        return connect(f"ws://127.0.0.1:{self.port}/ws?topic={topic}",
                       additional_headers={"Authorization": f"Basic {APP_USER}:{APP_USER}"},
                       open_timeout=5)

    async def publish(self, body: bytes) -> None:
        async with self._connect(self.topic) as ws:
            # Text frames only (the broker closes on binary ones): bytes that are
            # not UTF-8 arrive as U+FFFD, still not JSON.
            await ws.send(body.decode("utf-8", "replace"))

    async def ready(self) -> bool:
        # The broker registers a client just after the handshake the consumer saw.
        assert self._server is not None
        return self._server.clients >= 1

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        async with self._connect(callback) as ws:
            await self.publish(body)
            frame = await within(timeout, ws.recv())
        result: dict[str, Any] = json.loads(frame)
        return result


def modem_table(port: Path) -> str:
    return textwrap.dedent(f"""
        [[modem]]
        name = "sim1"
        port = "{port}"
        command_timeout = 1
        prompt_timeout = 2
        send_timeout = 2

        [sms]
        retry_delay = 0.2
        probe_interval = 0.3
    """)


@dataclass
class Node:
    """A daemon (REST, SMTP to aiosmtpd, one simulated modem, one broker consumer)."""

    run: Running
    link: Link
    sim: ModemSimulator
    smtp: SmtpServer
    stopped: bool = field(default=False)

    @property
    def consumer(self) -> Consumer:
        (consumer,) = self.run.daemon.consumers
        return consumer

    def sms_to(self, number: str) -> list[SentMessage]:
        return [m for m in self.sim.sent if m.receiver == number]

    async def sms(self, number: str, timeout: float = 10.0) -> SentMessage:
        found = await wait_until(lambda: self.sms_to(number), timeout, f"SMS to {number}")
        message: SentMessage = found[0]
        return message

    def mails_to(self, address: str) -> list[Message]:
        return [m for m in self.smtp.sink.messages if address in str(m.get("To", ""))]

    async def mail(self, address: str, timeout: float = 10.0) -> Message:
        found = await wait_until(lambda: self.mails_to(address), timeout, f"mail to {address}")
        message: Message = found[0]
        return message

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.run.daemon.stop()


async def start_node(tmp_path: Path, link: Link, smtp: SmtpServer,
                     session: aiohttp.ClientSession, *, wait: float = 5,
                     modem: bool = True) -> Node:
    """Start the simulator and the daemon (which starts the consumer); return once
    the consumer is connected and the modem ready."""
    sim = ModemSimulator(tmp_path / "modem1", name="sim1", seed=1)
    if modem:
        await sim.start()
    extra = (modem_table(tmp_path / "modem1") if modem else "") + "\n" + link.table()
    config = write_config(tmp_path, extra, smtp_port=smtp.port, wait=wait)
    try:
        run = await start_daemon(config, session)
    except BaseException:
        await sim.stop()
        raise
    node = Node(run, link, sim, smtp)
    try:
        await wait_until(lambda: node.consumer.connected, 10, f"{link.kind} consumer connected")
        async with asyncio.timeout(10):
            while not await link.ready():
                await asyncio.sleep(0.02)
        if modem:
            sms = run.daemon.engine.channels["sms"] if run.daemon.engine else None
            assert sms is not None
            await wait_until(lambda: any(m["state"] == "ready"
                                         for m in sms.status()["modems"]), 10, "modem ready")
    except BaseException:
        await node.stop()
        await sim.stop()
        raise
    return node
