"""Delivery reports end to end: simulated modems, the pool, the real store.

The simulated network answers each part sent with TP-SRR as the SIM is set up
(delivered, failed, never); the pool records the parts in a SQLite store
through the daemon's adapter and the outbox row's ``delivery`` follows.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from otpd.app.control import ControlServer
from otpd.app.daemon import StoreReportStore
from otpd.channels.sms import pdu
from otpd.channels.sms.pool import ModemPool
from otpd.channels.sms.simulator import ModemSimulator, Stored
from otpd.channels.sms.simulator.model import STO_SENT
from otpd.delivery.channel import Delivered
from otpd.metrics import Metrics
from otpd.store import Inserted, NewMessage, SqliteStore
from tests.support.waiting import wait_until as eventually

from .conftest import FakeSource, fast_settings
from .test_sms_pool import Sims, pool_settings, running, until_ready

RECEIVER = "+628121234567"
LONG = "Your code is 123456. " * 10  # 210 characters: two parts


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "otpd.db")
    yield s
    await s.close()


async def outbox_row(store: SqliteStore, receiver: str = RECEIVER) -> int:
    """An outbox row whose id the FakeSource's next job gets (both count from 1)."""
    inserted = await store.insert_message(NewMessage(
        command="send-sms", channel="sms", receiver=receiver, subject="", sealed=b"x",
        created_at=0.0, expires_at=4e9))
    assert isinstance(inserted, Inserted)
    return inserted.id


async def delivery(store: SqliteStore, message_id: int) -> str | None:
    row = await store.message(message_id)
    return row.delivery if row else None


async def final(store: SqliteStore, message_id: int) -> str | None:
    state = await delivery(store, message_id)
    return state if state in ("delivered", "undeliverable", "unknown") else None


def sms_status(pool: ModemPool) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(json.dumps(pool.status()))  # as the control socket
    return status


async def test_delivered_single_and_concatenated(sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="delivered", report_delay=0.05)
    pool = ModemPool(pool_settings(fast_settings("a", a.link)), reports=StoreReportStore(store))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        short, long = await outbox_row(store), await outbox_row(store)
        jobs = [source.add(RECEIVER, "Your code is 1234"), source.add(RECEIVER, LONG)]
        assert [j.id for j in jobs] == [short, long]
        for message_id in (short, long):
            await eventually(lambda m=message_id: final(store, m),  # type: ignore[misc]
                             what="a final delivery state")
        assert await delivery(store, short) == "delivered"
        assert await delivery(store, long) == "delivered"
        status = sms_status(pool)
    assert len(a.status_reports) == 3  # one per part: every part asked for a report
    (modem,) = status["modems"]
    assert modem["delivery_reports"] == "direct" and a.cnmi_ds == 1
    assert modem["delivery"]["delivered"] == 2 and modem["delivery"]["delivered_ratio"] == 1.0
    assert status["sims"][a.imsi]["total"] == 2
    assert {(r["status"], r["count"]) for r in status["reports"]} == {("delivered", 3)}
    (hist,) = status["time_to_deliver"]
    assert hist["count"] == 2 and hist["modem"] == "a" and hist["sim"] == a.imsi
    row = await store.message(long)
    assert row is not None and row.delivered_at is not None and row.reported_at is not None
    # /metrics exports what the status holds.
    metrics = Metrics()
    metrics.watch(lambda: {"channels": {"sms": status}})
    text = generate_latest(metrics.registry).decode()
    assert f'otpd_sms_reports_total{{modem="a",sim="{a.imsi}",status="delivered"}} 3.0' in text
    assert f'otpd_sms_deliveries_total{{delivery="delivered",modem="a",sim="{a.imsi}"}} 2.0' \
        in text
    assert f'otpd_sms_time_to_deliver_seconds_count{{modem="a",sim="{a.imsi}"}} 2.0' in text
    assert f'otpd_sim_delivered_ratio{{sim="{a.imsi}"}} 1.0' in text


async def test_permanent_error_makes_it_undeliverable(sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="failed")
    pool = ModemPool(pool_settings(fast_settings("a", a.link)), reports=StoreReportStore(store))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        message_id = await outbox_row(store)
        job = source.add(RECEIVER, LONG)
        await eventually(lambda: final(store, message_id), what="a final delivery state")
        # The answer to the client does not change: handed to the network.
        assert isinstance(source.final(job), Delivered)
        status = sms_status(pool)
    assert await delivery(store, message_id) == "undeliverable"
    assert status["modems"][0]["delivery"]["undeliverable"] == 1
    assert {r["status"] for r in status["reports"]} == {"failed"}  # TP-ST 0x41
    # The control socket's outbox answer carries it (no service needed to read).
    control = ControlServer(Path("/nonexistent"), None, store, lambda: {})  # type: ignore[arg-type]
    answer = await control.handle(b'{"op": "outbox", "states": ["pending", "sent"]}')
    (msg,) = answer["messages"]
    assert msg["delivery"] == "undeliverable" and msg["delivered_at"] is None


