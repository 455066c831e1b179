"""Redis consumer: pub/sub (OTP-Publisher compatible) or a reliable stream.

``mode = "pubsub"``: ``SUBSCRIBE topic``; every message is one command. This
is what OTP-Publisher's ``PUBLISH`` reaches, and it is lossy by nature: what
is published while otpd is disconnected is gone, and there is nothing to
acknowledge or redeliver (a command the store could not take is answered
with its error instead). Replies are ``PUBLISH``-ed to ``callback_topic``
after ``callback_delay`` (the PHP client subscribes just after publishing).

``mode = "stream"`` (an otpd extension, for publishers that can ``XADD``):
a consumer group ``group`` on the stream named by ``topic`` (created from the
stream's start with ``MKSTREAM``, so entries added before otpd first ran are
processed too). Each entry carries the command JSON in its ``message`` field
(an entry with exactly one field may name it as it likes). An entry is
``XACK``-ed once the command is stored (the acknowledgements of the commands
stored meanwhile go out together, one ``XACK`` with many ids, so a backlog
costs one round trip per batch, not per entry); one that is not (crash, store
failure) stays pending and is taken back with ``XAUTOCLAIM`` once idle for
``claim_idle`` seconds, from this consumer or a dead one; nothing published
while the Pi is offline is lost. Replies are ``XADD``-ed (field ``message``)
to a stream named ``callback_topic``, trimmed to about ``reply_maxlen``
entries and expiring ``reply_ttl`` s after the last reply, so a requester that
reads late still finds its answer and abandoned reply streams do not pile up.
A callback topic is data from whoever could publish, so the reply is written
in one Lua script, and only when the key is absent or is already a reply
stream (its newest entry carries the ``otpd = reply`` marker field otpd puts
in every reply): a reply never turns one of otpd's (or anybody's) keys into
a stream, and ``PEXPIRE`` never runs on a key otpd did not create.
otpd never deletes command entries (another group may read them too):
publishers should trim, e.g. ``XADD topic MAXLEN ~ 10000 * message <json>``.

Connections come from a bounded, blocking pool (``POOL_SIZE``): a burst of
replies waits for a free connection instead of failing with "too many
connections" whatever ``prefetch`` is.

``username``/``password`` (ACL) are used when the URL carries none;
``rediss://`` gives TLS (``tls_ca`` for a private CA). The client name
``otpd:<topic>`` shows in ``CLIENT LIST``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from otpd.aio import within
from otpd.netutil import safe_url, url_password
from otpd.transports.consumer import STOP_GRACE, Consumer, Inbound
from otpd.transports.settings import RedisSettings
from otpd.wire.brokers import STREAM_FIELD, entry_body

if TYPE_CHECKING:
    from otpd.service import Service

log = logging.getLogger("otpd.transports.redis")

# Stream replies carry this field too: what marks a stream as otpd's reply stream.
REPLY_MARK = ("otpd", "reply")

# KEYS[1] reply stream; ARGV: field, body, maxlen, ttl ms, mark field, mark value.
# Returns 1 when written, 0 when the key is somebody else's (left untouched).
_WRITE_REPLY = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'stream' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local ours = false
  if #newest == 1 then
    local fields = newest[1][2]
    for i = 1, #fields - 1, 2 do
      if fields[i] == ARGV[5] and fields[i + 1] == ARGV[6] then ours = true end
    end
  end
  if not ours then return 0 end
elseif kind ~= 'none' then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', ARGV[1], ARGV[2], ARGV[5], ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

BLOCK_MAX = 5.0  # s one XREADGROUP blocks at most (stop and reclaims stay timely)
POOL_SIZE = 8  # connections: the blocking read or the subscription, acks, replies
POOL_WAIT = 10.0  # s a command waits for a free connection


class RedisConsumer(Consumer):
    def __init__(self, settings: RedisSettings, service: Service, default_wait: float,
                 name: str = "redis") -> None:
        super().__init__(name, settings.common, service, default_wait,
                         secrets=(settings.password, url_password(settings.url)))
        self.settings = settings
        self._client: Redis | None = None
        self._pending_ids: set[bytes] = set()  # stream entries being handled here
        # Stream mode: entries stored and waiting for the batched XACK.
        self._acks: list[tuple[bytes, asyncio.Future[None]]] = []
        self._ack_wanted = asyncio.Event()
        self._acking = False  # the session's acknowledger runs

    def _make_client(self, *, blocking: bool) -> Redis:
        s = self.settings
        kwargs: dict[str, Any] = {
            "client_name": f"otpd:{s.common.topic}"[:200].replace(" ", "_"),
            # Failures surface here; reconnecting (with backoff) is ours to do.
            "retry": Retry(NoBackoff(), 0),
            "socket_connect_timeout": 10,
            "socket_keepalive": True,
            "socket_timeout": (BLOCK_MAX + 10) if blocking else 10,
            "health_check_interval": 30,
        }
        if s.username:
            kwargs["username"] = s.username
        if s.password:
            kwargs["password"] = s.password
        if s.url.startswith("rediss://") and s.common.tls_ca:
            kwargs["ssl_ca_certs"] = s.common.tls_ca
        pool = BlockingConnectionPool.from_url(s.url, max_connections=POOL_SIZE,
                                               timeout=POOL_WAIT, **kwargs)
        return Redis.from_pool(pool)

    async def _session(self) -> None:
        if self.settings.mode == "stream":
            await self._stream_session()
        else:
            await self._pubsub_session()

    # -- pub/sub ---------------------------------------------------------------
    async def _pubsub_session(self) -> None:
        s = self.settings
        client = self._make_client(blocking=False)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._client = client
        try:
            await pubsub.subscribe(s.common.topic)
            self._set_connected(True, f"channel {s.common.topic!r} on {safe_url(s.url)}")
            while not self.stopping:
                message = await pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                data = message["data"]
                body = data if isinstance(data, bytes) else str(data).encode()
                await self.admit(Inbound(body))
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                await within(2.0, pubsub.aclose())  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await within(2.0, client.aclose())

    # -- stream ----------------------------------------------------------------
    async def _stream_session(self) -> None:
        s = self.settings
        client = self._make_client(blocking=True)
        self._client = client
        try:
            try:
                await client.xgroup_create(s.common.topic, s.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._set_connected(True, f"stream {s.common.topic!r} group {s.group!r} as"
                                      f" {s.consumer!r} on {safe_url(s.url)}")
            acker = asyncio.create_task(self._acknowledge(client), name=f"{self.name}-xack")
            self._acking = True
            try:
                await self._stream_loop(client)
                if self.stopping and self._inflight:
                    # Stopping: what is in flight still gets its XACK.
                    await asyncio.wait(set(self._inflight), timeout=STOP_GRACE)
            finally:
                self._acking = False
                acker.cancel()
                await asyncio.gather(acker, return_exceptions=True)
                self._fail_acks(ConnectionError("the Redis session ended"))
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                await within(2.0, client.aclose())

    async def _stream_loop(self, client: Redis) -> None:
        s = self.settings
        # Entries this consumer was given before a crash or disconnect.
        await self._read_own_pending(client)
        interval = max(min(s.claim_idle / 2, 30.0), 0.05)
        next_claim = 0.0
        while not self.stopping:
            if time.monotonic() >= next_claim:
                await self._claim(client)
                next_claim = time.monotonic() + interval
            block = min(BLOCK_MAX, max(next_claim - time.monotonic(), 0.01))
            # As many entries as the node has room for (none while it cannot send:
            # the group gives them to the other consumers).
            room = await self.wait_room(timeout=block)
            if room <= 0:
                continue
            reply: Any = await client.xreadgroup(
                s.group, s.consumer, {s.common.topic: ">"},
                count=room, block=int(block * 1000),
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self._admit_entry(client, entry_id, fields)

    async def _acknowledge(self, client: Redis) -> None:
        """XACK what was stored, in batches: everything queued since the last one."""
        topic, group = self.settings.common.topic, self.settings.group
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            batch, self._acks = self._acks, []
            if not batch:
                continue
            try:
                await client.xack(topic, group, *(entry_id for entry_id, _ in batch))
            except BaseException as exc:
                # Those entries stay pending: read again after a reconnect, or
                # reclaimed after claim_idle (the store suppresses the duplicate).
                # Cancelled mid-XACK (the session ended): the batch is already out
                # of self._acks, so its commands must hear it here or wait forever.
                failure = (exc if isinstance(exc, Exception)
                           else ConnectionError("the Redis session ended"))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    def _fail_acks(self, exc: BaseException) -> None:
        batch, self._acks = self._acks, []
        for _, done in batch:
            if not done.done():
                done.set_exception(exc)

    async def _xack(self, entry_id: bytes) -> None:
        """Acknowledge one entry through the session's batched XACK."""
        if not self._acking:
            # Between sessions: it stays pending and is read again on reconnect.
            raise ConnectionError("not connected to Redis")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks.append((entry_id, done))
        self._ack_wanted.set()
        await done

    async def _read_own_pending(self, client: Redis) -> None:
        s = self.settings
        last: bytes | str = "0"
        while not self.stopping:
            reply: Any = await client.xreadgroup(s.group, s.consumer,
                                                 {s.common.topic: last}, count=s.common.prefetch)
            entries = [e for _stream, es in reply or [] for e in es]
            if not entries:
                return
            for entry_id, fields in entries:
                await self._admit_entry(client, entry_id, fields)
                last = entry_id

    async def _claim(self, client: Redis) -> None:
        """Take over entries idle for ``claim_idle`` (a dead consumer's, or ours
        that the store could not take)."""
        s = self.settings
        start: bytes | str = "0-0"
        while not self.stopping:
            room = self.room()
            if room <= 0:
                return  # no room: left to a consumer that has some
            reply: Any = await client.xautoclaim(s.common.topic, s.group, s.consumer,
                                            int(s.claim_idle * 1000), start_id=start,
                                            count=room)
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                await self._admit_entry(client, entry_id, fields)
            if cursor in (b"0-0", "0-0") or not entries:
                return
            start = cursor

    async def _admit_entry(self, client: Redis, entry_id: bytes,
                           fields: dict[Any, Any] | None) -> None:
        if entry_id in self._pending_ids:
            return  # still being handled here; not abandoned
        topic, group = self.settings.common.topic, self.settings.group
        body = entry_body(fields)
        if body is None:
            if fields:
                log.warning("%s: dropped stream entry %s without a %r field", self.name,
                            entry_id.decode(errors="replace"), STREAM_FIELD)
                self._note_error(f"dropped an entry without a {STREAM_FIELD!r} field")
            # Deleted from the stream (or unusable): take it off the pending list.
            await client.xack(topic, group, entry_id)
            return

        async def ack() -> None:
            # XACK is not tied to a connection: if the session was reopened while
            # the command ran, the new session's acknowledger sends it.
            await self._xack(entry_id)

        async def redeliver() -> bool:
            return True  # left pending: XAUTOCLAIM takes it again after claim_idle

        async def pass_on() -> bool:
            # Now, not after claim_idle: the same entry again at the stream's end,
            # this one acknowledged, in one transaction (never both, never neither).
            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.xadd(topic, {STREAM_FIELD: body})
                    pipe.xack(topic, group, entry_id)
                    await pipe.execute()
            except Exception as exc:
                log.debug("%s: entry not passed on: %s", self.name, self._describe(exc))
                return False  # handled here then
            return True

        self._pending_ids.add(entry_id)
        try:
            task = await self.admit(Inbound(body, ack=ack, redeliver=redeliver, pass_on=pass_on))
        except BaseException:
            self._pending_ids.discard(entry_id)
            raise
        task.add_done_callback(lambda _t: self._pending_ids.discard(entry_id))

    @property
    def shares_work(self) -> bool:  # type: ignore[override]
        return self.settings.mode == "stream"  # pub/sub hands every node every message

    @property
    def can_hand_back(self) -> bool:
        return self.settings.mode == "stream"  # pub/sub gives every node every message

    async def publish_command(self, body: bytes) -> None:
        """Stream mode: a hand-over goes back to the stream, for the group."""
        client = self._client
        if client is None:
            raise ConnectionError("not connected to Redis")
        await client.xadd(self.settings.common.topic, {STREAM_FIELD: body})

    # -- replies -------------------------------------------------------------------
    async def publish_reply(self, topic: str, body: bytes, correlation: bytes | str | None,
                            callback: bool) -> None:
        client = self._client
        if client is None:
            raise ConnectionError("not connected to Redis")
        if self.settings.mode == "stream":
            written = await client.register_script(_WRITE_REPLY)(
                keys=[topic],
                args=[STREAM_FIELD, body, self.settings.reply_maxlen,
                      self.settings.reply_ttl * 1000, *REPLY_MARK])
            if not written:
                raise ValueError(f"{topic!r} exists and is not a reply stream; left untouched")
        else:
            await client.publish(topic, body)
