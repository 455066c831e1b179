"""``manage_otp`` store in Redis, shared by several app servers.

One hash per reference (``<key_prefix><reference>``: ``salt``, ``digest``
(hex), ``expires_at``, ``attempts``, ``state``) that expires by itself at
``keep_until``. Salt and digest never change, so they are read first and the
code is checked here with ``hmac.compare_digest``; the state change is then
one Lua script that re-checks, atomically, that it is the same record (same
salt), still active, not expired, and either consumes it or counts the
attempt (burning it at ``max_attempts``). Concurrent wrong guesses from any
number of servers are all counted; a code is accepted at most once.
"""

from __future__ import annotations

import math
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from otpd.client.errors import OtpStoreError
from otpd.client.otpstore.base import Matcher, OtpStore, StoredOtp, VerifyResult
from otpd.netutil import safe_url
from otpd.otp_attempts import LUA_NAMES, RETRY, outcome

_INSERT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'salt', ARGV[1], 'digest', ARGV[2], 'expires_at', ARGV[3],
           'attempts', 0, 'state', '{active}')
redis.call('EXPIREAT', KEYS[1], ARGV[4])
return 1
""".format(**LUA_NAMES)

_DISCARD = """
if redis.call('HGET', KEYS[1], 'salt') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV: salt (hex), now, matched (1/0), max_attempts. The rules of
# otpd.otp_attempts (precheck, then settle), atomically; RETRY: the record was
# replaced (another salt) since it was read.
_VERIFY = """
local h = redis.call('HMGET', KEYS[1], 'salt', 'state', 'expires_at')
if not h[1] then return '{unknown}' end
if h[1] ~= ARGV[1] then return '{retry}' end
if h[2] == '{used}' then return '{used}' end
if h[2] == '{burned}' then return '{burned}' end
if h[2] ~= '{active}' then return '{unknown}' end
if tonumber(ARGV[2]) >= tonumber(h[3]) then return '{expired}' end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'state', '{used}')
  return '{ok}'
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', '{burned}')
  return '{burned}'
end
return '{wrong}'
""".format(**LUA_NAMES)
RETRIES = 5  # the record was replaced between reading and checking it


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisOtpStore(OtpStore):
    def __init__(self, url: str, key_prefix: str, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._client = Redis.from_url(url, socket_connect_timeout=connect_timeout,
                                      socket_timeout=connect_timeout, socket_keepalive=True,
                                      client_name="otpd-client-otp")
        self._insert = self._client.register_script(_INSERT)
        self._discard = self._client.register_script(_DISCARD)
        self._verify = self._client.register_script(_VERIFY)

    def _key(self, reference: str) -> str:
        return self.key_prefix + reference

    def _error(self, exc: BaseException) -> OtpStoreError:
        return OtpStoreError(f"OTP store {safe_url(self.url)}: {type(exc).__name__}: {exc}")

    async def insert(self, otp: StoredOtp, now: float) -> bool:
        try:
            added: Any = await self._insert(
                keys=[self._key(otp.reference)],
                args=[otp.salt.hex(), otp.digest.hex(), repr(otp.expires_at),
                      math.ceil(max(otp.keep_until, now + 1))])
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        return int(added) == 1

    async def discard(self, reference: str, salt: bytes) -> None:
        try:
            await self._discard(keys=[self._key(reference)], args=[salt.hex()])
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc

    async def verify(self, reference: str, now: float, matches: Matcher,
                     max_attempts: int) -> VerifyResult:
        key = self._key(reference)
        try:
            for _ in range(RETRIES):
                salt_hex, digest_hex, expires = await self._client.hmget(
                    key, ["salt", "digest", "expires_at"])
                if salt_hex is None or digest_hex is None or expires is None:
                    return VerifyResult.UNKNOWN
                record = StoredOtp(reference, bytes.fromhex(_text(salt_hex)),
                                   bytes.fromhex(_text(digest_hex)), float(_text(expires)),
                                   keep_until=math.inf)
                matched = matches(record)
                result = _text(await self._verify(
                    keys=[key], args=[_text(salt_hex), repr(now), 1 if matched else 0,
                                      max_attempts]))
                if result != RETRY:
                    return outcome(result)
        except (RedisError, OSError, ValueError) as exc:
            raise self._error(exc) from exc
        return VerifyResult.UNKNOWN

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            return