async def test_no_report_in_time_is_unknown(sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="never")
    pool = ModemPool(pool_settings(fast_settings("a", a.link), report_timeout=0.3),
                     reports=StoreReportStore(store))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        message_id = await outbox_row(store)
        source.add(RECEIVER, "nobody answers")
        await eventually(lambda: delivery(store, message_id), what="sent")
        await eventually(lambda: pool.status()["modems"][0]["delivery"]["unknown"] == 1,
                         what="unknown in the SIM's statistics")
    assert await delivery(store, message_id) == "unknown"
    assert a.status_reports == []


async def test_stored_reports_are_read_and_deleted_never_unread_sms(
        sims: Sims, store: SqliteStore) -> None:
    # A modem that takes only ds=2 (AT+CNMI=2,1,0,1,0 refused): reports are stored
    # and announced with +CDSI.
    a: ModemSimulator = await sims("a", report_ds=(0, 2), store_sent=True)
    pool = ModemPool(pool_settings(fast_settings("a", a.link)), reports=StoreReportStore(store))
    source = FakeSource()
    unread = a.inject_incoming("+628129999999", "hello")  # never to be touched
    async with running(pool, source):
        await until_ready(pool, "a")
        assert pool.status()["modems"][0]["delivery_reports"] == "stored" and a.cnmi_ds == 2
        message_id = await outbox_row(store)
        source.add(RECEIVER, LONG)
        await eventually(lambda: final(store, message_id), what="a final delivery state")
        assert await delivery(store, message_id) == "delivered"
        await eventually(lambda: len(a.storage) == 1, what="reports and sent copies deleted")
    assert a.storage[unread].stat == 0  # still REC UNREAD
    assert any(c.startswith("AT+CMGR=") for c in a.commands)


async def test_stored_report_already_read_is_swept(sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", report_ds=(0, 2), store_sent=True)
    pool = ModemPool(pool_settings(fast_settings("a", a.link)), reports=StoreReportStore(store))
    source = FakeSource()
    now = datetime.now(UTC)
    # A report a previous run read but did not delete (REC READ), and a read SMS.
    a.storage[29] = Stored(1, pdu.encode_status_report(9, RECEIVER, now, now, 0))
    read_sms = a.inject_incoming("+628129999999", "read before")
    a.storage[read_sms].stat = 1
    a.store_submit(RECEIVER, "old copy", STO_SENT)
    async with running(pool, source):
        await until_ready(pool, "a")
        await eventually(lambda: 29 not in a.storage, what="the read report deleted")
        await eventually(lambda: pool.status()["reports_unmatched"] == 1,
                         what="the report seen (nothing of ours had MR 9)")
    assert list(a.storage) == [read_sms]  # a received message stays, read or not


async def test_reports_off_by_setting_or_when_the_modem_takes_no_cnmi(
        sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a")
    b: ModemSimulator = await sims("b", report_ds=(0,))
    pool = ModemPool(pool_settings(fast_settings("a", a.link, delivery_reports=False),
                                   fast_settings("b", b.link)),
                     reports=StoreReportStore(store))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        modes = {m["name"]: m["delivery_reports"] for m in pool.status()["modems"]}
        assert modes == {"a": "off", "b": "off"}
        ids = [await outbox_row(store), await outbox_row(store)]
        jobs = [source.add(RECEIVER, "one"), source.add(RECEIVER, "two")]
        await eventually(lambda: all(source.final(j) for j in jobs), what="both sent")
    assert a.status_reports == [] and b.status_reports == []  # no TP-SRR asked
    assert [await delivery(store, i) for i in ids] == [None, None]
    assert not any(c.startswith("AT+CNMI") for c in a.commands)


async def test_report_after_a_restart_still_matches(sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="never")
    settings = pool_settings(fast_settings("a", a.link))
    source = FakeSource()
    first = ModemPool(settings, reports=StoreReportStore(store))
    async with running(first, source):
        await until_ready(first, "a")
        message_id = await outbox_row(store)
        job = source.add(RECEIVER, "before the restart")
        await eventually(lambda: delivery(store, message_id), what="sent")
    outcome = source.final(job)
    assert isinstance(outcome, Delivered) and outcome.detail.startswith("mr=")
    mr = int(outcome.detail.removeprefix("mr="))
    second = ModemPool(settings, reports=StoreReportStore(store))
    async with running(second, FakeSource()):
        await until_ready(second, "a")
        now = datetime.now(UTC)
        report = pdu.encode_status_report(mr, "08121234567", now, now, 0x00)  # national form
        a.emit_urc(f"+CDS: {len(report) // 2 - 1}\r\n{report}")
        await eventually(lambda: second.status()["modems"][0]["delivery"]["delivered"] == 1,
                         what="the late report counted")
    assert await delivery(store, message_id) == "delivered"
