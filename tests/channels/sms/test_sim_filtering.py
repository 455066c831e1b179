"""A SIM the network filters leaves the rotation: simulated modems, the real store.

Modem "b"'s SIM gets every report back failed (the simulator's ``reports``):
once both SIMs have the minimum sample, b is out of rotation with its reason
in the status, the good SIM takes all the work, a probe goes out when due, and
b comes back once its probes are delivered ("fixed": reports switched to
delivered). A lone SIM that looks filtered keeps sending, flagged. The pool's
clock is shifted to let probe intervals pass without waiting for them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from otpd.channels.sms.pool import ModemPool
from otpd.channels.sms.reports import DeliveryEvent
from otpd.channels.sms.sim_health import HealthSettings
from otpd.channels.sms.simulator import ModemSimulator
from otpd.delivery.channel import Delivered, Job
from otpd.metrics import Metrics
from otpd.store import SqliteStore
from tests.support.waiting import wait_until as eventually

from .conftest import FakeSource, fast_settings
from .test_delivery_reports import RECEIVER, final, outbox_row
from .test_sms_pool import Sims, pool_settings, running, until_ready

HEALTH = HealthSettings(min_sample=4, relative=0.5, floor=0.2, probe_interval=600.0,
                        max_probe_interval=3000.0, recover_probes=2)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "otpd.db")
    yield s
    await s.close()


class Clock:
    """Wall clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def modem(pool: ModemPool, name: str) -> dict[str, object]:
    return next(m for m in pool.status()["modems"] if m["name"] == name)


async def send(store: SqliteStore, source: FakeSource, n: int) -> list[Job]:
    """``n`` messages with outbox rows (the reports are matched to them)."""
    jobs = []
    for i in range(n):
        message_id = await outbox_row(store)
        # Long-lived: the test moves the pool's clock past probe intervals.
        job = source.add(RECEIVER, f"code {i}", lifetime=86400.0)
        assert job.id == message_id
        jobs.append(job)
    return jobs


async def all_final(store: SqliteStore, source: FakeSource, jobs: list[Job]) -> None:
    async def done() -> bool:
        return all([source.final(j) is not None and await final(store, j.id) is not None
                    for j in jobs])
    await eventually(done, what="every message sent and final")


def via(source: FakeSource, jobs: list[Job]) -> list[str]:
    out = []
    for job in jobs:
        outcome = source.final(job)
        assert isinstance(outcome, Delivered)
        out.append(outcome.via)
    return out


