"""One table of OTP verification cases, run against every implementation of the
attempt rules (:mod:`otpd.otp_attempts`): the pure model itself, the daemon's
stores (SQLite; Redis shared state) and the publisher library's ``manage_otp``
stores (SQLite; Redis). Redis tests skip, or fail with OTPD_REQUIRE_SERVICES=1,
when no Redis answers on 127.0.0.1:6379."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from redis.asyncio import Redis

from otpd.client.otpstore.base import OtpStore, StoredOtp
from otpd.client.otpstore.redis_store import RedisOtpStore
from otpd.client.otpstore.sqlite_store import SqliteOtpStore
from otpd.otp import new_salt, otp_digest, otp_matches
from otpd.otp_attempts import (
    LUA_NAMES,
    VERIFY_RESPONSES,
    OtpState,
    Step,
    VerifyResult,
    precheck,
    settle,
    verify_step,
)
from otpd.store.records import NewMessage, NewOtp, OtpRecord
from otpd.store.redis_state import RedisSharedStore
from otpd.store.sqlite import SqliteStore
from otpd.wire.codes import Code
from tests.support.services import REDIS_URL, require_redis

KEY = b"k" * 32
RECEIVER = "+628126666666"
PARAMS = ("p1", "", "", "")
CODE = "123456"
LIFETIME = 600.0
# Redis keys expire in real time: every record lives around now.
T0 = time.time()

R = VerifyResult


@dataclass(frozen=True)
class Try:
    """One verification: the code, receiver and params sent, and when (s after issue)."""

    expect: VerifyResult
    code: str = CODE
    receiver: str = RECEIVER
    params: tuple[str, str, str, str] = PARAMS
    at: float = 1.0
    reference: str | None = None  # None: the issued reference


@dataclass(frozen=True)
class Case:
    tries: list[Try]
    max_attempts: int = 3
    issue: bool = True


WRONG = "654321"

CASES: dict[str, Case] = {
    "right code": Case([Try(R.OK)]),
    "wrong then right": Case([Try(R.WRONG, WRONG), Try(R.OK)]),
    "consumed: right code again": Case([Try(R.OK), Try(R.USED), Try(R.USED, WRONG)]),
    "expired": Case([Try(R.EXPIRED, at=LIFETIME + 1), Try(R.EXPIRED, WRONG, at=LIFETIME + 1)]),
    "expired at the very second": Case([Try(R.EXPIRED, at=LIFETIME)]),
    "expired does not count tries": Case(
        [Try(R.WRONG, WRONG), Try(R.EXPIRED, WRONG, at=LIFETIME + 1),
         Try(R.EXPIRED, WRONG, at=LIFETIME + 2)], max_attempts=2),
    "burned after max attempts": Case(
        [Try(R.WRONG, WRONG), Try(R.WRONG, WRONG), Try(R.BURNED, WRONG), Try(R.BURNED)]),
    "one attempt allowed": Case([Try(R.BURNED, WRONG), Try(R.BURNED)], max_attempts=1),
    "unknown reference": Case([Try(R.UNKNOWN, reference="nope")]),
    "nothing issued": Case([Try(R.UNKNOWN)], issue=False),
    "params differ": Case([Try(R.WRONG, params=("p2", "", "", "")), Try(R.OK)]),
    "receiver differs": Case([Try(R.WRONG, receiver="+628127777777"), Try(R.OK)]),
    "a mismatch counts toward burning": Case(
        [Try(R.WRONG, receiver="+628127777777"), Try(R.BURNED, params=("", "", "", ""))],
        max_attempts=2),
}


class Impl(Protocol):
    async def issue(self, reference: str, salt: bytes, digest: bytes, now: float,
                    expires_at: float) -> None: ...

    async def verify(self, reference: str, now: float, check: Callable[[bytes, bytes], bool],
                     max_attempts: int) -> VerifyResult: ...


@dataclass
class _Row:
    salt: bytes
    digest: bytes
    expires_at: float
    attempts: int = 0
    state: str = OtpState.ACTIVE.value


@dataclass
class Model:
    """The rules alone: a dict of records driven by :func:`verify_step`."""

    rows: dict[str, _Row] = field(default_factory=dict)

    async def issue(self, reference: str, salt: bytes, digest: bytes, now: float,
                    expires_at: float) -> None:
        self.rows[reference] = _Row(salt, digest, expires_at)

    async def verify(self, reference: str, now: float, check: Callable[[bytes, bytes], bool],
                     max_attempts: int) -> VerifyResult:
        row = self.rows.get(reference)
        if row is None:
            return VerifyResult.UNKNOWN
        step = verify_step(row.state, row.attempts, row.expires_at, now,
                           lambda: check(row.salt, row.digest), max_attempts)
        if isinstance(step, VerifyResult):
            return step
        row.state, row.attempts = step.state.value, step.attempts
        return step.result


class DaemonStore:
    def __init__(self, store: SqliteStore | RedisSharedStore) -> None:
        self.store = store

    async def issue(self, reference: str, salt: bytes, digest: bytes, now: float,
                    expires_at: float) -> None:
        msg = NewMessage(command="request-otp", channel="sms", receiver=RECEIVER, subject="",
                         sealed=b"x", created_at=now, expires_at=expires_at,
                         otp_reference=reference)
        await self.store.insert_message(
            msg, NewOtp(reference, RECEIVER, salt, digest, now, expires_at))

    async def verify(self, reference: str, now: float, check: Callable[[bytes, bytes], bool],
                     max_attempts: int) -> VerifyResult:
        def matches(record: OtpRecord) -> bool:
            return check(record.salt, record.digest)

        return await self.store.verify_otp(reference, now, matches, max_attempts)


class ClientStore:
    def __init__(self, store: OtpStore) -> None:
        self.store = store

    async def issue(self, reference: str, salt: bytes, digest: bytes, now: float,
                    expires_at: float) -> None:
        assert await self.store.insert(
            StoredOtp(reference, salt, digest, expires_at, expires_at + 3600), now)

    async def verify(self, reference: str, now: float, check: Callable[[bytes, bytes], bool],
                     max_attempts: int) -> VerifyResult:
        def matches(record: StoredOtp) -> bool:
            return check(record.salt, record.digest)

        return await self.store.verify(reference, now, matches, max_attempts)


async def _drop(prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["model", "daemon-sqlite", "daemon-redis", "client-sqlite",
                        "client-redis"])
async def impl(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Impl]:
    kind: str = request.param
    prefix = f"otpd-test-{uuid.uuid4().hex}:"
    if kind.endswith("redis"):
        await require_redis()
    if kind == "model":
        yield Model()
    elif kind == "daemon-sqlite":
        sqlite = await SqliteStore.open(tmp_path / "otpd.db")
        yield DaemonStore(sqlite)
        await sqlite.close()
    elif kind == "daemon-redis":
        shared = await RedisSharedStore.open(tmp_path / "otpd.db", REDIS_URL, prefix, 3600,
                                             86400)
        yield DaemonStore(shared)
        await shared.close()
    elif kind == "client-sqlite":
        local = SqliteOtpStore(tmp_path / "client-otp.db")
        yield ClientStore(local)
        await local.close()
    else:
        remote = RedisOtpStore(REDIS_URL, prefix)
        yield ClientStore(remote)
        await remote.close()
    if kind.endswith("redis"):
        await _drop(prefix)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_verification_table(impl: Impl, case: Case) -> None:
    reference = f"ref-{uuid.uuid4().hex[:8]}"
    salt = new_salt()
    if case.issue:
        digest = otp_digest(KEY, salt, reference, CODE, RECEIVER, PARAMS)
        await impl.issue(reference, salt, digest, T0, T0 + LIFETIME)
    got = []
    for t in case.tries:
        def check(salt: bytes, digest: bytes, t: Try = t) -> bool:
            return otp_matches(KEY, salt, digest, reference, t.code, t.receiver, t.params)

        got.append(await impl.verify(t.reference or reference, T0 + t.at, check,
                                     case.max_attempts))
    assert got == [t.expect for t in case.tries]


def test_the_code_is_checked_only_for_an_active_unexpired_record() -> None:
    def never() -> bool:
        raise AssertionError("the code was checked")

    for state in (None, OtpState.USED.value, OtpState.BURNED.value):
        assert isinstance(verify_step(state, 0, T0 + 10, T0, never, 3), VerifyResult)
    assert verify_step(OtpState.ACTIVE.value, 0, T0, T0, never, 3) == R.EXPIRED
    assert precheck("revoked", T0 + 10, T0) == R.UNKNOWN  # a state it does not know
    assert precheck(OtpState.ACTIVE.value, T0 + 10, T0) is None


def test_settle_counts_and_burns() -> None:
    assert settle(0, True, 3) == Step(R.OK, OtpState.USED, 0)
    assert settle(1, False, 3) == Step(R.WRONG, OtpState.ACTIVE, 2)
    assert settle(2, False, 3) == Step(R.BURNED, OtpState.BURNED, 3)


def test_lua_names_and_answers_cover_every_outcome() -> None:
    assert {LUA_NAMES[r.name.lower()] for r in VerifyResult} == {r.value for r in VerifyResult}
    assert {LUA_NAMES[s.name.lower()] for s in OtpState} == {"active", "used", "burned"}
    assert set(VERIFY_RESPONSES) == set(VerifyResult)
    assert VERIFY_RESPONSES[R.BURNED][0] == Code.TOO_MANY_ATTEMPTS
    assert VERIFY_RESPONSES[R.EXPIRED] == (Code.EXPIRED, "OTP expired")
