"""Redis: ``PUBLISH`` (pub/sub) or ``XADD`` (stream), as the daemon's ``[redis] mode``.

* pub/sub: the reply channel is ``SUBSCRIBE``-d, and the subscription
  confirmed, before the command is ``PUBLISH``-ed. ``PUBLISH`` reports how many
  subscribers got the command: none means no otpd is listening on ``topic``
  and the command is lost (pub/sub keeps nothing), which is reported as a
  :class:`TransportError` instead of a silent success.
* stream: the command is ``XADD``-ed to the stream ``topic`` (field
  ``message``; trimmed to about ``stream_maxlen`` entries), where the daemon's
  consumer group reads it even if it was offline when it was added. The
  daemon ``XADD``-s its answer to a stream named by ``callback_topic``, read
  from its start (nothing can be missed) and deleted after.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from otpd.client.config import RedisSettings
from otpd.client.errors import TransportError
from otpd.client.publishers.base import Inbox, Transport, cleanup
from otpd.netutil import safe_url
from otpd.wire.brokers import STREAM_FIELD, entry_body

POLL = 1.0  # s per pub/sub read
BLOCK_MS = 5000  # ms per blocking XREAD


class _PubsubInbox(Inbox):
    def __init__(self, topic: str, pubsub: PubSub) -> None:
        super().__init__(topic)
        self.pubsub = pubsub

    async def receive(self) -> bytes:
        while True:
            message: Any = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                         timeout=POLL)
            if message is not None and message.get("type") == "message":
                data = message["data"]
                return data if isinstance(data, bytes) else str(data).encode()


class _StreamInbox(Inbox):
    def __init__(self, topic: str, client: Redis, block_ms: int = BLOCK_MS) -> None:
        super().__init__(topic)
        self.client = client
        self.block_ms = block_ms
        self.last: bytes | str = "0-0"  # read from the start: nothing can be missed
        self.pending: collections.deque[bytes] = collections.deque()

    async def receive(self) -> bytes:
        while not self.pending:
            reply: Any = await self.client.xread({self.topic: self.last}, count=10,
                                                 block=self.block_ms)
            streams = reply.items() if isinstance(reply, dict) else (reply or [])
            for _stream, entries in streams:
                for entry_id, fields in entries:
                    self.last = entry_id
                    body = entry_body(fields)
                    if body is not None:
                        self.pending.append(body)
        return self.pending.popleft()


class RedisTransport(Transport):
    method = "redis"
    errors: ClassVar[tuple[type[BaseException], ...]] = (RedisError,)

    def __init__(self, config: RedisSettings, connect_timeout: float) -> None:
        super().__init__(connect_timeout)
        self.config = config
        self._client: Redis | None = None

    def describe(self) -> str:
        kind = "stream" if self.config.mode == "stream" else "channel"
        return f"Redis {safe_url(self.config.url)} {kind} {self.config.topic!r}"

    def _get_client(self) -> Redis:
        if self._client is None:
            c = self.config
            kwargs: dict[str, Any] = {
                "client_name": "otpd-client",
                "socket_connect_timeout": self.connect_timeout,
                "socket_keepalive": True,
                "health_check_interval": 30,
            }
            if c.username:
                kwargs["username"] = c.username
            if c.password:
                kwargs["password"] = c.password
            if c.url.startswith("rediss://") and c.tls_ca:
                kwargs["ssl_ca_certs"] = c.tls_ca
            self._client = Redis.from_url(c.url, **kwargs)
        return self._client

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Inbox]:
        client = self._get_client()
        if self.config.mode == "stream":
            try:
                # redis-py's read timeout is connect_timeout: block for less.
                block_ms = max(100, min(BLOCK_MS, int(self.connect_timeout * 500)))
                yield _StreamInbox(topic, client, block_ms)
            finally:
                await cleanup("deleting the reply stream", client.delete(topic))
            return
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(topic)
            while True:  # until Redis confirms (bounded by the caller's step timeout)
                message: Any = await pubsub.get_message(timeout=POLL)
                if message is not None and message.get("type") == "subscribe":
                    break
            yield _PubsubInbox(topic, pubsub)
        finally:
            await cleanup("closing the reply subscription",
                          pubsub.aclose())  # type: ignore[no-untyped-call]

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        client = self._get_client()
        topic = self.config.topic
        if self.config.mode == "stream":
            await client.xadd(topic, {STREAM_FIELD: body}, maxlen=self.config.stream_maxlen,
                              approximate=True)
            return
        receivers = await client.publish(topic, body)
        if not receivers:
            raise TransportError(
                f"{self.describe()}: nobody is subscribed, the command was not delivered"
                f" (is otpd running with [redis] topic = {topic!r}, mode = \"pubsub\"?)")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await cleanup("closing the Redis client", client.aclose())