async def test_a_filtered_sim_leaves_the_rotation_and_comes_back(
        sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="delivered", report_delay=0.01, delay=0.02)
    b: ModemSimulator = await sims("b", reports="failed", report_delay=0.01, delay=0.02)
    clock = Clock()
    events: list[DeliveryEvent] = []
    from otpd.app.daemon import StoreReportStore

    pool = ModemPool(pool_settings(fast_settings("a", a.link), fast_settings("b", b.link),
                                   health=HEALTH),
                     reports=StoreReportStore(store), clock=clock, on_delivery=events.append)
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        # Until both SIMs have the minimum sample, both take work.
        while modem(pool, "b")["state"] != "filtered":
            await all_final(store, source, await send(store, source, 4))
            assert len(source.outcomes) < 80, "b never filtered"
        b_status = modem(pool, "b")
        assert str(b_status["state_reason"]).startswith("filtered: 0/")
        assert "other SIMs' 100%" in str(b_status["state_reason"])
        health = b_status["health"]
        assert isinstance(health, dict) and health["state"] == "filtered"
        assert health["judged"]["ratio"] == 0.0
        capacity = pool.capacity()
        assert capacity.ready == 1 and capacity.senders == 2  # the node takes less work
        assert pool.summary() == "1/2 modems ready, 1 filtered"
        metrics = Metrics()
        metrics.watch(lambda: {"channels": {"sms": pool.status()}})
        text = generate_latest(metrics.registry).decode()
        assert f'otpd_sim_health{{sim="{b.imsi}",state="filtered"}} 1.0' in text
        assert 'otpd_modem_state{modem="b",state="filtered"} 1.0' in text
        assert 'otpd_modem_up{modem="b"} 0.0' in text

        # Every later message goes through the good SIM, and is delivered.
        b_sent = len(b.sent)
        later = await send(store, source, 6)
        await all_final(store, source, later)
        assert via(source, later) == ["a"] * 6 and len(b.sent) == b_sent
        assert [await final(store, j.id) for j in later] == ["delivered"] * 6

        # The probe interval passes: one probe goes out through b, and fails.
        clock.offset += HEALTH.probe_interval
        jobs = await send(store, source, 4)
        await all_final(store, source, jobs)
        assert via(source, jobs).count("b") == 1  # one at a time
        await eventually(lambda: pool.health.get(b.imsi).failed_probes == 1,
                         what="the failed probe counted")
        assert modem(pool, "b")["state"] == "filtered"
        assert "probe not delivered" in str(modem(pool, "b")["state_reason"])

        # Fixed: the next probes (after the doubled interval) are delivered.
        b.reports = "delivered"
        clock.offset += 2 * HEALTH.probe_interval
        while modem(pool, "b")["state"] != "ready":
            await all_final(store, source, await send(store, source, 3))
            assert len(source.outcomes) < 200, "b never came back"
        assert "back in rotation" in str(modem(pool, "b")["health"]["reason"])  # type: ignore[index]
        assert pool.capacity().ready == 2
        # In rotation again: it takes work as before.
        again = await send(store, source, 8)
        await all_final(store, source, again)
        assert "b" in via(source, again)
    # Each final state went to on_delivery, with the modem that sent it.
    assert {e.modem for e in events} == {"a", "b"}
    assert {str(e.delivery) for e in events if e.modem == "a"} == {"delivered"}
    assert all(e.sent_at <= e.at for e in events)


async def test_a_lone_sim_keeps_sending_flagged(sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="failed", report_delay=0.01, delay=0.02)
    from otpd.app.daemon import StoreReportStore

    pool = ModemPool(pool_settings(fast_settings("a", a.link), health=HEALTH),
                     reports=StoreReportStore(store))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a")
        await all_final(store, source, await send(store, source, HEALTH.min_sample))
        await eventually(lambda: modem(pool, "a")["state"] == "flagged", what="flagged")
        assert "kept sending" in str(modem(pool, "a")["state_reason"])
        assert pool.capacity().ready == 1 and pool.usable()
        assert pool.summary() == "1/1 modem ready, 1 flagged"
        more = await send(store, source, 3)
        await all_final(store, source, more)
        assert via(source, more) == ["a"] * 3


async def test_a_filtered_sim_still_sends_when_the_others_are_down(
        sims: Sims, store: SqliteStore) -> None:
    a: ModemSimulator = await sims("a", reports="delivered", report_delay=0.01, delay=0.02)
    b: ModemSimulator = await sims("b", reports="failed", report_delay=0.01, delay=0.02)
    from otpd.app.daemon import StoreReportStore

    settings = pool_settings(fast_settings("a", a.link), fast_settings("b", b.link),
                             health=dataclasses.replace(HEALTH, probe_interval=3600.0))
    pool = ModemPool(settings, reports=StoreReportStore(store))
    source = FakeSource()
    async with running(pool, source):
        await until_ready(pool, "a", "b")
        while modem(pool, "b")["state"] != "filtered":
            await all_final(store, source, await send(store, source, 4))
            assert len(source.outcomes) < 80, "b never filtered"
        a.vanish()  # the good modem is unplugged
        await eventually(lambda: modem(pool, "a")["state"] == "down", what="a down")
        assert modem(pool, "b")["state"] == "flagged" and pool.capacity().ready == 1
        jobs = await send(store, source, 2)
        await eventually(lambda: all(source.final(j) for j in jobs), what="sent through b")
        assert via(source, jobs) == ["b", "b"]
