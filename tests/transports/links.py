"""A running daemon whose broker consumer the daemon itself started, and the
application side of each broker (a *link*: publish, request with a reply on a
callback topic, count what the broker still holds for otpd).

Used by the end-to-end, restart and shared-subscription tests. Every link
talks to a real broker (RabbitMQ, Redis pub/sub or stream, Mosquitto, or an
``otpd broker`` started by the link) through the client library's publishers
(``tests.support.publishers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from otpd.broker import BrokerServer
from otpd.channels.sms.simulator import ModemSimulator
from otpd.client.publishers.base import Transport
from tests.support.brokers import (
    APP_USER,
    BROKER_FAST,
    OTPD_PASSWORD,
    OTPD_USER,
    command,
    start_ws_broker,
    unique,
)
from tests.support.daemon import SMS_QUICK, modem_table, modems_ready, start_daemon, write_config
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer
from tests.support.mqtt_peer import count_redelivered, forget_session
from tests.support.publishers import AmqpPublisher, MqttPublisher, RedisPublisher, WsPublisher
from tests.support.services import MQTT_HOST, MQTT_PORT, RABBIT_URL, REDIS_URL
from tests.support.waiting import wait_until

# Fast reconnects, so that restarts and kills are noticed and healed quickly; a
# max_message below every broker's own limit, so that otpd is the one refusing.
COMMON = BROKER_FAST + "max_message = 8192\n"


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


async def reply_of(transport: Transport, body: bytes, callback: str,
                   timeout: float) -> dict[str, Any]:
    """The client's request: listen on ``callback``, publish, return the first reply."""
    answer = await transport.request(body, callback, timeout)
    assert answer is not None
    result: dict[str, Any] = json.loads(answer)
    return result


