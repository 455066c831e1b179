"""The application side of each broker: the client library's publishers
(:mod:`otpd.client.publishers`), with the little the tests add to them.

* ``confirmed(...)``: True only once the broker confirmed the command (RabbitMQ
  publisher confirm of a persistent, mandatory message; the id of a Redis
  ``XADD``; the PUBACK of an MQTT QoS 1 publish); any failure is False and the
  connection is dropped, to be opened again by the next publish;
* OTP-Publisher's transient AMQP publish; raw bytes (not UTF-8) on WebSocket;
* what the broker still holds (queue depth, a consumer group's leftovers) and
  clean-up of what a test created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel
from redis.asyncio import Redis

from otpd.aio import within
from otpd.client.config import AmqpConfig, MqttConfig, RedisConfig, WsConfig
from otpd.client.publishers.amqp import AmqpTransport
from otpd.client.publishers.base import Transport
from otpd.client.publishers.mqtt import MqttTransport
from otpd.client.publishers.redis import RedisTransport
from otpd.client.publishers.ws import WsTransport
from tests.support.brokers import command, unique

CONFIRM_TIMEOUT = 5.0  # s for one confirmed publish, connecting included


async def confirmed(transport: Transport, body: bytes,
                    timeout: float = CONFIRM_TIMEOUT) -> bool:
    """Publish with the client's transport; True once the broker confirmed it."""
    try:
        await within(timeout, transport.publish(body, None))
    except Exception:
        with contextlib.suppress(Exception):
            await within(2, transport.close())
        return False
    return True


class AmqpPublisher(AmqpTransport):
    """The client's RabbitMQ transport on queue ``queue``, and the queue's admin."""

    def __init__(self, url: str, queue: str, connect_timeout: float = 5.0) -> None:
        super().__init__(AmqpConfig(url=url, topic=queue), connect_timeout)
        self.queue = queue

    async def channel(self) -> AbstractChannel:
        """The transport's channel (connected again if it was lost)."""
        channel, _reply_queue = await self._ensure()
        return channel

    async def confirmed(self, body: bytes) -> bool:
        return await confirmed(self, body)

    async def publish_transient(self, body: bytes) -> None:
        """What OTP-Publisher does: default exchange, routing key = queue, transient."""
        channel = await self.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=self.queue)

    async def declare(self, queue: str | None = None, **flags: Any) -> None:
        """Declare ``queue`` (default: the command queue, as otpd declares it, so that
        nothing published before otpd runs is unroutable)."""
        channel = await self.channel()
        await channel.declare_queue(queue or self.queue, **(flags or {"durable": True}))

    async def depth(self) -> int:
        """Messages in the command queue not handed out or not acknowledged."""
        channel = await self.channel()
        declared = await channel.declare_queue(self.queue, passive=True)
        return int(declared.declaration_result.message_count or 0)

    async def delete(self, *queues: str) -> None:
        """Delete the command queue and ``queues`` (best effort), then disconnect."""
        for name in (self.queue, *queues):
            with contextlib.suppress(Exception):
                channel = await within(5, self.channel())
                await channel.queue_delete(name)
        with contextlib.suppress(Exception):
            await within(2, self.close())


class RedisPublisher(RedisTransport):
    """The client's Redis transport (``mode`` pubsub or stream) on ``topic``."""

    def __init__(self, url: str, topic: str, mode: str = "stream",
                 connect_timeout: float = 2.0) -> None:
        super().__init__(RedisConfig(url=url, topic=topic, mode=mode), connect_timeout)
        self.topic = topic

    @property
    def redis(self) -> Redis:
        return self._get_client()

    async def confirmed(self, body: bytes) -> bool:
        return await confirmed(self, body)

    async def leftovers(self, group: str) -> int:
        """Stream entries ``group`` never got plus those it got and did not acknowledge."""
        groups: Any = await self.redis.xinfo_groups(self.topic)
        found = next(g for g in groups if g["name"] in (group, group.encode()))
        return int(found["pending"]) + int(found.get("lag") or 0)

    async def delete(self, *keys: str) -> None:
        """Delete the stream and ``keys`` (best effort), then disconnect."""
        with contextlib.suppress(Exception):
            await self.redis.delete(self.topic, *keys)
        await self.close()


class MqttPublisher:
    """QoS 1 publishes to any topic, each through a client MQTT transport."""

    def __init__(self, host: str, port: int, connect_timeout: float = 2.0) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self._transports: dict[str, MqttTransport] = {}

    def transport(self, topic: str) -> MqttTransport:
        if topic not in self._transports:
            config = MqttConfig(host=self.host, port=self.port, topic=topic,
                                client_id=unique("pub"), qos=1)
            self._transports[topic] = MqttTransport(config, self.connect_timeout)
        return self._transports[topic]

    async def confirmed(self, topic: str, body: bytes) -> bool:
        return await confirmed(self.transport(topic), body)

    async def close(self) -> None:
        for transport in self._transports.values():
            with contextlib.suppress(Exception):
                await within(5, transport.close())


class WsPublisher(WsTransport):
    """The client's WebSocket transport to the ``otpd broker`` on ``port``."""

    def __init__(self, port: int, user: str, password: str, topic: str,
                 connect_timeout: float = 5.0) -> None:
        super().__init__(WsConfig(url=f"ws://127.0.0.1:{port}/ws", username=user,
                                  password=password, topic=topic), connect_timeout)

    async def publish_raw(self, body: bytes) -> None:
        """Any bytes: sent as a text frame (the broker closes on binary ones), so
        bytes that are not UTF-8 arrive as U+FFFD, still not JSON."""
        await self.publish(body.decode("utf-8", "replace").encode(), None)


async def ws_request(port: int, user: str, password: str, topic: str, name: str,
                     data: dict[str, Any], timeout: float = 3.0) -> dict[str, Any] | None:
    """Command ``name`` through an ``otpd broker`` with a callback topic; otpd's
    reply, or None if it did not come within ``timeout`` (the broker confirms
    nothing: the reply is the only sign a command was accepted)."""
    callback = unique("cb")
    publisher = WsPublisher(port, user, password, topic, connect_timeout=2.0)
    try:
        async with asyncio.timeout(timeout):
            answer = await publisher.request(command(name, data, callback_topic=callback),
                                             callback, timeout)
    except Exception:  # refused, closed, timed out: not accepted
        return None
    finally:
        with contextlib.suppress(Exception):
            await within(2, publisher.close())
    if answer is None:
        return None
    reply: dict[str, Any] = json.loads(answer)
    return reply
