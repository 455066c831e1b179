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
* Replies: to ``callback_topic`` on the default exchange; also to the
  ``reply_to`` property with the request's ``correlation_id`` (the requester's
  address: never declared nor deleted here).
* Reply queues: a callback topic is data from the publisher, and every new one
  would be a durable queue created with the Pi's account. A passive declare
  tells whether the queue exists: then it is someone else's (the PHP client's,
  another application's) and otpd only publishes into it, never deletes it.
  Otherwise otpd declares it ``durable=True, auto_delete=False,
  exclusive=False`` with no arguments (exactly what the PHP client declares a
  few ms after publishing: other flags, or an ``x-expires``/``x-message-ttl``
  argument, make its declare fail with PRECONDITION_FAILED) and remembers it
  as its own: at most ``reply_queues_max`` at a time (beyond: no reply, a
  rate-limited warning; the command still runs), each deleted
  ``reply_queue_ttl`` s after its last reply (``if_unused``: never under a
  reader still attached; an unread reply is stale by then), and all on stop.
  Nothing is persisted: a crash leaves at most ``reply_queues_max`` behind.
  Callback replies carry a per-message ``expiration`` (allowed without queue
  arguments), so a stale reply in a queue otpd does not own goes away too.
* Several nodes on one queue: with the node's intake attached, the consumer
  is started (``basic.consume``, with ``basic.qos`` set to the room) only
  while the node has room for more work, and cancelled when it has none
  (every modem down, failing, or its backlog full); the messages already
  delivered are still handled, each waiting for room, and a send command this
  node cannot send soon is nacked with requeue (another node gets it).
  Messages the node stored but cannot send in time are re-published to the
  queue (``publish_command``, with publisher confirms).
* TLS: ``amqps://`` URL; ``tls_ca`` for a private CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
REPLY_QUEUES_MAX = 1000  # reply queues otpd created that may exist at once
REPLY_QUEUE_TTL = 300.0  # s after its last reply that a queue otpd created is deleted
# s the deletion of otpd's reply queues may take on stop: under the second
# after which the stopper cancels the session again (otpd.aio.cancel_and_wait).
REPLY_CLEANUP = 0.8
STOP_DELETERS = 4  # channels deleting reply queues at once on stop
REFUSED_LOG_EVERY = 60.0  # s between two warnings about replies over the bound


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


class _OwnedQueues:
    """The reply queues otpd created, each with the loop time it is due for
    deletion; in order of that time (every touch moves a name to the end, and
    all get the same TTL)."""

    def __init__(self, limit: int, ttl: float) -> None:
        self.limit = limit
        self.ttl = ttl
        self.due: dict[str, float] = {}
        self.first = asyncio.Event()  # set when the set stops being empty

    def __contains__(self, name: object) -> bool:
        return name in self.due

    def __len__(self) -> int:
        return len(self.due)

    @property
    def full(self) -> bool:
        return len(self.due) >= self.limit

    def touch(self, name: str, now: float) -> None:
        if not self.due:
            self.first.set()  # the sweeper sleeps without a deadline until then
        self.due.pop(name, None)
        self.due[name] = now + self.ttl

    def forget(self, name: str) -> None:
        self.due.pop(name, None)

    def expired(self, now: float) -> list[str]:
        names: list[str] = []
        for name, due in self.due.items():
            if due > now:
                break
            names.append(name)
        return names

    def next_due(self) -> float | None:
        return next(iter(self.due.values()), None)


