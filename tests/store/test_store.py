from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from otpd.store import Duplicate, Inserted, NewMessage, NewOtp, SqliteStore, VerifyResult
from otpd.store.migrations import MIGRATIONS, SchemaTooNew, current_version, migrate


def message(receiver: str = "+628126666666", dedupe: str | None = None,
            expires_at: float = 2000.0, otp_reference: str | None = "ref") -> NewMessage:
    return NewMessage(command="send-sms", channel="sms", receiver=receiver, subject="",
                      sealed=b"sealed", created_at=1000.0, expires_at=expires_at,
                      dedupe_key=dedupe, otp_reference=otp_reference)


def otp(reference: str = "ref", expires_at: float = 2000.0) -> NewOtp:
    return NewOtp(reference, "+628126666666", b"salt", b"digest", 1000.0, expires_at)


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = await SqliteStore.open(tmp_path / "db" / "otpd.db")
    yield s
    await s.close()


async def test_wal_and_schema_version(store: SqliteStore) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert current_version(conn) == len(MIGRATIONS)
    conn.close()


def test_schema_newer_than_code_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    migrate(conn)
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema'")
    conn.commit()
    with pytest.raises(SchemaTooNew, match=r"store\.path"):
        migrate(conn)


async def test_duplicate_reference_and_id(store: SqliteStore) -> None:
    first = await store.insert_message(message(), otp())
    assert isinstance(first, Inserted)
    again = await store.insert_message(message(), otp())
    assert isinstance(again, Duplicate) and again.kind == "reference"
    a = await store.insert_message(message(dedupe="7|+62"))
    b = await store.insert_message(message(dedupe="7|+62"))
    assert isinstance(a, Inserted)
    assert isinstance(b, Duplicate) and b.kind == "id"
    assert b.state == "pending" and b.code is None


async def test_failed_send_removes_its_otp_and_wipes_text(store: SqliteStore) -> None:
    inserted = await store.insert_message(message(), otp())
    assert isinstance(inserted, Inserted)
    await store.finish_message(inserted.id, state="failed", code="1102", reason="x", via="",
                               attempts=1, now=1500.0)
    row = await store.message(inserted.id)
    assert row is not None and row.sealed is None and row.state == "failed"
    # The reference is free again.
    assert isinstance(await store.insert_message(message(), otp()), Inserted)


async def test_sent_keeps_otp(store: SqliteStore) -> None:
    inserted = await store.insert_message(message(), otp())
    assert isinstance(inserted, Inserted)
    await store.finish_message(inserted.id, state="sent", code="0000", reason="", via="m1",
                               attempts=1, now=1500.0)
    assert isinstance(await store.insert_message(message(), otp()), Duplicate)


async def test_verify_state_machine(store: SqliteStore) -> None:
    await store.insert_message(message(), otp())
    wrong, right = (lambda r: False), (lambda r: True)
    assert await store.verify_otp("nope", 1500, right, 3) == VerifyResult.UNKNOWN
    assert await store.verify_otp("ref", 1500, wrong, 3) == VerifyResult.WRONG
    assert await store.verify_otp("ref", 1500, wrong, 3) == VerifyResult.WRONG
    assert await store.verify_otp("ref", 2500, right, 3) == VerifyResult.EXPIRED
    assert await store.verify_otp("ref", 1500, right, 3) == VerifyResult.OK
    assert await store.verify_otp("ref", 1500, right, 3) == VerifyResult.USED
    await store.insert_message(message(), otp("ref2"))
    for _ in range(2):
        assert await store.verify_otp("ref2", 1500, wrong, 3) == VerifyResult.WRONG
    assert await store.verify_otp("ref2", 1500, wrong, 3) == VerifyResult.BURNED
    # Burned stays burned, even with the right code.
    assert await store.verify_otp("ref2", 1500, right, 3) == VerifyResult.BURNED


async def test_block_list_persists(tmp_path: Path) -> None:
    path = tmp_path / "otpd.db"
    s = await SqliteStore.open(path)
    await s.block("+628126666666", 1.0)
    await s.block("+628126666666", 2.0)  # idempotent
    await s.close()
    s = await SqliteStore.open(path)
    assert await s.is_blocked("+628126666666")
    assert await s.unblock("+628126666666")
    assert not await s.unblock("+628126666666")
    assert not await s.is_blocked("+628126666666")
    await s.close()


async def test_purge_in_bulk(store: SqliteStore) -> None:
    for i in range(50):
        await store.insert_message(message(), otp(f"r{i}", expires_at=1100.0 + i))
    pending = await store.pending_messages()
    for row in pending[:10]:
        await store.finish_message(row.id, state="sent", code="0000", reason="", via="m",
                                   attempts=1, now=1200.0)
    otps, msgs = await store.purge(otp_before=1125.0, messages_before=1300.0)
    assert (otps, msgs) == (25, 10)
    counts = await store.counts()
    assert counts["otp"] == 25 and counts["outbox_pending"] == 40


async def test_database_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a shell's usual umask: new files 0644
    try:
        store = await SqliteStore.open(tmp_path / "new" / "otpd.db")
        await store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "otpd.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_blocked_mailboxes_are_lower_cased_by_the_upgrade(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    for target, script in enumerate(MIGRATIONS[:4], 1):
        conn.executescript(f"BEGIN;\n{script}\nUPDATE meta SET value = '{target}'"
                           " WHERE key = 'schema';\nCOMMIT;")
    conn.executemany("INSERT INTO blocklist (receiver, created_at) VALUES (?, 1)",
                     [("Victim@Example.com",), ("victim@example.com",), ("Other@Example.org",),
                      ("+628121111222",)])
    migrate(conn)
    rows = sorted(r[0] for r in conn.execute("SELECT receiver FROM blocklist"))
    assert rows == ["+628121111222", "other@example.org", "victim@example.com"]
