"""SMS delivery reports in the store: sent parts, matching, delivery states, purge.

Run against both backends (the ``store`` fixture): with Redis the outbox and
so these rows stay in the node's SQLite file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from otpd.store import Inserted, NewMessage, SmsPart, SmsReport, SqliteStore, Store
from otpd.store.migrations import MIGRATIONS, migrate
from otpd.store.records import receivers_match

RECEIVER = "+628121234567"


async def new_message(store: Store, receiver: str = RECEIVER) -> int:
    inserted = await store.insert_message(NewMessage(
        command="send-sms", channel="sms", receiver=receiver, subject="", sealed=b"x",
        created_at=1000.0, expires_at=5000.0))
    assert isinstance(inserted, Inserted)
    return inserted.id


def parts(message_id: int, mrs: list[int], *, sim: str = "510100000000001",
          modem: str = "m1", receiver: str = RECEIVER, sent_at: float = 1000.0
          ) -> list[SmsPart]:
    return [SmsPart(message_id, i, len(mrs), modem, sim, mr, receiver, sent_at + i)
            for i, mr in enumerate(mrs, start=1)]


def report(mr: int, outcome: str = "delivered", *, status: int = 0, at: float = 1010.0,
           recipient: str = RECEIVER, sim: str = "510100000000001") -> SmsReport:
    return SmsReport(sim, mr, recipient, outcome, status, at, discharged=at - 1)


async def test_single_part_delivered(store: Store) -> None:
    mid = await new_message(store)
    await store.record_sms_parts(parts(mid, [7]))
    row = await store.message(mid)
    assert row is not None and row.delivery == "sent" and row.delivery_at == 1001.0
    assert row.state == "pending"  # the wire state is the engine's, untouched

    match = await store.apply_sms_report(report(7, at=1012.0))
    assert match is not None
    assert (match.message_id, match.modem, match.delivery, match.became_final) == (
        mid, "m1", "delivered", True)
    assert match.first_sent_at == 1001.0
    row = await store.message(mid)
    assert row is not None and row.delivery == "delivered"
    assert (row.delivery_at, row.reported_at, row.delivered_at) == (1012.0, 1012.0, 1011.0)
    # The same report again matches nothing: the part is final.
    assert await store.apply_sms_report(report(7, at=1013.0)) is None


async def test_concatenated_delivered_when_every_part_is(store: Store) -> None:
    mid = await new_message(store)
    await store.record_sms_parts(parts(mid, [10, 11, 12]))
    first = await store.apply_sms_report(report(11))
    trying = await store.apply_sms_report(report(10, "trying", status=0x21))
    assert first is not None and (first.delivery, first.became_final) == ("sent", False)
    assert trying is not None and trying.delivery == "sent"
    # A part still "trying" can report again, and then be delivered.
    again = await store.apply_sms_report(report(10, at=1020.0))
    assert again is not None and again.delivery == "sent"
    last = await store.apply_sms_report(report(12, at=1030.0))
    assert last is not None and (last.delivery, last.became_final) == ("delivered", True)


async def test_one_permanent_error_makes_the_message_undeliverable(store: Store) -> None:
    mid = await new_message(store)
    await store.record_sms_parts(parts(mid, [20, 21]))
    failed = await store.apply_sms_report(report(21, "failed", status=0x41))
    assert failed is not None and (failed.delivery, failed.became_final) == (
        "undeliverable", True)
    later = await store.apply_sms_report(report(20))
    assert later is not None and (later.delivery, later.became_final) == ("undeliverable", False)
    row = await store.message(mid)
    assert row is not None and row.delivery == "undeliverable" and row.delivered_at is None


async def test_match_needs_sim_mr_and_receiver_and_prefers_the_newest(store: Store) -> None:
    old = await new_message(store)
    new = await new_message(store)
    other = await new_message(store, "+628129999999")
    await store.record_sms_parts(parts(old, [5], sent_at=100.0))
    await store.record_sms_parts(parts(new, [5], sent_at=900.0))  # the MR wrapped round
    await store.record_sms_parts(parts(other, [6], receiver="+628129999999"))
    assert await store.apply_sms_report(report(5, sim="another SIM")) is None
    assert await store.apply_sms_report(report(6)) is None  # MR 6 went to someone else
    match = await store.apply_sms_report(report(5, recipient="08121234567"))  # national form
    assert match is not None and match.message_id == new
    match = await store.apply_sms_report(report(5))
    assert match is not None and match.message_id == old


async def test_unknown_after_the_timeout_and_a_late_report_still_counts(store: Store) -> None:
    done = await new_message(store)
    quiet = await new_message(store)
    recent = await new_message(store)
    await store.record_sms_parts(parts(done, [1]))
    await store.record_sms_parts(parts(quiet, [2, 3]))
    await store.record_sms_parts(parts(recent, [4], sent_at=4000.0))
    await store.apply_sms_report(report(1))
    expired = await store.expire_sms_reports(sent_before=3600.0, now=4600.0)
    assert [(e.message_id, e.modem, e.sent_at) for e in expired] == [(quiet, "m1", 1002.0)]
    row = await store.message(quiet)
    assert row is not None and (row.delivery, row.delivery_at) == ("unknown", 4600.0)
    assert await store.expire_sms_reports(sent_before=3600.0, now=4700.0) == []
    await store.apply_sms_report(report(2, at=4800.0))
    late = await store.apply_sms_report(report(3, at=4801.0))
    assert late is not None and (late.delivery, late.became_final) == ("delivered", True)
    outcomes = await store.sms_outcomes(since=0.0)
    assert [(o.sim, o.delivery) for o in outcomes] == [
        ("510100000000001", "delivered"), ("510100000000001", "delivered")]
    assert await store.sms_outcomes(since=4801.5) == []
    counts = await store.counts()
    assert counts["sms_delivered"] == 2 and counts["sms_sent"] == 1


async def test_resend_replaces_the_parts(store: Store) -> None:
    mid = await new_message(store)
    await store.record_sms_parts(parts(mid, [30, 31]))
    await store.record_sms_parts(parts(mid, [40, 41], modem="m2"))
    assert await store.apply_sms_report(report(30)) is None
    match = await store.apply_sms_report(report(40))
    assert match is not None and match.modem == "m2"


async def test_parts_are_purged_with_their_message(store: Store) -> None:
    mid = await new_message(store)
    await store.record_sms_parts(parts(mid, [50]))
    await store.finish_message(mid, state="sent", code="0000", reason="", via="m1",
                               attempts=1, now=1001.0)
    assert await store.purge(otp_before=0.0, messages_before=2000.0) == (0, 1)
    assert await store.apply_sms_report(report(50)) is None


async def test_bad_outcome_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="outcome"):
        await store.apply_sms_report(report(1, "lost"))


async def test_migration_6_keeps_rows_and_the_state_check(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    for step, script in enumerate(MIGRATIONS[1:5], start=2):
        conn.executescript(f"BEGIN;\n{script}\nUPDATE meta SET value = '{step}';\nCOMMIT;")
    conn.execute(
        "INSERT INTO outbox (command, channel, receiver, state, created_at, expires_at,"
        " next_attempt_at, finished_at) VALUES ('send-sms', 'sms', ?, 'sent', 1, 2, 1, 2)",
        (RECEIVER,))
    assert migrate(conn) == len(MIGRATIONS) == 6
    assert conn.execute("SELECT state, delivery FROM outbox").fetchall() == [("sent", None)]
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE outbox SET delivery = 'lost'")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE outbox SET state = 'delivered'")  # the wire states stay four
    conn.close()
    store = await SqliteStore.open(path)
    try:
        (row,) = await store.recent_messages(["sent"], 10)
        assert row.delivery is None
    finally:
        await store.close()


@pytest.mark.parametrize(("sent", "reported", "same"), [
    ("+628121234567", "+628121234567", True),
    ("+628121234567", "628121234567", True),  # TON unknown: no "+"
    ("+628121234567", "08121234567", True),  # national
    ("+628121234567", "+628121234568", False),
    ("+62812", "62812", True),  # short numbers compare whole
    ("+62812", "+2812", False),
    ("+628121234567", "", False),
])
def test_receivers_match(sent: str, reported: str, same: bool) -> None:
    assert receivers_match(sent, reported) is same