class AmqpConsumer(Consumer):
    def __init__(self, settings: AmqpSettings, service: Service, default_wait: float,
                 name: str = "amqp", *, reply_queues_max: int | None = None,
                 reply_queue_ttl: float | None = None,
                 reply_expiration: float | None = None) -> None:
        super().__init__(name, settings.common, service, default_wait,
                         secrets=(url_password(settings.url),))
        self.settings = settings
        # Defaults read here, not at import: a test may lower the module's.
        limit = REPLY_QUEUES_MAX if reply_queues_max is None else reply_queues_max
        ttl = REPLY_QUEUE_TTL if reply_queue_ttl is None else reply_queue_ttl
        # Kept across reconnections (the queues outlive a connection), never persisted.
        self._owned = _OwnedQueues(limit, ttl)
        # s a callback reply may wait unread in its queue (message TTL property).
        self.reply_expiration = ttl if reply_expiration is None else reply_expiration
        self._over_bound = 0  # replies not sent because of the bound, since the last warning
        self._over_bound_logged = float("-inf")
        self._connection: AbstractConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._reply_channel: AbstractChannel | None = None
        self._reply_lock = asyncio.Lock()
        self._acks: _Acks | None = None
        self._channel: AbstractChannel | None = None
        self._flow_lock = asyncio.Lock()

    async def _session(self) -> None:
        s = self.settings
        tls = tls_context(s.common.tls_ca) if s.url.startswith("amqps://") else None
        connection = await aio_pika.connect(
            s.url, ssl_context=tls, timeout=CONNECT_TIMEOUT, heartbeat=s.heartbeat,
            client_properties={"connection_name": f"otpd {s.common.topic}"},
        )
        self._connection = connection
        sweeper: asyncio.Task[None] | None = None
        follow: asyncio.Task[None] | None = None
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
            self._channel = channel
            if self._gated is None:
                self._consumer_tag = await queue.consume(self._on_message, no_ack=False)
            else:
                follow = asyncio.create_task(self._follow(), name=f"{self.name}-flow")
            self._set_connected(True, f"queue {s.common.topic!r} on {safe_url(s.url)}")
            sweeper = asyncio.create_task(self._sweep(), name=f"{self.name}-reply-queues")
            # Any of these ends the session; reconnecting declares the queue again.
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(connection.closed()),
                asyncio.ensure_future(channel.closed()),
                cancelled,
            ]
            if follow is not None:
                waiters.append(follow)  # it ends only by failing: so does the session
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    if waiter is not follow:
                        waiter.cancel()
            if follow is not None and follow.done():
                follow.result()
            if connection.is_closed:
                raise ConnectionError("connection closed by RabbitMQ")
            if cancelled.done() and not self.stopping:
                raise ConnectionError(f"RabbitMQ cancelled the consumer (queue"
                                      f" {s.common.topic!r} deleted, or closing)")
        finally:
            for task in (follow, sweeper):
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
            self._channel = None
            acks, self._acks = self._acks, None
            if acks is not None and not connection.is_closed:
                with contextlib.suppress(Exception):
                    await within(ACK_DRAIN, acks.drain())
            if self.stopping and not connection.is_closed and len(self._owned):
                try:
                    await within(REPLY_CLEANUP, self._delete_owned_all())
                except Exception as exc:
                    log.warning("%s: %d reply queue(s) left on RabbitMQ at stop: %s", self.name,
                                len(self._owned), self._describe(exc))
                self._owned.due.clear()  # persist nothing: left to the broker's operator
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
        async with self._flow_lock:
            if self._queue is not None and self._consumer_tag is not None:
                tag, self._consumer_tag = self._consumer_tag, None
                await self._queue.cancel(tag)

    async def _apply_flow(self, taking: bool, window: int) -> None:
        """Consume with a prefetch of ``window`` while the node has room; cancel
        the consumer when it has none (RabbitMQ then gives the queue to others)."""
        async with self._flow_lock:
            queue, channel = self._queue, self._channel
            if queue is None or channel is None or self.stopping:
                return
            if taking and self._consumer_tag is None:
                await channel.set_qos(prefetch_count=window)
                self._consumer_tag = await queue.consume(self._on_message, no_ack=False)
                log.info("%s: taking work (window %d)", self.name, window)
            elif not taking and self._consumer_tag is not None:
                tag, self._consumer_tag = self._consumer_tag, None
                await queue.cancel(tag)
                log.info("%s: not taking work: %s", self.name, self._not_taking or "no room")

    @property
    def can_hand_back(self) -> bool:
        return True

    async def publish_command(self, body: bytes) -> None:
        """Put a command (a hand-over) back on the queue, confirmed by RabbitMQ."""
        message = aio_pika.Message(body, content_type="application/json",
                                   delivery_mode=DeliveryMode.PERSISTENT)
        async with self._reply_lock:
            channel = await self._reply_chan()
            await channel.default_exchange.publish(message, routing_key=self.settings.common.topic)

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
            pass_on=redeliver,
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
            # Unread, a reply is stale: let it expire even in a queue otpd does not own.
            expiration=self.reply_expiration if callback else None,
        )
        async with self._reply_lock:
            # reply_to is the requester's own address: neither declared nor deleted.
            if callback and not await self._reply_queue(topic):
                return
            channel = await self._reply_chan()
            await channel.default_exchange.publish(message, routing_key=topic)

    async def _reply_queue(self, topic: str) -> bool:
        """Make sure queue ``topic`` exists for a callback reply; False: no reply
        (the bound). Called under the reply lock."""
        now = asyncio.get_running_loop().time()
        if topic in self._owned:
            # Ours: a no-op, or it comes back if someone deleted it.
            if await self._declare(topic):
                self._owned.touch(topic, now)
            else:
                self._owned.forget(topic)  # taken over with other flags: theirs now
            return True
        try:
            await (await self._reply_chan()).declare_queue(topic, passive=True)
            return True  # it exists: someone else's (its reader, another application)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._reply_channel = None  # the failed declare closed the channel
        except aiormq.exceptions.ChannelClosed as exc:
            # It exists but is not ours to look at (another connection's exclusive
            # queue): publish into it as before, never own it.
            self._reply_channel = None
            log.debug("%s: reply queue refused a passive declare: %s", self.name,
                      self._describe(exc))
            return True
        if self._owned.full:
            self._refuse_over_bound(topic)
            return False
        if await self._declare(topic):
            self._owned.touch(topic, now)
        return True

    async def _declare(self, topic: str) -> bool:
        """Declare reply queue ``topic`` as the PHP client does (these flags, no
        arguments); False if it exists with other flags (publish anyway)."""
        try:
            await (await self._reply_chan()).declare_queue(topic, durable=True, auto_delete=False,
                                                           exclusive=False)
            return True
        except aiormq.exceptions.ChannelClosed as exc:
            # Its reader declared it just now with other flags: it is theirs.
            log.debug("%s: reply queue declare refused: %s", self.name, self._describe(exc))
            self._reply_channel = None
            return False

    def _refuse_over_bound(self, topic: str) -> None:
        self._over_bound += 1
        self._note_error(f"reply not sent: {len(self._owned)} reply queues exist")
        now = time.monotonic()
        if now - self._over_bound_logged >= REFUSED_LOG_EVERY:
            # Rate-limited: a flood of callback topics is what this bound is for.
            log.warning("%s: %d reply queues otpd created still exist (the most it keeps);"
                        " %d callback replies not sent, the last to %r", self.name,
                        len(self._owned), self._over_bound, topic[:80])
            self._over_bound_logged = now
            self._over_bound = 0

    async def _sweep(self) -> None:
        """Delete each reply queue otpd created once its TTL has passed."""
        loop = asyncio.get_running_loop()
        owned = self._owned
        while True:
            for name in owned.expired(loop.time()):
                try:
                    await self._delete_owned(name)
                except Exception as exc:
                    # The connection is going: the next session carries on.
                    log.debug("%s: reply queue %r not deleted: %s", self.name, name,
                              self._describe(exc))
                    await asyncio.sleep(1.0)
                    break
            owned.first.clear()
            due = owned.next_due()
            timeout = None if due is None else max(due - loop.time(), 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await owned.first.wait()

    async def _delete_owned(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        async with self._reply_lock:
            due = self._owned.due.get(name)
            if due is None or due > loop.time():
                return  # a reply went to it meanwhile
            if await self._delete(name):
                self._owned.forget(name)
            else:
                self._owned.touch(name, loop.time())  # a reader is attached: later

    async def _delete_owned_all(self) -> None:
        """On stop: delete every reply queue otpd still owns, over a few channels
        at once (one round trip each; the stop allows under a second)."""
        connection = self._connection
        if connection is None:
            return
        names = list(self._owned.due)

        async def deleter() -> None:
            channel = await connection.channel()
            while names:
                name = names.pop()
                try:
                    await channel.queue_delete(name, if_unused=True)
                except aiormq.exceptions.ChannelClosed as exc:
                    # A reader is still attached: its queue is left to it.
                    log.debug("%s: reply queue %r left: %s", self.name, name,
                              self._describe(exc))
                    channel = await connection.channel()
                self._owned.forget(name)

        await asyncio.gather(*(deleter() for _ in range(min(STOP_DELETERS, len(names)))))

    async def _delete(self, name: str) -> bool:
        """Delete reply queue ``name``; False: a reader is attached, try later.
        Not ``if_empty``: past its TTL an unread reply is stale; and the PHP
        client never acknowledges, so its reply goes back to the queue."""
        try:
            await (await self._reply_chan()).queue_delete(name, if_unused=True)
            return True
        except aiormq.exceptions.ChannelPreconditionFailed:
            self._reply_channel = None
            return False
        except aiormq.exceptions.ChannelClosed as exc:
            # Refused otherwise: retrying would not help; stop counting it.
            self._reply_channel = None
            log.warning("%s: reply queue %r not deleted: %s", self.name, name,
                        self._describe(exc))
            return True
