"""``manage_otp`` store in a local SQLite file (one app server, any number of processes).

WAL mode; every change is one ``BEGIN IMMEDIATE`` transaction, so processes
sharing the file (several web workers) see attempts and consumption
atomically. The file is created 0600. Records past ``keep_until`` are
purged at most once a minute, on insert.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from otpd.client.errors import OtpStoreError
from otpd.client.otpstore.base import Matcher, OtpStore, StoredOtp
from otpd.otp_attempts import OtpState, VerifyResult, verify_step

T = TypeVar("T")

PURGE_EVERY = 60.0
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS otp (
    reference TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    expires_at REAL NOT NULL,
    keep_until REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT '{OtpState.ACTIVE.value}'
);
CREATE INDEX IF NOT EXISTS otp_keep_until ON otp (keep_until);
"""


class SqliteOtpStore(OtpStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used by one worker thread at a time
        self._last_purge = 0.0

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return result

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.to_thread(self._tx, fn)
        except (sqlite3.Error, OSError) as exc:
            raise OtpStoreError(f"OTP store {self.path}: {exc}") from exc

    async def insert(self, otp: StoredOtp, now: float) -> bool:
        purge = now - self._last_purge >= PURGE_EVERY
        if purge:
            self._last_purge = now

        def run(c: sqlite3.Connection) -> bool:
            if purge:
                c.execute("DELETE FROM otp WHERE keep_until <= ?", (now,))
            else:
                c.execute("DELETE FROM otp WHERE reference = ? AND keep_until <= ?",
                          (otp.reference, now))
            cur = c.execute(
                "INSERT OR IGNORE INTO otp (reference, salt, digest, expires_at, keep_until)"
                " VALUES (?, ?, ?, ?, ?)",
                (otp.reference, otp.salt, otp.digest, otp.expires_at, otp.keep_until))
            return cur.rowcount == 1

        return await self._run(run)

    async def discard(self, reference: str, salt: bytes) -> None:
        await self._run(lambda c: c.execute(
            "DELETE FROM otp WHERE reference = ? AND salt = ?", (reference, salt)))

    async def verify(self, reference: str, now: float, matches: Matcher,
                     max_attempts: int) -> VerifyResult:
        def run(c: sqlite3.Connection) -> VerifyResult:
            row = c.execute(
                "SELECT salt, digest, expires_at, keep_until, attempts, state FROM otp"
                " WHERE reference = ? AND keep_until > ?", (reference, now)).fetchone()
            if row is None:
                return VerifyResult.UNKNOWN
            salt, digest, expires_at, keep_until, attempts, state = row
            step = verify_step(
                state, attempts, expires_at, now,
                lambda: matches(StoredOtp(reference, salt, digest, expires_at, keep_until)),
                max_attempts)
            if isinstance(step, VerifyResult):
                return step
            c.execute("UPDATE otp SET attempts = ?, state = ? WHERE reference = ?",
                      (step.attempts, step.state.value, reference))
            return step.result

        return await self._run(run)

    async def close(self) -> None:
        def shut() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

        await asyncio.to_thread(shut)
