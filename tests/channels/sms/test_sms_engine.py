"""The modem pool under the real delivery engine and SQLite store, modems simulated on
real pseudo-terminals: what the daemon does between the outbox and the modems."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from otpd.channels.sms import pdu
from otpd.channels.sms.pool import ModemPool
from otpd.channels.sms.simulator import ModemSimulator
from otpd.delivery.channel import Job
from otpd.delivery.engine import DeliveryEngine, Result
from otpd.sealing import Sealer
from otpd.store import Inserted, NewMessage, SqliteStore

from .conftest import fast_settings
from .test_sms_pool import pool_settings, until_ready

Sims = Callable[..., Any]


class Outbox:
    """Messages go in as the service's send-sms does: stored (sealed), then submitted."""

    def __init__(self, store: SqliteStore, engine: DeliveryEngine, sealer: Sealer) -> None:
        self.store = store
        self.engine = engine
        self.sealer = sealer

    async def send(self, receiver: str, text: str, lifetime: float = 60.0) -> tuple[int, Result]:
        now = time.time()
        msg = NewMessage(command="send-sms", channel="sms", receiver=receiver, subject="",
                         sealed=self.sealer.seal(text, receiver), created_at=now,
                         expires_at=now + lifetime)
        inserted = await self.store.insert_message(msg)
        assert isinstance(inserted, Inserted)
        job = Job(id=inserted.id, channel="sms", receiver=receiver, subject="", text=text,
                  expires_at=msg.expires_at, attempts=0, created_at=now)
        result = await (await self.engine.submit(job))
        assert result is not None  # None only when the engine is shutting down
        return inserted.id, result


@asynccontextmanager
async def daemon_core(tmp_path: Path, pool: ModemPool) -> AsyncIterator[Outbox]:
    store = await SqliteStore.open(tmp_path / "otpd.db")
    sealer = Sealer(os.urandom(32))
    engine = DeliveryEngine(store, {"sms": pool}, sealer)
    await engine.start()
    try:
        yield Outbox(store, engine, sealer)
    finally:
        await engine.stop()  # bounded by itself, whatever a channel swallowed
        await store.close()


def texts_for(i: int) -> str:
    """Short and long, GSM 7-bit (with extension characters) and UCS-2 (with emoji)."""
    kinds = [
        f"Your OTP is {i:06d}",
        f"Kode {{{i}}} [berlaku] 5 menit ~ €0 | " + "panjang sekali " * 14,  # 2 GSM parts
        f"Ваш код {i}: " + "подтверждение " * 10,  # 3 UCS-2 parts
        f"Code {i} 😀👍🏽 " + "🎉 selamat " * 15,  # surrogate pairs across parts
        f"Line one {i}\nline two\r\n\"quoted\" and done",
    ]
    return kinds[i % len(kinds)]


async def test_concurrent_sends_over_three_modems(tmp_path: Path, sims: Sims) -> None:
    modems: list[ModemSimulator] = [
        await sims("a", delay=0.03),
        await sims("b", delay=0.03, store_sent=True),  # also sweeps its stored copies
        await sims("c", delay=0.03, profile="huawei", urc_during_submit=True),
    ]
    pool = ModemPool(pool_settings(*(fast_settings(m.name, m.link) for m in modems)))
    wanted = [(f"+6281{i:08d}", texts_for(i)) for i in range(30)]
    async with daemon_core(tmp_path, pool) as outbox:
        await until_ready(pool, "a", "b", "c")
        done = await asyncio.gather(*(outbox.send(r, t) for r, t in wanted))
        rows = [await outbox.store.message(message_id) for message_id, _ in done]
    assert [result.state for _, result in done] == ["sent"] * len(wanted)
    sent = [(m.receiver, m.text) for sim in modems for m in sim.sent]
    assert Counter(sent) == Counter(wanted)  # every text, each exactly once, intact
    by_modem = {sim.name: {(m.receiver, m.text) for m in sim.sent} for sim in modems}
    for (receiver, text), (_, result) in zip(wanted, done, strict=True):
        assert (receiver, text) in by_modem[result.via]  # the engine names the right modem
    assert all(len(sim.sent) >= 6 for sim in modems), [len(s.sent) for s in modems]
    for sim in modems:
        for m in sim.sent:  # reassembled from exactly the parts the codec makes
            assert m.parts == len(pdu.encode_submit(m.receiver, m.text))
    assert max(m.parts for sim in modems for m in sim.sent) == 3
    assert all(row is not None and row.state == "sent" and row.sealed is None for row in rows)
    for sim in modems:  # no send was refused or repeated (e.g. for a full storage)
        cmgs = sum(c.startswith("AT+CMGS=") for c in sim.commands)
        assert cmgs == sum(m.parts for m in sim.sent)


async def test_failover_and_expiry_through_the_engine(tmp_path: Path, sims: Sims) -> None:
    bad: ModemSimulator = await sims("bad")
    good: ModemSimulator = await sims("good", delay=0.02)
    bad.set_fault("error", code=38)
    pool = ModemPool(pool_settings(fast_settings("bad", bad.link, prefixes=("+62812",)),
                                   fast_settings("good", good.link)))
    async with daemon_core(tmp_path, pool) as outbox:
        await until_ready(pool, "bad", "good")
        message_id, result = await outbox.send("+628121234567", "routed to bad, sent by good")
        row = await outbox.store.message(message_id)
        good.vanish()  # now nothing can send: the message expires unsent
        await asyncio.sleep(0.1)
        _, late = await outbox.send("+628131234567", "never sent", lifetime=0.5)
    assert (result.state, result.via) == ("sent", "good")
    assert row is not None and row.attempts == 2  # one failed try on "bad", one on "good"
    assert late.state == "expired"  # dropped at its expiration, never sent
    assert [m.text for m in good.sent] == ["routed to bad, sent by good"] and bad.sent == []
