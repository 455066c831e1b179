"""RabbitMQ: publish to the daemon's durable queue, replies through ``reply_to``.

* Commands go to the default exchange with routing key = ``topic`` (the
  daemon's durable queue), persistent, with publisher confirms and the
  ``mandatory`` flag: a command is "published" only once RabbitMQ has taken
  it into that queue, and a missing queue is an error, not a silent loss.
* Answers: each connection has one exclusive, auto-delete reply queue
  (server-named, declared before anything is published); a request that
  wants an answer sets ``reply_to`` to it and ``correlation_id`` to its own
  ``otp-reply-<uuid4>``; the daemon answers there with the same correlation id.
  Nothing is left behind on the broker, even when an answer comes too late.
* One connection is kept and reopened when lost; ``amqps://`` for TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    DeliveryMode,
)

from otpd.client.config import AmqpSettings
from otpd.client.errors import TransportError
from otpd.client.publishers.base import Frames, Inbox, Transport, cleanup
from otpd.netutil import safe_url, tls_context


class _AmqpInbox(Inbox):
    def __init__(self, topic: str, reply_queue: str, frames: Frames) -> None:
        super().__init__(topic)
        self.reply_queue = reply_queue
        self.frames = frames

    async def receive(self) -> bytes:
        return await self.frames.get()


class AmqpTransport(Transport):
    method = "amqp"
    callback_in_envelope = False
    errors: ClassVar[tuple[type[BaseException], ...]] = (
        aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException,
    )

    def __init__(self, config: AmqpSettings, connect_timeout: float) -> None:
        super().__init__(connect_timeout)
        self.config = config
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._waiters: dict[str, Frames] = {}
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return f"RabbitMQ {safe_url(self.config.url)} queue {self.config.topic!r}"

    async def _ensure(self) -> tuple[AbstractChannel, AbstractQueue]:
        async with self._lock:
            channel, queue = self._channel, self._reply_queue
            if (self._connection is not None and not self._connection.is_closed
                    and channel is not None and not channel.is_closed and queue is not None):
                return channel, queue
            await self._drop("reconnecting")
            c = self.config
            tls = tls_context(c.tls_ca) if c.url.startswith("amqps://") else None
            connection = await aio_pika.connect(
                c.url, ssl_context=tls, timeout=self.connect_timeout,
                client_properties={"connection_name": "otpd client"},
            )
            try:
                channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
                queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
                await queue.consume(self._on_reply, no_ack=True, exclusive=True)
            except BaseException:
                await cleanup("closing the AMQP connection", connection.close())
                raise
            connection.close_callbacks.add(self._on_close)
            self._connection, self._channel, self._reply_queue = connection, channel, queue
            return channel, queue

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        # Every message with the request's correlation id: the request checks them.
        frames = self._waiters.get(message.correlation_id or "")
        if frames is not None:
            frames.put(message.body)

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        self._fail_waiters("connection to RabbitMQ lost")

    def _fail_waiters(self, why: str) -> None:
        for frames in self._waiters.values():
            frames.fail(TransportError(f"{self.describe()}: {why}"))

    async def _drop(self, why: str) -> None:
        connection = self._connection
        self._connection = self._channel = self._reply_queue = None
        if connection is not None:
            connection.close_callbacks.discard(self._on_close)
            self._fail_waiters(why)
            await cleanup("closing the AMQP connection", connection.close())

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Inbox]:
        _channel, queue = await self._ensure()
        frames = Frames()
        self._waiters[topic] = frames
        try:
            yield _AmqpInbox(topic, queue.name, frames)
        finally:
            self._waiters.pop(topic, None)

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        channel, _queue = await self._ensure()
        reply_to = correlation = None
        if isinstance(inbox, _AmqpInbox):
            reply_to, correlation = inbox.reply_queue, inbox.topic
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=DeliveryMode.PERSISTENT,
            reply_to=reply_to, correlation_id=correlation,
        )
        try:
            await channel.default_exchange.publish(message, routing_key=self.config.topic,
                                                   mandatory=True,
                                                   timeout=self.connect_timeout)
        except aiormq.exceptions.PublishError as exc:
            # Returned by RabbitMQ: nobody declared the queue (otpd never ran there).
            reply = getattr(exc.frame, "reply_text", "")
            raise TransportError(
                f"{self.describe()}: RabbitMQ has no queue {self.config.topic!r} ({reply or exc})"
                f": is otpd configured with [amqp] topic = {self.config.topic!r}?") from exc
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, OSError):
            await self._drop("publish failed")
            raise

    async def close(self) -> None:
        async with self._lock:
            await self._drop("client closed")