class AmqpLink(Link):
    kind = "amqp"

    def __init__(self, url: str = RABBIT_URL) -> None:
        super().__init__()
        self.url = url
        self.publisher = AmqpPublisher(url, self.topic)
        self.queues: list[str] = []

    async def close(self) -> None:
        await self.publisher.delete(*self.queues)

    def table(self) -> str:
        return f'[amqp]\nurl = "{self.url}"\ntopic = "{self.topic}"\n{COMMON}'

    async def publish(self, body: bytes) -> None:
        await self.publisher.publish_transient(body)

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        # OTP-Publisher's reply queue, named by callback_topic (not the client's
        # reply_to): durable, not auto-delete, not exclusive.
        self.queues.append(callback)
        channel = await self.publisher.channel()
        reply_queue = await channel.declare_queue(callback, durable=True,
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
        return await self.publisher.depth()


class RedisPubsubLink(Link):
    kind = "redis-pubsub"
    mode = "pubsub"

    def __init__(self, url: str = REDIS_URL) -> None:
        super().__init__()
        self.url = url
        self.publisher = RedisPublisher(url, self.topic, self.mode, connect_timeout=5)

    async def close(self) -> None:
        await self.publisher.close()

    def table(self) -> str:
        return f'[redis]\nurl = "{self.url}"\ntopic = "{self.topic}"\n{COMMON}'

    async def publish(self, body: bytes) -> None:
        await self.publisher.publish(body, None)

    async def ready(self) -> bool:
        # SUBSCRIBE is sent without waiting for its confirmation: make sure Redis took it.
        subscribers: Any = await self.publisher.redis.pubsub_numsub(self.topic)
        return int(subscribers[0][1]) >= 1

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        return await reply_of(self.publisher, body, callback, timeout)


class RedisStreamLink(RedisPubsubLink):
    kind = "redis-stream"
    mode = "stream"
    GROUP = "otpd"

    async def close(self) -> None:
        await self.publisher.delete()

    def table(self) -> str:
        return (super().table() + f'mode = "stream"\ngroup = "{self.GROUP}"\n'
                'consumer = "pi-1"\nclaim_idle = 0.5\n')

    async def ready(self) -> bool:
        return True

    async def leftovers(self) -> int:
        return await self.publisher.leftovers(self.GROUP)


class MqttLink(Link):
    kind = "mqtt"

    def __init__(self, host: str = MQTT_HOST, port: int = MQTT_PORT, *,
                 client_id: str | None = None, extra: str = "",
                 topic: str | None = None) -> None:
        super().__init__(topic)
        self.host, self.port = host, port
        self.client_id = client_id or unique("otpd")  # otpd's
        self.extra = extra
        self.publisher = MqttPublisher(host, port, connect_timeout=5)
        self._checked = False

    async def hang_up(self) -> None:
        """Close the application's connection (otpd's session stays)."""
        await self.publisher.close()

    async def close(self) -> None:
        await self.hang_up()
        if not self._checked:
            await asyncio.to_thread(forget_session, self.host, self.port, self.client_id)

    def table(self) -> str:
        return (f'[mqtt]\nhost = "{self.host}"\nport = {self.port}\ntopic = "{self.topic}"\n'
                f'client_id = "{self.client_id}"\n{COMMON}{self.extra}\n')

    async def publish(self, body: bytes) -> None:
        # QoS 1: returns once the PUBACK came.
        await self.publisher.transport(self.topic).publish(body, None)

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        return await reply_of(self.publisher.transport(self.topic), body, callback, timeout)

    async def leftovers(self) -> int:
        self._checked = True
        return await asyncio.to_thread(count_redelivered, self.host, self.port, self.client_id)


class WsLink(Link):
    kind = "ws"

    def __init__(self, users: Path) -> None:
        super().__init__()
        self.users = users
        self._server: BrokerServer | None = None
        self._publisher: WsPublisher | None = None

    async def open(self) -> None:
        self._server = await start_ws_broker(self.users)
        self._publisher = WsPublisher(self.port, APP_USER, APP_USER, self.topic)

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
        if self._server is not None:
            await self._server.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    @property
    def publisher(self) -> WsPublisher:
        assert self._publisher is not None
        return self._publisher

    def table(self) -> str:
        # The test listens on the reply topic before publishing: no long floor needed.
        return (f'[ws]\nurl = "ws://127.0.0.1:{self.port}/ws"\nusername = "{OTPD_USER}"\n'
                f'password = "{OTPD_PASSWORD}"\ntopic = "{self.topic}"\n'
                f'reply_min_delay = 50\n{COMMON}')

    async def publish(self, body: bytes) -> None:
        await self.publisher.publish_raw(body)

    async def ready(self) -> bool:
        # The broker registers a client just after the handshake the consumer saw.
        assert self._server is not None
        return self._server.clients >= 1

    async def request(self, body: bytes, callback: str, timeout: float = 10.0) -> dict[str, Any]:
        return await reply_of(self.publisher, body, callback, timeout)


async def start_node(tmp_path: Path, link: Link, smtp: SmtpServer,
                     session: aiohttp.ClientSession, *, wait: float = 5,
                     modem: bool = True) -> Gateway:
    """Start the simulator and the daemon (which starts the link's consumer); return
    once the consumer is connected and the modem ready."""
    sim = ModemSimulator(tmp_path / "modem1", name="sim1", seed=1)
    if modem:
        await sim.start()
    modem_tables = modem_table("sim1", tmp_path / "modem1") + SMS_QUICK if modem else ""
    config = write_config(tmp_path, modem_tables + "\n" + link.table(), smtp_port=smtp.port,
                          wait=wait)
    try:
        run = await start_daemon(config, session)
    except BaseException:
        await sim.stop()
        raise
    node = Gateway(run, smtp, sim, link=link)
    try:
        await wait_until(lambda: node.consumer.connected, 10, f"{link.kind} consumer connected")
        await wait_until(link.ready, 10, f"{link.kind} broker routing to otpd")
        if modem:
            await modems_ready(run)
    except BaseException:
        await node.stop()
        await sim.stop()
        raise
    return node


@contextlib.asynccontextmanager
async def running_node(tmp_path: Path, link: Link, smtp: SmtpServer,
                       session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    """``start_node`` with its link opened first; everything stopped on exit."""
    await link.open()
    try:
        started = await start_node(tmp_path, link, smtp, session)
        try:
            yield started
        finally:
            await started.stop()
            await started.sim.stop()
    finally:
        await link.close()
