"""Shared state in Redis for several otpd nodes; each node's outbox stays local.

With ``[store] backend = "redis"``, OTP records, the block list, accepted
message ids and rate-limit counters live in Redis (keys with TTLs, updates
atomic in Lua), so nodes consuming one queue verify each other's OTPs and
never send the same message id twice. What a node acknowledged stays in its
own durable SQLite outbox, so a Redis outage never loses accepted work.

Keys (``prefix`` default ``otpd:``):
  ``otp:<reference>``  hash: receiver, salt, digest, expires_at, attempts, state
  ``id:<dedupe key>``  JSON of the first message's state and code (and, while
                       pending, the outbox row holding it: claimed after the
                       row is stored)
  ``blocklist``        set of canonical receivers
  ``rate:<key>``       sorted set of hits (score = time)
  ``seen:<key>``       hash: state (pending | settled), holder, expires_at; the
                       replay cache of signed commands, shared by the nodes
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from otpd.otp_attempts import LUA_NAMES, RETRY, VerifyResult, outcome, precheck
from otpd.store.records import (
    Claim,
    Duplicate,
    Finished,
    HourActivity,
    Inserted,
    MessageRow,
    NewMessage,
    NewOtp,
    OtpRecord,
    RateLimit,
    SmsOutcome,
    SmsPart,
    SmsReport,
    SmsReportMatch,
    SmsUnreported,
    StoreError,
    check_holder,
    check_time,
    command_key,
)
from otpd.store.sqlite import SqliteStore

# KEYS[1] otp key; ARGV: receiver, salt, digest, expires_at, expire-at-ms, owner row
_CREATE_OTP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'receiver', ARGV[1], 'salt', ARGV[2], 'digest', ARGV[3],
           'expires_at', ARGV[4], 'attempts', 0, 'state', '{active}', 'row', ARGV[6])
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
return 1
""".format(**LUA_NAMES)

# KEYS[1] otp key; ARGV: expected attempts, matched (1/0), max attempts.
# Compare-and-set: the HMAC is checked in Python against what was read; if
# another node changed the record meanwhile, the caller reads it again.
_SETTLE_VERIFY = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '{unknown}' end
if state ~= '{active}' then return state end
if tonumber(redis.call('HGET', KEYS[1], 'attempts')) ~= tonumber(ARGV[1]) then return '{retry}' end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'state', '{used}')
  return '{ok}'
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', '{burned}')
  return '{burned}'
end
return '{wrong}'
""".format(**LUA_NAMES)

_DROP_ACTIVE_OTP = """
if redis.call('HGET', KEYS[1], 'state') == '{active}' then return redis.call('DEL', KEYS[1]) end
return 0
""".format(**LUA_NAMES)

# KEYS: rate keys; ARGV: now, record (1/0), then per key: window, limit,
# member ('' = count events), new id
_RATE_HIT = """
local now = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[3 + (i - 1) * 4])
  local limit = tonumber(ARGV[4 + (i - 1) * 4])
  local member = ARGV[5 + (i - 1) * 4]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  -- Stamped in the future (this node's clock went back): count them as now.
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf')) do
    redis.call('ZADD', key, now, m)
  end
  local counted = member ~= '' and redis.call('ZSCORE', key, member)
  if not counted then
    local n = redis.call('ZCARD', key)
    if n + 1 > limit then
      local oldest = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
      local at = oldest[2] and tonumber(oldest[2]) or now
      wait = math.max(wait, at + window - now, 0.001)
    end
  end
end
if wait > 0 or ARGV[2] ~= '1' then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[3 + (i - 1) * 4])
  local member = ARGV[5 + (i - 1) * 4]
  if member == '' then member = ARGV[6 + (i - 1) * 4] end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
