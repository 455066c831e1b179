"""RabbitMQ (AMQP 0-9-1) consumer, compatible with OTP-Publisher's php-amqplib client.

* The queue named by ``topic`` is declared durable at startup on the default
  exchange: OTP-Publisher declares it *passively* (fails if absent) and
  publishes to the default exchange with routing key = topic, transient or
  persistent. A queue that already exists non-durable (declared by OTP-Pi) is
  consumed as it is, with a warning: its messages do not survive a broker
  restart.
* Manual acknowledgement once the command is stored; ``prefetch`` bounds the
  unacknowledged messages. A command the store could not take is nacked with
  requeue after ``retry_delay``. A crash before the ack means redelivery.
  Acknowledgements are coalesced: the commands stored together (the store
  commits in groups) whose delivery tags follow the last acknowledged one get
  a single ``basic.ack`` with ``multiple``; one stored ahead of an older
  command still running is acknowledged on its own. One frame per group
  instead of one per message matters on a Pi, where each write costs.
* Replies: to ``callback_topic``, declared ``durable=True, auto_delete=False,
  exclusive=False`` (exactly what the PHP client declares; other flags make its
  own declare fail) and published to the default exchange; also to the
  ``reply_to`` property with the request's ``correlation_id``.
* TLS: ``amqps://`` URL; ``tls_ca`` for a private CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    DeliveryMode,
)

from otpd.aio import within
from otpd.netutil import safe_url, tls_context, url_password
from otpd.transports.consumer import Consumer, Inbound
from otpd.transports.settings import AmqpSettings

if TYPE_CHECKING:
    from otpd.service import Service

log = logging.getLogger("otpd.transports.amqp")

CONNECT_TIMEOUT = 15.0
ACK_DRAIN = 2.0  # s the acknowledgements still queued may take to go out on stop


class _Acks:
    """The acknowledgements of one consuming channel, coalesced.

    Delivery tags on a channel count 1, 2, 3... and this channel has only our
    consumer, so every tag up to ``floor`` is settled (acknowledged or handed
    back). Tags stored meanwhile that continue the run from ``floor`` get one
    ``basic.ack(multiple=True)``; a stored tag behind a gap (an older command
    still running) is acknowledged alone. Never a tag twice: RabbitMQ closes
    the channel on an unknown delivery tag.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel,
                 on_error: Callable[[BaseException], None]) -> None:
        self.channel = channel
        self.on_error = on_error
        self.floor = 0
        self.done: set[int] = set()  # stored, acknowledgement not sent yet
        self.settled: set[int] = set()  # above floor, acked alone or nacked (written)
        self.flusher: asyncio.Task[None] | None = None

    def ack(self, tag: int) -> None:
        self.done.add(tag)
        self._schedule()

    def _schedule(self) -> None:
        if self.flusher is None and self.done:
            # Runs after the current loop iteration: a group commit settles its
            # commands together, so they are all here by then.
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def nack(self, tag: int) -> None:
        # Not settled until the nack is written: a multiple ack passing over it
        # first would acknowledge a message that was never stored.
        try:
            await self.channel.basic_nack(tag, requeue=True)
        finally:
            self.settled.add(tag)
            self._schedule()

    async def drain(self) -> None:
        if self.flusher is not None:
            await asyncio.shield(self.flusher)

    async def _flush(self) -> None:
        try:
            while self.done:
                tag, upto = self.floor + 1, 0
                while tag in self.done or tag in self.settled:
                    if tag in self.done:
                        self.done.discard(tag)
                        upto = tag
                    else:
                        self.settled.discard(tag)
                    tag += 1
                self.floor = tag - 1
                alone = sorted(self.done)
                self.done.clear()
                self.settled.update(alone)
                if upto:
                    await self.channel.basic_ack(upto, multiple=True)
                for one in alone:
                    await self.channel.basic_ack(one)
        except Exception as exc:
            # The channel is gone: RabbitMQ redelivers what was not acknowledged
            # (the store suppresses the duplicates by id).
            self.done.clear()
            self.on_error(exc)
        finally:
            self.flusher = None


