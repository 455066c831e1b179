"""SQLite store: OTP hashes, the block list, the durable outbox and the replay
cache of signed commands.

One connection used by one dedicated thread (group commit, see writer.py), so
every write is serialised without locks and the event loop never blocks on
disk. WAL with ``synchronous=FULL``: once a method returns, its change
survives a power cut.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from otpd.otp_attempts import OtpState, VerifyResult, verify_step
from otpd.store.migrations import migrate
from otpd.store.records import (
    FINAL_DELIVERY,
    MESSAGE_STATES,
    PART_STATUS,
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
    receivers_match,
)
from otpd.store.writer import GroupCommitWriter

T = TypeVar("T")

# A report matches parts sent at most this long before it (longer than any
# validity period otpd asks for), newest first.
_REPORT_HORIZON = 8 * 86400.0

# Column order matches MessageRow.
_SELECT_BY_DEDUPE = (
    "SELECT id, command, channel, receiver, subject, sealed, otp_reference, state, code, reason,"
    " via, attempts, created_at, expires_at, next_attempt_at, finished_at, attempt_started,"
    " delivery, delivery_at, delivered_at, reported_at, dedupe_key"
    " FROM outbox WHERE dedupe_key = ?"
)
_SELECT_BY_ID = (
    "SELECT id, command, channel, receiver, subject, sealed, otp_reference, state, code, reason,"
    " via, attempts, created_at, expires_at, next_attempt_at, finished_at, attempt_started,"
    " delivery, delivery_at, delivered_at, reported_at, dedupe_key"
    " FROM outbox WHERE id = ?"
)
_SELECT_RECENT = (
    "SELECT id, command, channel, receiver, subject, sealed, otp_reference, state, code, reason,"
    " via, attempts, created_at, expires_at, next_attempt_at, finished_at, attempt_started,"
    " delivery, delivery_at, delivered_at, reported_at, dedupe_key"
    " FROM outbox WHERE state IN (?, ?, ?, ?) ORDER BY id DESC LIMIT ?"
)
_SELECT_PENDING = (
    "SELECT id, command, channel, receiver, subject, sealed, otp_reference, state, code, reason,"
    " via, attempts, created_at, expires_at, next_attempt_at, finished_at, attempt_started,"
    " delivery, delivery_at, delivered_at, reported_at, dedupe_key"
    " FROM outbox WHERE state = 'pending' ORDER BY id"
)


class SqliteStore:
    def __init__(self, writer: GroupCommitWriter, path: Path, blocked: set[str]) -> None:
        self._writer = writer
        self.path = path
        # This process is the database's only writer, so the block list can be
        # answered from memory: every send checks it, without a thread hop.
        self._blocked = blocked

    # -- life cycle ----------------------------------------------------------
    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        writer = GroupCommitWriter(lambda: _connect(path), "otpd-store")
        await writer.start()
        try:
            rows = await writer.submit(
                lambda c: c.execute("SELECT receiver FROM blocklist").fetchall())
        except BaseException:
            await writer.stop()
            raise
        return cls(writer, path, {r[0] for r in rows})

    async def close(self) -> None:
        await self._writer.stop()

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the writer thread; returns once its batch is committed."""
        try:
            return await self._writer.submit(fn)
        except sqlite3.Error as exc:
            raise StoreError(_describe(exc)) from exc

    async def check_writable(self, *, local_only: bool = False) -> None:
        """A tiny real write, for readiness checks."""
        # A changed value: SQLite skips writing a row that an UPDATE leaves as
        # it was, so ``SET value = value`` would pass on a full disk.
        stamp = secrets.token_hex(8)
        await self._tx(lambda c: c.execute(
            "INSERT INTO meta (key, value) VALUES ('write_probe', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (stamp,)))

    # -- outbox and OTPs -----------------------------------------------------
    async def insert_message(
        self, msg: NewMessage, otp: NewOtp | None = None
    ) -> Inserted | Duplicate:
        """Store a message to send (and its OTP) atomically, unless it is a duplicate."""

        def run(c: sqlite3.Connection) -> Inserted | Duplicate:
            if otp is not None:
                if c.execute("SELECT 1 FROM otp WHERE reference = ?", (otp.reference,)).fetchone():
                    return Duplicate(kind="reference")
                c.execute(
                    "INSERT INTO otp (reference, receiver, salt, digest, created_at, expires_at,"
                    " attempts, state) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                    (
                        otp.reference,
                        otp.receiver,
                        otp.salt,
                        otp.digest,
                        otp.created_at,
                        otp.expires_at,
                        OtpState.ACTIVE.value,
                    ),
                )
            if msg.dedupe_key is not None:
                row = c.execute(_SELECT_BY_DEDUPE, (msg.dedupe_key,)).fetchone()
                if row is not None:
                    first = _message(row)
                    return Duplicate(kind="id", state=first.state, code=first.code)
            cur = c.execute(
                "INSERT INTO outbox (dedupe_key, command, channel, receiver, subject, sealed,"
                " otp_reference, state, attempts, created_at, expires_at, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                (
                    msg.dedupe_key,
                    msg.command,
                    msg.channel,
                    msg.receiver,
                    msg.subject,
                    msg.sealed,
                    msg.otp_reference,
                    msg.created_at,
                    msg.expires_at,
                    msg.created_at,
                ),
            )
            assert cur.lastrowid is not None
            return Inserted(cur.lastrowid)

        return await self._tx(run)

    async def duplicate_of(self, dedupe_key: str | None, reference: str | None
                           ) -> Duplicate | None:
        def run(c: sqlite3.Connection) -> Duplicate | None:
            if reference is not None and c.execute(
                "SELECT 1 FROM otp WHERE reference = ?", (reference,)
            ).fetchone():
                return Duplicate(kind="reference")
            if dedupe_key is not None:
                row = c.execute(_SELECT_BY_DEDUPE, (dedupe_key,)).fetchone()
                if row is not None:
                    first = _message(row)
                    return Duplicate(kind="id", state=first.state, code=first.code)
            return None

        return await self._tx(run)

    async def claim_id(self, dedupe_key: str) -> Duplicate | None:
        # One node: nothing is shared, a hand-over never leaves it.
        return await self.duplicate_of(dedupe_key, None)

    async def release_id(self, dedupe_key: str) -> None:
        return None

    async def pending_messages(self) -> list[MessageRow]:
        def run(c: sqlite3.Connection) -> list[MessageRow]:
            rows = c.execute(_SELECT_PENDING).fetchall()
            return [_message(r) for r in rows]

        return await self._tx(run)

    async def message(self, message_id: int) -> MessageRow | None:
        def run(c: sqlite3.Connection) -> MessageRow | None:
            row = c.execute(_SELECT_BY_ID, (message_id,)).fetchone()
            return _message(row) if row else None

        return await self._tx(run)

    async def recent_messages(self, states: Sequence[str], limit: int) -> list[MessageRow]:
        # Four placeholders in the query: each known state at most once.
        wanted = sorted({s for s in states if s in MESSAGE_STATES})

        def run(c: sqlite3.Connection) -> list[MessageRow]:
            rows = c.execute(
                _SELECT_RECENT, (*wanted, *[""] * (4 - len(wanted)), limit)
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._tx(run)

    async def mark_attempt(self, message_id: int, now: float) -> None:
        """Durably note that the message is being handed to a channel now."""
        await self._tx(
            lambda c: c.execute(
                "UPDATE outbox SET attempt_started = ? WHERE id = ?",
                (now, message_id),
            )
        )

    async def discard_message(self, message_id: int) -> None:
        """Forget a pending row that turned out to be another node's message
        (the shared store's id claim: otpd.store.redis_state)."""
        await self._tx(lambda c: c.execute(
            "DELETE FROM outbox WHERE id = ? AND state = 'pending'", (message_id,)))

    async def record_retry(
        self, message_id: int, attempts: int, next_attempt_at: float, reason: str
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, reason = ?,"
                " attempt_started = NULL WHERE id = ? AND state = 'pending'",
                (attempts, next_attempt_at, reason, message_id),
            )
        )

    async def finish_message(
        self,
        message_id: int,
        *,
        state: str,
        code: str,
        reason: str,
        via: str,
        attempts: int,
        now: float,
    ) -> Finished:
        """Make a message final and wipe its text. A request-otp whose message was
        not sent loses its OTP too, so the client may retry with the same reference."""

        def run(c: sqlite3.Connection) -> Finished:
            c.execute(
                "UPDATE outbox SET state = ?, code = ?, reason = ?, via = ?, attempts = ?,"
                " finished_at = ?, sealed = NULL WHERE id = ?",
                (state, code, reason, via, attempts, now, message_id),
            )
            row = c.execute(
                "SELECT otp_reference, dedupe_key FROM outbox WHERE id = ?", (message_id,)
            ).fetchone()
            finished = Finished(*row) if row else Finished(None, None)
            if state != "sent" and finished.otp_reference is not None:
                c.execute(
                    "DELETE FROM otp WHERE state = ? AND reference = ?",
                    (OtpState.ACTIVE.value, finished.otp_reference),
                )
            return finished

        return await self._tx(run)

    async def verify_otp(
        self,
        reference: str,
        now: float,
        matches: Callable[[OtpRecord], bool],
        max_attempts: int,
    ) -> VerifyResult:
        """Check a code atomically: success consumes the OTP, the last wrong try burns it."""

        def run(c: sqlite3.Connection) -> VerifyResult:
            row = c.execute(
                "SELECT reference, receiver, salt, digest, expires_at, attempts, state"
                " FROM otp WHERE reference = ?",
                (reference,),
            ).fetchone()
            if row is None:
                return VerifyResult.UNKNOWN
            record = OtpRecord(*row)
            step = verify_step(record.state, record.attempts, record.expires_at, now,
                               lambda: matches(record), max_attempts)
            if isinstance(step, VerifyResult):
                return step
            c.execute(
                "UPDATE otp SET attempts = ?, state = ? WHERE reference = ?",
                (step.attempts, step.state.value, reference),
            )
            return step.result

        return await self._tx(run)

    # -- SMS delivery reports --------------------------------------------------
    async def record_sms_parts(self, parts: Sequence[SmsPart]) -> None:
        """The parts of one message went out asking for reports: its delivery is
        ``sent``. A second send of the message replaces the first's parts."""
        if not parts:
            return
        message_id, sent_at = parts[0].message_id, max(p.sent_at for p in parts)
        if any(p.message_id != message_id for p in parts):
            raise ValueError("parts of one message only")

        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM sms_parts WHERE message_id = ?", (message_id,))
            c.executemany(
                "INSERT INTO sms_parts (message_id, part, parts, modem, sim, mr, receiver,"
                " sent_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(p.message_id, p.part, p.parts, p.modem, p.sim, p.mr, p.receiver, p.sent_at)
                 for p in parts])
            c.execute(
                "UPDATE outbox SET delivery = 'sent', delivery_at = ?, delivered_at = NULL,"
                " reported_at = NULL WHERE id = ?", (sent_at, message_id))

        await self._tx(run)

    async def apply_sms_report(self, report: SmsReport) -> SmsReportMatch | None:
        """Match a report to the newest unfinished part sent with its SIM and
        TP-MR to its recipient, update the part and the message's delivery:
        undeliverable when a part failed for good, delivered when every part
        was delivered (a later report may still turn ``unknown`` into either)."""
        part_status = PART_STATUS.get(report.outcome)
        if part_status is None:
            raise ValueError(f"report outcome: one of {', '.join(PART_STATUS)}")

        def run(c: sqlite3.Connection) -> SmsReportMatch | None:
            rows = c.execute(
                "SELECT message_id, part, modem, receiver FROM sms_parts"
                " WHERE sim = ? AND mr = ? AND status IN ('sent', 'trying') AND sent_at > ?"
                " ORDER BY sent_at DESC, message_id DESC LIMIT 50",
                (report.sim, report.mr, report.at - _REPORT_HORIZON)).fetchall()
            found = next((r for r in rows if receivers_match(r[3], report.recipient)), None)
            if found is None:
                return None
            message_id, part, modem, _ = found
            c.execute(
                "UPDATE sms_parts SET status = ?, tp_status = ?, reported_at = ?"
                " WHERE message_id = ? AND part = ?",
                (part_status, report.status, report.at, message_id, part))
            statuses = c.execute(
                "SELECT status, sent_at FROM sms_parts WHERE message_id = ?", (message_id,)
            ).fetchall()
            first_sent = min(r[1] for r in statuses)
            row = c.execute("SELECT delivery FROM outbox WHERE id = ?", (message_id,)).fetchone()
            current = row[0] if row else None
            verdict: str | None = None
            if any(r[0] == "failed" for r in statuses):
                verdict = "undeliverable"
            elif all(r[0] == "delivered" for r in statuses):
                verdict = "delivered"
            became_final = verdict is not None and current not in ("delivered", "undeliverable")
            if became_final:
                discharged = report.discharged if verdict == "delivered" else None
                c.execute(
                    "UPDATE outbox SET delivery = ?, delivery_at = ?, reported_at = ?,"
                    " delivered_at = ? WHERE id = ?",
                    (verdict, report.at, report.at, discharged, message_id))
            else:
                c.execute("UPDATE outbox SET reported_at = ? WHERE id = ?",
                          (report.at, message_id))
            delivery = verdict if became_final else (current or "sent")
            assert delivery is not None
            return SmsReportMatch(message_id, modem, report.sim, delivery, became_final,
                                  first_sent)

        return await self._tx(run)

    async def expire_sms_reports(self, sent_before: float, now: float) -> list[SmsUnreported]:
        """Messages still ``sent`` whose last part went before ``sent_before``:
        no final report came in time, their delivery becomes ``unknown``."""

        def run(c: sqlite3.Connection) -> list[SmsUnreported]:
            rows = c.execute(
                "SELECT o.id, min(p.modem), min(p.sim), max(p.sent_at) FROM outbox o"
                " JOIN sms_parts p ON p.message_id = o.id WHERE o.delivery = 'sent'"
                " GROUP BY o.id HAVING max(p.sent_at) < ?", (sent_before,)).fetchall()
            c.executemany(
                "UPDATE outbox SET delivery = 'unknown', delivery_at = ?"
                " WHERE id = ? AND delivery = 'sent'", [(now, r[0]) for r in rows])
            return [SmsUnreported(*r) for r in rows]

        return await self._tx(run)

    async def sms_outcomes(self, since: float) -> list[SmsOutcome]:
        """Final delivery states reached since ``since``, oldest first."""

        def run(c: sqlite3.Connection) -> list[SmsOutcome]:
            rows = c.execute(
                "SELECT p.modem, p.sim, o.delivery, o.delivery_at FROM outbox o"
                " JOIN sms_parts p ON p.message_id = o.id AND p.part = 1"
                " WHERE o.delivery IN (?, ?, ?) AND o.delivery_at >= ? ORDER BY o.delivery_at",
                (*FINAL_DELIVERY, since)).fetchall()
            return [SmsOutcome(*r) for r in rows]

        return await self._tx(run)

    async def hourly_activity(self, since: float) -> list[HourActivity]:
        """Sent and failed by ``finished_at``, delivered by ``delivery_at``, per hour."""

        def run(c: sqlite3.Connection) -> list[HourActivity]:
            rows: dict[tuple[int, str, str], list[int]] = {}
            for hour, channel, via, sent, failed in c.execute(
                    "SELECT CAST(finished_at / 3600 AS INTEGER) * 3600, channel,"
                    " coalesce(via, ''), sum(state = 'sent'), sum(state <> 'sent')"
                    " FROM outbox WHERE finished_at >= ? AND state <> 'pending'"
                    " GROUP BY 1, 2, 3", (since,)):
                rows[(hour, channel, via)] = [sent, failed, 0]
            for hour, channel, via, delivered in c.execute(
                    "SELECT CAST(delivery_at / 3600 AS INTEGER) * 3600, channel,"
                    " coalesce(via, ''), count(*) FROM outbox"
                    " WHERE delivery = 'delivered' AND delivery_at >= ? GROUP BY 1, 2, 3",
                    (since,)):
                rows.setdefault((hour, channel, via), [0, 0, 0])[2] = delivered
            return [HourActivity(h, ch, v, *n) for (h, ch, v), n in sorted(rows.items())]

        return await self._tx(run)

    # -- block list ----------------------------------------------------------
    async def block(self, receiver: str, now: float) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO blocklist (receiver, created_at) VALUES (?, ?)",
                (receiver, now),
            )
        )
        self._blocked.add(receiver)  # once durable

    async def unblock(self, receiver: str) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM blocklist WHERE receiver = ?", (receiver,)).rowcount > 0

        removed = await self._tx(run)
        self._blocked.discard(receiver)
        return removed

    async def blocked(self) -> list[str]:
        return sorted(self._blocked)

    async def rate_hit(
        self, limits: Sequence[RateLimit], now: float, *, record: bool = True
    ) -> float:
        def run(c: sqlite3.Connection) -> float:
            wait = 0.0
            for lim in limits:
                # Stamped in the future: the clock went back. Such an event counts
                # as happening now, so no window outlasts its length.
                c.execute("UPDATE rate_events SET at = ? WHERE key = ? AND at > ?",
                          (now, lim.key, now))
                since = now - lim.window
                if lim.member is not None and c.execute(
                    "SELECT 1 FROM rate_events WHERE key = ? AND member = ? AND at > ?",
                    (lim.key, lim.member, since),
                ).fetchone() is not None:
                    continue  # a member already counted costs nothing more
                (count,) = c.execute(
                    "SELECT count(*) FROM rate_events WHERE key = ? AND at > ?", (lim.key, since)
                ).fetchone()
                if count + 1 > lim.limit:
                    # Allowed again when enough of the oldest hits leave the window.
                    row = c.execute(
                        "SELECT at FROM rate_events WHERE key = ? AND at > ?"
                        " ORDER BY at LIMIT 1 OFFSET ?",
                        (lim.key, since, count - lim.limit),
                    ).fetchone()
                    oldest = row[0] if lim.limit > 0 and row else now
                    wait = max(wait, oldest + lim.window - now, 0.001)
            if wait > 0 or not record:
                return wait
            for lim in limits:
                member = lim.member if lim.member is not None else secrets.token_hex(8)
                c.execute(
                    "INSERT INTO rate_events (key, member, at) VALUES (?, ?, ?)"
                    " ON CONFLICT (key, member) DO UPDATE SET at = excluded.at",
                    (lim.key, member, now),
                )
            return 0.0

        return await self._tx(run)

    async def is_blocked(self, receiver: str) -> bool:
        return receiver in self._blocked

    # -- replay cache of signed commands ---------------------------------------
    async def claim_command(self, key: str, holder: str, now: float, claim_ttl: float
                            ) -> Claim:
        key, holder = command_key(key), check_holder(holder)
        now = check_time("now", now)
        expires_at = now + check_time("claim_ttl", claim_ttl, positive=True)

        def run(c: sqlite3.Connection) -> Claim:
            row = c.execute(
                "SELECT state, expires_at FROM seen_commands WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and row[1] > now:
                return Claim.SEEN if row[0] == "settled" else Claim.BUSY
            # Absent, or expired (a settled window that ended, or a claim whose
            # holder crashed): take it.
            c.execute(
                "INSERT INTO seen_commands (key, state, holder, expires_at)"
                " VALUES (?, 'pending', ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET state = 'pending',"
                " holder = excluded.holder, expires_at = excluded.expires_at",
                (key, holder, expires_at),
            )
            return Claim.NEW

        return await self._tx(run)

    async def settle_command(self, key: str, holder: str, until: float) -> None:
        key, holder = command_key(key), check_holder(holder)
        until = check_time("until", until)
        # Absent (a lapsed claim purged meanwhile) still settles: the command ran.
        # Another holder's row is left alone; a second settle never shortens it.
        await self._tx(lambda c: c.execute(
            "INSERT INTO seen_commands (key, state, holder, expires_at)"
            " VALUES (?, 'settled', ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET state = 'settled', expires_at ="
            " CASE WHEN state = 'settled' THEN max(expires_at, excluded.expires_at)"
            " ELSE excluded.expires_at END"
            " WHERE holder = excluded.holder",
            (key, holder, until),
        ))

    async def release_command(self, key: str, holder: str) -> None:
        key, holder = command_key(key), check_holder(holder)
        await self._tx(lambda c: c.execute(
            "DELETE FROM seen_commands WHERE key = ? AND holder = ? AND state = 'pending'",
            (key, holder),
        ))

    # -- housekeeping --------------------------------------------------------
    async def purge(self, otp_before: float, messages_before: float) -> tuple[int, int]:
        """Bulk-delete OTPs that expired before ``otp_before`` and final messages
        finished before ``messages_before``. Returns (otps, messages) deleted.
        Replay-cache entries go with the OTPs: ``otp_before`` is never after now,
        so no live claim or signature window is forgotten."""

        def run(c: sqlite3.Connection) -> tuple[int, int]:
            otps = c.execute("DELETE FROM otp WHERE expires_at < ?", (otp_before,)).rowcount
            # No limit window is longer than 31 days.
            c.execute("DELETE FROM rate_events WHERE at < ?", (otp_before - 31 * 86400,))
            c.execute("DELETE FROM seen_commands WHERE expires_at < ?", (otp_before,))
            msgs = c.execute(
                "DELETE FROM outbox WHERE state != 'pending' AND finished_at < ?",
                (messages_before,),
            ).rowcount
            if msgs:  # their sent parts go with them
                c.execute("DELETE FROM sms_parts WHERE message_id NOT IN (SELECT id FROM outbox)")
            return otps, msgs

        return await self._tx(run)

    async def counts(self) -> dict[str, int]:
        def run(c: sqlite3.Connection) -> dict[str, int]:
            out = {
                "otp": c.execute("SELECT count(*) FROM otp").fetchone()[0],
                "blocked": c.execute("SELECT count(*) FROM blocklist").fetchone()[0],
            }
            for state, n in c.execute("SELECT state, count(*) FROM outbox GROUP BY state"):
                out[f"outbox_{state}"] = n
            for delivery, n in c.execute(
                    "SELECT delivery, count(*) FROM outbox WHERE delivery IS NOT NULL"
                    " GROUP BY delivery"):
                out[f"sms_{delivery}"] = n
            return out

        return await self._tx(run)


def _create_private(path: Path) -> None:
    """Create the database file 0600 whatever the umask (it holds OTP hashes and
    sealed message text); SQLite gives its -wal and -shm files the same mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    _create_private(path)
    conn = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"store.path: {path} does not support WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _message(row: tuple[object, ...]) -> MessageRow:
    return MessageRow(*row)  # type: ignore[arg-type]


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "disk is full" in text or "disk I/O" in text:
        return f"store write failed: {text}"
    return f"store error: {text}"
