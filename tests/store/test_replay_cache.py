"""The replay cache of signed commands: claim, then settle or release.

Run against both backends; Redis with two store instances on one Redis as two
nodes. Every time is passed as ``now``: nothing waits on the clock. Redis
reclaims keys in real time (PEXPIREAT), so times there stay around now.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from otpd.store import Claim, SqliteStore, Store
from otpd.store.redis_state import RedisSharedStore
from tests.store.conftest import drop_prefix
from tests.support.services import REDIS_URL, require_redis

T0 = time.time()


@pytest.fixture(autouse=True)
def _now() -> None:
    """Each test's times start at its own now: Redis expires keys on the real
    clock, and a suite may run this file minutes after importing it."""
    global T0
    T0 = time.time()
KEY = "a1" * 32  # a SHA-256 signature's length
TTL = 30.0
WINDOW = 300.0


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[RedisSharedStore, RedisSharedStore]]:
    """Two nodes: their own local SQLite files, one Redis and prefix."""
    await require_redis()
    prefix = f"otpd-test-{uuid.uuid4().hex}:"
    a = await RedisSharedStore.open(tmp_path / "a.db", REDIS_URL, prefix, 3600, 86400)
    b = await RedisSharedStore.open(tmp_path / "b.db", REDIS_URL, prefix, 3600, 86400)
    yield a, b
    await a.close()
    await b.close()
    await drop_prefix(prefix)


def seen_rows(path: Path) -> list[tuple[str, str, str, float]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT key, state, holder, expires_at FROM seen_commands ORDER BY key").fetchall()
    finally:
        conn.close()


# -- the transitions, on both backends ---------------------------------------------


async def test_claim_settle_then_replay_is_seen(store: Store) -> None:
    assert await store.claim_command(KEY, "node-a", T0, TTL) is Claim.NEW
    # While it runs: another holder, or a second delivery to the same one, waits.
    assert await store.claim_command(KEY, "node-b", T0 + 1, TTL) is Claim.BUSY
    assert await store.claim_command(KEY, "node-a", T0 + 1, TTL) is Claim.BUSY
    await store.settle_command(KEY, "node-a", T0 + WINDOW)
    assert await store.claim_command(KEY, "node-b", T0 + 2, TTL) is Claim.SEEN
    assert await store.claim_command(KEY, "node-a", T0 + 2, TTL) is Claim.SEEN
    # Seen long after the claim would have lapsed, until the window's end...
    assert await store.claim_command(KEY, "node-b", T0 + WINDOW - 0.001, TTL) is Claim.SEEN
    # ...and no longer once it ended (the signature check refuses it by then).
    assert await store.claim_command(KEY, "node-b", T0 + WINDOW, TTL) is Claim.NEW
    assert await store.claim_command("b2" * 32, "node-b", T0, TTL) is Claim.NEW  # keys apart


async def test_release_lets_the_redelivery_run(store: Store) -> None:
    assert await store.claim_command(KEY, "node-a", T0, TTL) is Claim.NEW
    await store.release_command(KEY, "node-a")
    assert await store.claim_command(KEY, "node-b", T0 + 1, TTL) is Claim.NEW
    await store.release_command(KEY, "node-b")
    assert await store.claim_command(KEY, "node-a", T0 + 2, TTL) is Claim.NEW


async def test_only_the_holder_settles_or_releases(store: Store) -> None:
    assert await store.claim_command(KEY, "node-a", T0, TTL) is Claim.NEW
    await store.settle_command(KEY, "node-b", T0 + WINDOW)
    assert await store.claim_command(KEY, "node-c", T0 + 1, TTL) is Claim.BUSY  # not SEEN
    await store.release_command(KEY, "node-b")
    assert await store.claim_command(KEY, "node-c", T0 + 1, TTL) is Claim.BUSY  # not NEW
    await store.settle_command(KEY, "node-a", T0 + WINDOW)
    assert await store.claim_command(KEY, "node-c", T0 + 2, TTL) is Claim.SEEN
    # A release never forgets an executed command, not even its holder's.
    await store.release_command(KEY, "node-a")
    await store.release_command(KEY, "node-b")
    assert await store.claim_command(KEY, "node-c", T0 + 3, TTL) is Claim.SEEN


async def test_expired_claim_is_taken_over(store: Store) -> None:
    assert await store.claim_command(KEY, "crashed", T0, TTL) is Claim.NEW
    assert await store.claim_command(KEY, "node-b", T0 + TTL - 0.001, TTL) is Claim.BUSY
    assert await store.claim_command(KEY, "node-b", T0 + TTL, TTL) is Claim.NEW
    assert await store.claim_command(KEY, "node-c", T0 + TTL + 1, TTL) is Claim.BUSY
    # The old holder, back late, neither settles nor releases the new claim.
    await store.settle_command(KEY, "crashed", T0 + WINDOW)
    await store.release_command(KEY, "crashed")
    assert await store.claim_command(KEY, "node-c", T0 + TTL + 2, TTL) is Claim.BUSY
    await store.settle_command(KEY, "node-b", T0 + WINDOW)
    assert await store.claim_command(KEY, "node-c", T0 + TTL + 3, TTL) is Claim.SEEN


async def test_lapsed_claim_nobody_took_still_settles(store: Store) -> None:
    assert await store.claim_command(KEY, "slow", T0, TTL) is Claim.NEW
    # It ran longer than the claim lasted, and nobody claimed the key meanwhile.
    await store.settle_command(KEY, "slow", T0 + WINDOW)
    assert await store.claim_command(KEY, "node-b", T0 + TTL + 10, TTL) is Claim.SEEN


async def test_a_second_settle_never_shortens_the_window(store: Store) -> None:
    assert await store.claim_command(KEY, "node-a", T0, TTL) is Claim.NEW
    await store.settle_command(KEY, "node-a", T0 + WINDOW)
    await store.settle_command(KEY, "node-a", T0 + 10)
    assert await store.claim_command(KEY, "node-b", T0 + 100, TTL) is Claim.SEEN
    await store.settle_command(KEY, "node-a", T0 + 2 * WINDOW)  # but may lengthen it
    assert await store.claim_command(KEY, "node-b", T0 + WINDOW + 1, TTL) is Claim.SEEN


async def test_key_case_does_not_escape_the_cache(store: Store) -> None:
    # A signature verifies in either case, so a replay in capitals is the same command.
    assert await store.claim_command("abcdef01", "node-a", T0, TTL) is Claim.NEW
    await store.settle_command("ABCDEF01", "node-a", T0 + WINDOW)
    assert await store.claim_command("AbCdEf01", "node-b", T0 + 1, TTL) is Claim.SEEN


async def test_concurrent_claims_give_one_new(store: Store) -> None:
    results = await asyncio.gather(*(
        store.claim_command(KEY, f"node-{i}", T0, TTL) for i in range(20)))
    assert results.count(Claim.NEW) == 1
    assert results.count(Claim.BUSY) == 19


@pytest.mark.parametrize("bad", [
    "", "g1", "a" * 129, " ab", "ab ", "ab\n", "0x12", "\u0663\u0664",  # Arabic-Indic digits
    "ab:cd", "ab*",
])
async def test_bad_keys_are_refused(store: Store, bad: str) -> None:
    with pytest.raises(ValueError, match="command key"):
        await store.claim_command(bad, "node-a", T0, TTL)
    with pytest.raises(ValueError, match="command key"):
        await store.settle_command(bad, "node-a", T0 + WINDOW)
    with pytest.raises(ValueError, match="command key"):
        await store.release_command(bad, "node-a")


async def test_longest_key_and_bad_arguments(store: Store) -> None:
    longest = "f" * 128
    assert await store.claim_command(longest, "node-a", T0, TTL) is Claim.NEW
    with pytest.raises(ValueError, match="command key"):
        await store.claim_command(None, "node-a", T0, TTL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holder"):
        await store.claim_command(KEY, "", T0, TTL)
    with pytest.raises(ValueError, match="now"):
        await store.claim_command(KEY, "node-a", math.nan, TTL)
    with pytest.raises(ValueError, match="claim_ttl"):
        await store.claim_command(KEY, "node-a", T0, 0.0)
    with pytest.raises(ValueError, match="until"):
        await store.settle_command(longest, "node-a", math.inf)
    # Nothing refused was recorded.
    assert await store.claim_command(KEY, "node-b", T0, TTL) is Claim.NEW


# -- SQLite: restarts and purge ---------------------------------------------------


async def test_claims_and_settles_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "otpd.db"
    s = await SqliteStore.open(path)
    pending, settled = "0a" * 32, "0b" * 32
    assert await s.claim_command(pending, "boot-1", 1000.0, TTL) is Claim.NEW
    assert await s.claim_command(settled, "boot-1", 1000.0, TTL) is Claim.NEW
    await s.settle_command(settled, "boot-1", 1000.0 + WINDOW)
    await s.close()
    s = await SqliteStore.open(path)
    try:
        assert await s.claim_command(settled, "boot-2", 1001.0, TTL) is Claim.SEEN
        # The crashed boot's claim holds until it expires, then is taken over.
        assert await s.claim_command(pending, "boot-2", 1001.0, TTL) is Claim.BUSY
        assert await s.claim_command(pending, "boot-2", 1000.0 + TTL, TTL) is Claim.NEW
        assert await s.claim_command(settled, "boot-2", 1000.0 + WINDOW - 1, TTL) is Claim.SEEN
    finally:
        await s.close()


async def test_purge_removes_expired_entries_only(tmp_path: Path) -> None:
    path = tmp_path / "otpd.db"
    s = await SqliteStore.open(path)
    try:
        keys = {name: name.encode().hex() for name in ("old-pending", "old-settled",
                                                        "live-pending", "live-settled")}
        await s.claim_command(keys["old-pending"], "h", 1000.0, TTL)  # expires at 1030
        await s.claim_command(keys["old-settled"], "h", 1000.0, TTL)
        await s.settle_command(keys["old-settled"], "h", 1040.0)
        await s.claim_command(keys["live-pending"], "h", 1100.0, TTL)  # expires at 1130
        await s.claim_command(keys["live-settled"], "h", 1000.0, TTL)
        await s.settle_command(keys["live-settled"], "h", 1300.0)
        assert len(seen_rows(path)) == 4
        # As the daemon calls it: otp_before = now - expired_grace, here now = 1120.
        await s.purge(otp_before=1120.0 - 100.0, messages_before=0.0)
        assert len(seen_rows(path)) == 4  # expired, but within the grace
        await s.purge(otp_before=1120.0, messages_before=0.0)
        assert [r[0] for r in seen_rows(path)] == sorted(
            [keys["live-pending"], keys["live-settled"]])
        assert await s.claim_command(keys["live-pending"], "x", 1120.0, TTL) is Claim.BUSY
        assert await s.claim_command(keys["live-settled"], "x", 1120.0, TTL) is Claim.SEEN
        assert await s.claim_command(keys["old-settled"], "x", 1120.0, TTL) is Claim.NEW
    finally:
        await s.close()


async def test_schema_refuses_rows_the_code_would_refuse(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "otpd.db")
    await s.close()
    conn = sqlite3.connect(tmp_path / "otpd.db")
    try:
        for key, state in (("ABCD", "pending"), ("", "pending"), ("a" * 129, "pending"),
                           ("abcd", "done")):
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute("INSERT INTO seen_commands VALUES (?, ?, 'h', 1.0)", (key, state))
    finally:
        conn.close()


# -- Redis: shared by the nodes ----------------------------------------------------


async def test_two_nodes_share_the_replay_cache(
        nodes: tuple[RedisSharedStore, RedisSharedStore], tmp_path: Path) -> None:
    a, b = nodes
    assert await a.claim_command(KEY, "boot-a", T0, TTL) is Claim.NEW
    assert await b.claim_command(KEY, "boot-b", T0 + 1, TTL) is Claim.BUSY
    await a.settle_command(KEY, "boot-a", T0 + WINDOW)
    assert await b.claim_command(KEY, "boot-b", T0 + 2, TTL) is Claim.SEEN
    # b cannot release what a settled.
    await b.release_command(KEY, "boot-b")
    assert await b.claim_command(KEY, "boot-b", T0 + 3, TTL) is Claim.SEEN
    # In Redis, not in the nodes' own SQLite files.
    assert seen_rows(tmp_path / "a.db") == [] and seen_rows(tmp_path / "b.db") == []


async def test_redis_key_and_expiry(nodes: tuple[RedisSharedStore, RedisSharedStore]) -> None:
    a, b = nodes
    client = Redis.from_url(REDIS_URL)
    try:
        key = f"{a.prefix}seen:{KEY}"
        assert await a.claim_command(KEY.upper(), "boot-a", T0, TTL) is Claim.NEW
        assert await client.pexpiretime(key) == math.ceil((T0 + TTL) * 1000)
        assert (await client.hget(key, "holder")) == b"boot-a"
        await a.settle_command(KEY, "boot-a", T0 + WINDOW)
        assert await client.pexpiretime(key) == math.ceil((T0 + WINDOW) * 1000)
        assert (await client.hget(key, "state")) == b"settled"
        # A release removes the key itself, for the redelivery to any node.
        other = "c3" * 32
        assert await b.claim_command(other, "boot-b", T0, TTL) is Claim.NEW
        assert await client.exists(f"{b.prefix}seen:{other}") == 1
        await b.release_command(other, "boot-b")
        assert await client.exists(f"{b.prefix}seen:{other}") == 0
    finally:
        await client.aclose()


async def test_two_nodes_race_for_one_key(
        nodes: tuple[RedisSharedStore, RedisSharedStore]) -> None:
    a, b = nodes
    results = await asyncio.gather(*(
        (a if i % 2 else b).claim_command(KEY, f"node-{i}", T0, TTL) for i in range(20)))
    assert results.count(Claim.NEW) == 1 and results.count(Claim.BUSY) == 19