class AmqpConsumer(Consumer):
    def __init__(self, settings: AmqpSettings, service: Service, default_wait: float,
                 name: str = "amqp") -> None:
        super().__init__(name, settings.common, service, default_wait,
                         secrets=(url_password(settings.url),))
        self.settings = settings
        self._connection: AbstractConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._reply_channel: AbstractChannel | None = None
        self._reply_lock = asyncio.Lock()
        self._acks: _Acks | None = None

    async def _session(self) -> None:
        s = self.settings
        tls = tls_context(s.common.tls_ca) if s.url.startswith("amqps://") else None
        connection = await aio_pika.connect(
            s.url, ssl_context=tls, timeout=CONNECT_TIMEOUT, heartbeat=s.heartbeat,
            client_properties={"connection_name": f"otpd {s.common.topic}"},
        )
        self._connection = connection
        try:
            channel, queue = await self._open_queue(connection)
            self._queue = queue
            cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_cancel(_frame: aiormq.spec.Basic.Cancel) -> None:
                if not cancelled.done():
                    cancelled.set_result(None)

            # The broker cancels the consumer when the queue is deleted.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            self._acks = _Acks(underlay, self._ack_failed)
            self._consumer_tag = await queue.consume(self._on_message, no_ack=False)
            self._set_connected(True, f"queue {s.common.topic!r} on {safe_url(s.url)}")
            # Any of these ends the session; reconnecting declares the queue again.
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(connection.closed()),
                asyncio.ensure_future(channel.closed()),
                cancelled,
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if connection.is_closed:
                raise ConnectionError("connection closed by RabbitMQ")
            if cancelled.done() and not self.stopping:
                raise ConnectionError(f"RabbitMQ cancelled the consumer (queue"
                                      f" {s.common.topic!r} deleted, or closing)")
        finally:
            acks, self._acks = self._acks, None
            if acks is not None and not connection.is_closed:
                with contextlib.suppress(Exception):
                    await within(ACK_DRAIN, acks.drain())
            self._connection = None
            self._queue = None
            self._consumer_tag = None
            self._reply_channel = None
            with contextlib.suppress(Exception):
                await within(5.0, connection.close())

    async def _open_queue(
        self, connection: AbstractConnection
    ) -> tuple[AbstractChannel, AbstractQueue]:
        topic = self.settings.common.topic
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.common.prefetch)
        try:
            return channel, await channel.declare_queue(topic, durable=True)
        except aiormq.exceptions.ChannelPreconditionFailed:
            # Declared earlier with other flags (OTP-Pi declares it non-durable).
            log.warning("%s: queue %r exists with other flags (not durable?); consuming it"
                        " as it is: its messages are lost if RabbitMQ restarts", self.name, topic)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.common.prefetch)
        return channel, await channel.declare_queue(topic, passive=True)

    async def _stop_intake(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            await self._queue.cancel(self._consumer_tag)

    def _ack_failed(self, exc: BaseException) -> None:
        self._note_error(exc)
        log.warning("%s: acknowledge failed (RabbitMQ will redeliver; the duplicate is"
                    " suppressed by id): %s", self.name, self._describe(exc))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        acks, tag = self._acks, message.delivery_tag
        try:
            stale = acks is None or tag is None or acks.channel is not message.channel
        except Exception:  # aio_pika raises when the message's channel is closed
            stale = True
        if stale or acks is None or tag is None:
            return  # its channel is gone: RabbitMQ redelivers it on the new one

        async def ack() -> None:
            acks.ack(tag)

        async def redeliver() -> bool:
            try:
                await acks.nack(tag)
            except Exception as exc:
                # The channel is gone: RabbitMQ requeues unacked messages anyway.
                log.debug("%s: nack failed: %s", self.name, self._describe(exc))
            return True

        # aio_pika already runs each delivery in a task of its own: handle it there.
        await self.handle(Inbound(
            body=message.body, ack=ack, redeliver=redeliver,
            reply_to=message.reply_to or None, correlation=message.correlation_id,
        ))

    async def _reply_chan(self) -> AbstractChannel:
        connection = self._connection
        if connection is None:
            raise ConnectionError("not connected to RabbitMQ")
        if self._reply_channel is None or self._reply_channel.is_closed:
            # Separate from the consuming channel: a failed declare closes its channel.
            self._reply_channel = await connection.channel()
        return self._reply_channel

    async def publish_reply(self, topic: str, body: bytes, correlation: bytes | str | None,
                            callback: bool) -> None:
        if isinstance(correlation, bytes):
            correlation = correlation.decode("utf-8", "replace")
        message = aio_pika.Message(
            body, content_type="application/json", correlation_id=correlation,
            delivery_mode=DeliveryMode.PERSISTENT if callback else DeliveryMode.NOT_PERSISTENT,
        )
        async with self._reply_lock:
            channel = await self._reply_chan()
            if callback:
                try:
                    await channel.declare_queue(topic, durable=True, auto_delete=False,
                                                exclusive=False)
                except aiormq.exceptions.ChannelClosed as exc:
                    # The client declared it with other flags: publish to it anyway.
                    log.debug("%s: reply queue declare refused: %s", self.name,
                              self._describe(exc))
                    self._reply_channel = None
                    channel = await self._reply_chan()
            await channel.default_exchange.publish(message, routing_key=topic)