end
return '0'
"""

# Replay cache. Expiry is judged on the caller's ``now`` against the stored
# expires_at (as in SQLite); PEXPIREAT only reclaims the memory afterwards.
# KEYS[1] seen key; ARGV: holder, now, claim expires_at, expire-at-ms
_CLAIM_COMMAND = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'expires_at')
if cur[1] and tonumber(cur[2]) > tonumber(ARGV[2]) then
  if cur[1] == 'settled' then return 'seen' end
  return 'busy'
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'pending', 'holder', ARGV[1], 'expires_at', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 'new'
"""

# KEYS[1] seen key; ARGV: holder, until, expire-at-ms. Absent (the claim lapsed
# and expired untaken) still settles: the command ran. Never shortens a settle.
_SETTLE_COMMAND = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'holder', 'expires_at')
if cur[1] and cur[2] ~= ARGV[1] then return 0 end
if cur[1] == 'settled' and tonumber(cur[3]) >= tonumber(ARGV[2]) then return 1 end
redis.call('HSET', KEYS[1], 'state', 'settled', 'holder', ARGV[1], 'expires_at', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] seen key; ARGV: holder
_RELEASE_COMMAND = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'holder')
if cur[1] == 'pending' and cur[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS[1] id key; ARGV[1] the holder of a claim_id. Deleted only while so held:
# a message stored with the id since then keeps it.
_RELEASE_ID = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['row'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The "row" of an id held by claim_id rather than by a stored message.
_HELD = "held"


class RedisSharedStore:
    def __init__(self, outbox: SqliteStore, client: aioredis.Redis, prefix: str,
                 expired_grace: float, retention: float) -> None:
        self.outbox = outbox
        self.redis = client
        self.prefix = prefix
        self.expired_grace = expired_grace
        self.retention = retention
        self._create_otp = client.register_script(_CREATE_OTP)
        self._settle = client.register_script(_SETTLE_VERIFY)
        self._drop_otp = client.register_script(_DROP_ACTIVE_OTP)
        self._rate = client.register_script(_RATE_HIT)
        self._claim_command = client.register_script(_CLAIM_COMMAND)
        self._settle_command = client.register_script(_SETTLE_COMMAND)
        self._release_command = client.register_script(_RELEASE_COMMAND)
        self._release_id = client.register_script(_RELEASE_ID)

    @classmethod
    async def open(cls, path: Path, url: str, prefix: str, expired_grace: float,
                   retention: float) -> RedisSharedStore:
        outbox = await SqliteStore.open(path)
        client = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        store = cls(outbox, client, prefix, expired_grace, retention)
        try:
            await store._call(client.ping())
            await store._lower_case_mailboxes()
        except StoreError:
            await outbox.close()
            await client.aclose()
            raise
        return store

    async def _lower_case_mailboxes(self) -> None:
        """Email receivers compare case-insensitively (lower-cased): a mailbox
        blocked in another case by an older otpd stays blocked."""
        key = self._key("blocklist", "set")
        members = await self._call(self.redis.smembers(key))
        for raw in members:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            if "@" in member and member != member.lower():
                await self._call(self.redis.sadd(key, member.lower()))
                await self._call(self.redis.srem(key, member))

    async def close(self) -> None:
        await self.outbox.close()
        await self.redis.aclose()

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def check_writable(self, *, local_only: bool = False) -> None:
        await self.outbox.check_writable()
        if local_only:
            return
        await self._call(self.redis.set(self._key("health", "probe"), "1", ex=60))

    # -- outbox, with shared duplicate detection ---------------------------------
    async def insert_message(
        self, msg: NewMessage, otp: NewOtp | None = None
    ) -> Inserted | Duplicate:
        otp_key = self._key("otp", otp.reference) if otp else None
        id_key = self._key("id", msg.dedupe_key) if msg.dedupe_key else None
        # The local row first, then the shared OTP and id claims naming it: a kill
        # between them leaves a row whose claims are missing (settled at the
        # restart, see pending_messages), never a claim without a row, which would
        # have every node refuse the broker's redelivery as a duplicate of a
        # message nobody holds.
        inserted = await self.outbox.insert_message(msg, None)
        if isinstance(inserted, Duplicate):
            return inserted
        owner = _owner(inserted.id, msg.created_at)
        if otp is not None and otp_key is not None:
            expire_ms = int((otp.expires_at + self.expired_grace) * 1000)
            try:
                created = await self._call(self._create_otp(
                    keys=[otp_key],
                    args=[otp.receiver, otp.salt, otp.digest, repr(otp.expires_at), expire_ms,
                          owner],
                ))
            except StoreError:
                await self.outbox.discard_message(inserted.id)
                raise
            if not created:  # the reference is taken: nothing of ours to undo in Redis
                await self.outbox.discard_message(inserted.id)
                return Duplicate(kind="reference")
        if id_key is None:
            return inserted
        try:
            claimed = await self._call(self.redis.set(
                id_key, json.dumps({"state": "pending", "code": None, "row": owner}),
                nx=True, ex=int(self.retention)))
            if claimed:
                return inserted
            raw = await self._call(self.redis.get(id_key))
        except StoreError:
            await self._undo(inserted.id, otp_key)
            raise
        # Another node accepted this id first: this copy is a duplicate.
        await self._undo(inserted.id, otp_key)
        info = json.loads(raw) if raw else {}
        return Duplicate(kind="id", state=info.get("state"), code=info.get("code"))

    async def _undo(self, message_id: int, otp_key: str | None) -> None:
        """Forget a row whose id another node holds (or whose claim failed)."""
        await self.outbox.discard_message(message_id)
        if otp_key is not None:
            await self._call(self.redis.delete(otp_key))

    async def duplicate_of(self, dedupe_key: str | None, reference: str | None
                           ) -> Duplicate | None:
        if reference is not None and await self._call(
                self.redis.exists(self._key("otp", reference))):
            return Duplicate(kind="reference")
        if dedupe_key is not None:
            raw = await self._call(self.redis.get(self._key("id", dedupe_key)))
            if raw:
                info = json.loads(raw)
                return Duplicate(kind="id", state=info.get("state"), code=info.get("code"))
        return None

    async def claim_id(self, dedupe_key: str) -> Duplicate | None:
        id_key = self._key("id", dedupe_key)
        held = json.dumps({"state": "pending", "code": None, "row": _HELD})
        if await self._call(self.redis.set(id_key, held, nx=True, ex=int(self.retention))):
            return None
        raw = await self._call(self.redis.get(id_key))
        info = json.loads(raw) if raw else {}
        if info.get("row") == _HELD:
            return None  # held already (an earlier start of this node)
        return Duplicate(kind="id", state=info.get("state"), code=info.get("code"))

    async def release_id(self, dedupe_key: str) -> None:
        await self._call(self._release_id(keys=[self._key("id", dedupe_key)], args=[_HELD]))

    async def pending_messages(self) -> list[MessageRow]:
        """The rows to resume (read once, at the start). A row stored just before
        a kill may lack its shared id claim: it is claimed now, unless another
        node accepted the broker's redelivery of it meanwhile; then that node
        sends it and the row is dropped here (it was never acknowledged)."""
        rows = await self.outbox.pending_messages()
        keep: list[MessageRow] = []
        for row in rows:
            if row.dedupe_key is not None and not await self._own_claim(row):
                await self.outbox.discard_message(row.id)
                continue
            if row.otp_reference is not None and not await self._own_otp(row):
                await self.outbox.discard_message(row.id)
                continue
            keep.append(row)
        return keep

    async def _own_otp(self, row: MessageRow) -> bool:
        """Was ``row``'s OTP created for it? A row whose OTP is missing was stored
        just before a kill and never acknowledged (its redelivery makes a new
        one); an OTP naming another row belongs to whoever took that redelivery.
        An OTP without an owner (an older otpd's), or one Redis cannot be asked
        about, counts as the row's own (resumed, as before)."""
        assert row.otp_reference is not None
        try:
            found = await self._call(self.redis.hget(self._key("otp", row.otp_reference),
                                                     "row"))
            exists = found is not None or bool(await self._call(
                self.redis.exists(self._key("otp", row.otp_reference))))
        except StoreError:
            return True
        if not exists:
            return False
        if found is None:
            return True
        owner = found.decode() if isinstance(found, bytes) else str(found)
        return owner == _owner(row.id, row.created_at)

    async def _own_claim(self, row: MessageRow) -> bool:
        """Is ``row``'s id claimed for it (claiming it if nobody holds it)? A
        pending claim without an owner (an older otpd's, made before its row)
        counts as its own, and so does one Redis cannot be asked about (the row
        is resumed, as before); a final state (another node's row finished) never."""
        assert row.dedupe_key is not None
        id_key = self._key("id", row.dedupe_key)
        owner = _owner(row.id, row.created_at)
        try:
            if await self._call(self.redis.set(
                    id_key, json.dumps({"state": "pending", "code": None, "row": owner}),
                    nx=True, ex=int(self.retention))):
                return True
            raw = await self._call(self.redis.get(id_key))
        except StoreError:
            return True
        info = json.loads(raw) if raw else {}
        if "row" in info:
            return bool(info["row"] == owner)
        return info.get("state") == "pending"

    async def message(self, message_id: int) -> MessageRow | None:
        return await self.outbox.message(message_id)

    async def recent_messages(self, states: Sequence[str], limit: int) -> list[MessageRow]:
        return await self.outbox.recent_messages(states, limit)

    async def mark_attempt(self, message_id: int, now: float) -> None:
        await self.outbox.mark_attempt(message_id, now)

    async def record_retry(
        self, message_id: int, attempts: int, next_attempt_at: float, reason: str
    ) -> None:
        await self.outbox.record_retry(message_id, attempts, next_attempt_at, reason)

    async def finish_message(
        self, message_id: int, *, state: str, code: str, reason: str, via: str,
        attempts: int, now: float,
    ) -> Finished:
        finished = await self.outbox.finish_message(
            message_id, state=state, code=code, reason=reason, via=via, attempts=attempts,
            now=now)
        if state != "sent" and finished.otp_reference is not None:
            await self._call(self._drop_otp(keys=[self._key("otp", finished.otp_reference)]))
        if finished.dedupe_key is not None:
            await self._call(self.redis.set(
                self._key("id", finished.dedupe_key),
                json.dumps({"state": state, "code": code}), xx=True, keepttl=True))
        return finished

    # -- SMS delivery reports: with the outbox, in this node's SQLite -------------
    async def record_sms_parts(self, parts: Sequence[SmsPart]) -> None:
        await self.outbox.record_sms_parts(parts)

    async def apply_sms_report(self, report: SmsReport) -> SmsReportMatch | None:
        return await self.outbox.apply_sms_report(report)

    async def expire_sms_reports(self, sent_before: float, now: float) -> list[SmsUnreported]:
        return await self.outbox.expire_sms_reports(sent_before, now)

    async def sms_outcomes(self, since: float) -> list[SmsOutcome]:
        return await self.outbox.sms_outcomes(since)

    async def hourly_activity(self, since: float) -> list[HourActivity]:
        return await self.outbox.hourly_activity(since)  # the node's own outbox

    # -- OTPs ---------------------------------------------------------------------
    async def verify_otp(
        self, reference: str, now: float, matches: Callable[[OtpRecord], bool],
        max_attempts: int,
    ) -> VerifyResult:
        key = self._key("otp", reference)
        for _ in range(10):
            raw: dict[bytes, bytes] = await self._call(self.redis.hgetall(key))
            if not raw:
                return VerifyResult.UNKNOWN
            record = OtpRecord(
                reference=reference,
                receiver=raw[b"receiver"].decode(),
                salt=raw[b"salt"],
                digest=raw[b"digest"],
                expires_at=float(raw[b"expires_at"]),
                attempts=int(raw[b"attempts"]),
                state=raw[b"state"].decode(),
            )
            early = precheck(record.state, record.expires_at, now)
            if early is not None:
                return early
            matched = matches(record)
            # The Lua script settles as otp_attempts.settle does, compare-and-set on attempts.
            result = await self._call(self._settle(
                keys=[key], args=[record.attempts, "1" if matched else "0", max_attempts]))
            text = result.decode() if isinstance(result, bytes) else str(result)
            if text != RETRY:
                return outcome(text)
        raise StoreError("redis: OTP record changed too often during verification")

    # -- block list ----------------------------------------------------------------
    async def block(self, receiver: str, now: float) -> None:
        await self._call(self.redis.sadd(self._key("blocklist", "set"), receiver))

    async def unblock(self, receiver: str) -> bool:
        removed = await self._call(self.redis.srem(self._key("blocklist", "set"), receiver))
        return bool(removed)

    async def is_blocked(self, receiver: str) -> bool:
        found = await self._call(self.redis.sismember(self._key("blocklist", "set"), receiver))
        return bool(found)

    async def blocked(self) -> list[str]:
        members = await self._call(self.redis.smembers(self._key("blocklist", "set")))
        return sorted(m.decode() for m in members)

    # -- rate limits ----------------------------------------------------------------
    async def rate_hit(
        self, limits: Sequence[RateLimit], now: float, *, record: bool = True
    ) -> float:
        if not limits:
            return 0.0
        args: list[Any] = [repr(now), "1" if record else "0"]
        for lim in limits:
            args += [repr(lim.window), lim.limit, lim.member or "", secrets.token_hex(8)]
        keys = [self._key("rate", lim.key) for lim in limits]
        result = await self._call(self._rate(keys=keys, args=args))
        return float(result.decode() if isinstance(result, bytes) else result)

    # -- replay cache of signed commands (in Redis: every node must see it) ----------
    async def claim_command(self, key: str, holder: str, now: float, claim_ttl: float
                            ) -> Claim:
        key, holder = command_key(key), check_holder(holder)
        now = check_time("now", now)
        expires_at = now + check_time("claim_ttl", claim_ttl, positive=True)
        result = await self._call(self._claim_command(
            keys=[self._key("seen", key)],
            args=[holder, repr(now), repr(expires_at), _ms(expires_at)]))
        return Claim(result.decode() if isinstance(result, bytes) else str(result))

    async def settle_command(self, key: str, holder: str, until: float) -> None:
        key, holder = command_key(key), check_holder(holder)
        until = check_time("until", until)
        await self._call(self._settle_command(
            keys=[self._key("seen", key)], args=[holder, repr(until), _ms(until)]))

    async def release_command(self, key: str, holder: str) -> None:
        key, holder = command_key(key), check_holder(holder)
        await self._call(self._release_command(keys=[self._key("seen", key)], args=[holder]))

    # -- housekeeping ------------------------------------------------------------------
    async def purge(self, otp_before: float, messages_before: float) -> tuple[int, int]:
        # Redis keys expire by themselves; only the local outbox needs purging.
        return await self.outbox.purge(otp_before, messages_before)

    async def counts(self) -> dict[str, int]:
        counts = await self.outbox.counts()
        counts.pop("otp", None)
        counts["blocked"] = int(await self._call(
            self.redis.scard(self._key("blocklist", "set"))))
        return counts


def _owner(message_id: int, created_at: float) -> str:
    """Names the outbox row that claimed an id: row id and creation time, so a
    row of another node (or an earlier row here) never passes for it."""
    return f"{message_id}@{created_at!r}"


def _ms(at: float) -> int:
    """Unix milliseconds for PEXPIREAT, rounded up so Redis never drops a key early."""
    return math.ceil(at * 1000)
