"""SIGKILL one of two nodes sharing a RabbitMQ queue mid-burst (issue #13).

Two otpd daemons run as subprocesses (``python -m otpd run``), each with its
own simulated modems on ptys (the simulators run in this process, so they
outlive a kill and keep what they sent), its own SQLite outbox, one Redis
store (``[store] backend = "redis"``, a unique ``redis_prefix``), one
``otp.key_file`` and ``[delivery] share_work = "on"``. A burst of ``send-sms``
is published to one queue (persistent messages, publisher confirms: a message
counts as accepted once RabbitMQ confirmed it), and node one is SIGKILLed at a
random moment (seeded RNG, printed) and started again after a short downtime.

* ``test_sigkill_mid_burst``: kills while both nodes take and send;
* ``test_sigkill_around_a_hand_over``: node one's modem is unplugged while it
  holds a backlog, so it hands what it holds back to the queue (``handover``
  commands) for node two; the kill lands while it does. Its modem comes back
  before or after its restart.

What must hold, for every accepted message:
* delivered (seen by a simulator), or it was short-lived and expired unsent
  (no node holds it pending); every long-lived one is delivered;
* never delivered after its expiration;
* delivered twice only where the kill landed inside its send: the restart logs
  "may have gone out already" for exactly those (as tests/faults/test_kill.py).

Run with ``-s`` to see the figures. ``OTPD_FAULT_SEED`` replays a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from otpd.delivery.handover import HANDOVER_PREFIX
from otpd.store.records import Duplicate, Inserted, NewMessage, NewOtp
from otpd.store.redis_state import RedisSharedStore
from tests.faults.helpers import outbox, tags_of_rows, uncertain_rows
from tests.support.brokers import command
from tests.support.cluster import NodeProcess, make_node, unique_names
from tests.support.mail import tag_of, tagged
from tests.support.publishers import AmqpPublisher
from tests.support.waiting import wait_until

pytestmark = pytest.mark.services

SEED = int(os.environ.get("OTPD_FAULT_SEED", "20240613"))
SMS_DELAY = 0.1  # s a simulated modem takes per SMS: kills land inside sends
LONG = 300  # s: outlives the test, so it must be delivered
SHORT = 4  # int(now) + SHORT: 3-4 s of life, which a burst and a downtime may outlast
LATE = SMS_DELAY + 0.6  # s: a send that began just before the expiry ends after it
EXPIRY_CODES = ("1101", "1203")
# Node one holds a backlog (5 s of sending) so that a hand-over takes a while.
ONE = 'share_work = "on"\nhorizon = 5.0\nhandover_after = 0.5\nprobe_after = 60\n'
TWO = 'share_work = "on"\nhorizon = 1.0\nhandover_after = 0.5\nprobe_after = 60\n'


@dataclass
class Message:
    tag: str
    expires: int
    accepted: bool = False


@dataclass
class Cluster:
    """Node one (killed), node two, their queue and what was published."""

    one: NodeProcess
    two: NodeProcess
    amqp: AmqpPublisher
    rng: random.Random
    messages: dict[str, Message] = field(default_factory=dict)
    waiting_for: str = ""

    @property
    def nodes(self) -> tuple[NodeProcess, NodeProcess]:
        return self.one, self.two

    async def publish(self, count: int, short_share: float) -> None:
        """The burst, one confirmed publish after the other."""
        for i in range(count):
            tag = f"b{i}"
            life = SHORT if self.rng.random() < short_share else LONG
            msg = Message(tag, int(time.time()) + life)
            self.messages[tag] = msg
            body = command("send-sms", {"id": tag, "receiver": f"+62812{i:08d}",
                                        "message": tagged(tag), "expiration": msg.expires})
            msg.accepted = await self.amqp.confirmed(body)

    def receipts(self) -> list[tuple[str, float]]:
        """(tag, wall time) of every SMS any simulator sent."""
        return [(tag_of(m.text) or "?", m.time) for node in self.nodes
                for sim in node.node.sims for m in sim.sent]

    def outboxes(self) -> dict[str, list[dict[str, Any]]]:
        return {"one": outbox(self.one.node.folder / "otpd.db"),
                "two": outbox(self.two.node.folder / "otpd.db")}

    async def settled(self) -> bool:
        """Every live accepted message delivered; nothing queued, pending or being
        stored. What is still missing is kept in ``waiting_for`` (for the failure)."""
        got = {tag for tag, _ in self.receipts()}
        now = time.time()
        missing = [m.tag for m in self.messages.values()
                   if m.accepted and m.expires > now + 1 and m.tag not in got]
        pending = {node: [(r["id"], r["dedupe_key"]) for r in rows if r["state"] == "pending"]
                   for node, rows in self.outboxes().items()}
        depth = await self.amqp.depth()
        held = {}
        for name, node in zip(("one", "two"), self.nodes, strict=True):
            status = await node.status()
            held[name] = (status["pending"], (status["intake"] or {}).get("storing"))
        self.waiting_for = (f"undelivered {missing[:10]} ({len(missing)}), pending rows"
                            f" {pending}, queue depth {depth}, (pending, storing) {held}")
        return not missing and not any(pending.values()) and not depth and not any(
            p or s for p, s in held.values())


@pytest.fixture
async def cluster(tmp_path: Path, rabbit_url: str, redis_url: str) -> AsyncIterator[Cluster]:
    print(f"\nshared-queue kill test: seed={SEED} (OTPD_FAULT_SEED replays it)")
    queue, prefix = unique_names()
    amqp = AmqpPublisher(rabbit_url, queue)
    await amqp.declare()  # nothing published before the nodes run is unroutable
    one = NodeProcess(make_node(tmp_path / "one", name="one", kind="amqp", topic=queue,
                                prefix=prefix, modems=2, delay=SMS_DELAY, delivery=ONE))
    two = NodeProcess(make_node(tmp_path / "two", name="two", kind="amqp", topic=queue,
                                prefix=prefix, modems=2, delay=SMS_DELAY, delivery=TWO))
    c = Cluster(one, two, amqp, random.Random(SEED))
    try:
        for node in c.nodes:  # one after the other: the first writes the shared key file
            for sim in node.node.sims:
                await sim.start()
            node.start()
            await node.wait_ready()
        yield c
    finally:
        for node in c.nodes:
            node.kill()
            for sim in node.node.sims:
                await sim.stop()
        await amqp.delete()
        await _forget(redis_url, prefix)


async def kill_and_restart(c: Cluster, down: float,
                           before_start: Callable[[], Awaitable[None]] | None = None,
                           modems: int | None = None) -> None:
    c.one.kill()
    await asyncio.sleep(down)  # the downtime: a kill timing, not a synchronisation
    if before_start is not None:
        await before_start()
    c.one.start()
    await c.one.wait_ready(modems=modems)


async def finish(c: Cluster) -> dict[str, Any]:
    """Wait until everything settled, stop both nodes cleanly, check what the
    user sees; returns the figures."""
    try:
        await wait_until(c.settled, 40, "every live accepted message delivered", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {c.waiting_for}") from None
    for node in c.nodes:
        assert await asyncio.to_thread(node.terminate) == 0, "no clean exit on SIGTERM"
    # Stopped: what either still held unacknowledged is back in the queue.
    assert await c.amqp.depth() == 0, "messages left in the queue"

    receipts = c.receipts()
    counts = Counter(tag for tag, _ in receipts)
    outboxes = c.outboxes()
    tags = tags_of_rows(outboxes)
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for name, rows in outboxes.items():
        for r in rows:
            tag = tags.get((name, r["id"]))
            if tag is not None:
                rows_of.setdefault(tag, []).append(r)
    accepted = [m for m in c.messages.values() if m.accepted]
    assert len(accepted) >= len(c.messages) * 0.9, "the publisher lost its broker"

    # Nothing arrives that nobody sent, nothing after its expiration.
    assert all(tag in c.messages for tag in counts), [t for t in counts if t not in c.messages]
    late = [(tag, round(at - c.messages[tag].expires, 3)) for tag, at in receipts
            if at > c.messages[tag].expires + LATE]
    assert not late, f"delivered after expiration (tag, seconds late): {late}"

    # Zero accepted messages lost: delivered, or short-lived and dropped at its expiry.
    lost, expired = [], 0
    now = time.time()
    for msg in accepted:
        if counts[msg.tag]:
            continue
        rows = rows_of.get(msg.tag, [])
        if msg.expires > now - 1 or any(r["state"] == "pending" for r in rows):
            lost.append((msg.tag, [(r["state"], r["via"]) for r in rows]))
            continue
        for r in rows:
            if r["state"] == "expired" or r["code"] in EXPIRY_CODES:
                assert r["finished_at"] >= r["expires_at"], ("dropped early", r)
        expired += 1
    assert not lost, f"accepted, never delivered, not expired: {lost}"

    # Resends only where a restart said a kill landed inside the send.
    uncertain: Counter[str] = Counter()
    for row_id, n in uncertain_rows(c.one.log_text()).items():
        uncertain[tags.get(("one", row_id), f"row{row_id}")] += n
    duplicates = {tag: n - 1 for tag, n in counts.items() if n > 1}
    unexplained = {tag: n for tag, n in duplicates.items() if uncertain[tag] < n}
    handed = [r for r in outboxes["one"] if r["via"] == "handover"]
    copies = {name: sum(1 for r in rows if r["state"] == "sent" and r["via"] != "handover"
                        and str(r["dedupe_key"] or "").startswith(HANDOVER_PREFIX))
              for name, rows in outboxes.items()}
    figures = {
        "accepted": len(accepted), "delivered": sum(1 for m in accepted if counts[m.tag]),
        "expired": expired, "duplicates": sum(duplicates.values()),
        "uncertain": sum(uncertain.values()),
        "split": [sum(len(s.sent) for s in n.node.sims) for n in c.nodes],
        "handed_back": len(handed), "copies_sent": copies,
        "starts": c.one.starts,
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    assert not unexplained, f"sent twice without a 'may have gone out' log line: {unexplained}"
    return figures


async def test_sigkill_mid_burst(cluster: Cluster) -> None:
    c = cluster
    rng = c.rng
    publishing = asyncio.create_task(c.publish(160, short_share=0.1))
    plan = []
    try:
        for _ in range(2):
            up, down = rng.uniform(0.2, 1.5), rng.uniform(0.2, 1.2)
            plan.append((round(up, 2), round(down, 2)))
            await asyncio.sleep(up)  # a random moment of the burst: the kill timing
            await kill_and_restart(c, down)
        await publishing
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
    print(f"kill points (up s, down s): {plan}")
    figures = await finish(c)
    assert figures["starts"] == 3


async def test_sigkill_around_a_hand_over(cluster: Cluster) -> None:
    c = cluster
    rng = c.rng
    # Small enough that the queue is drained by the time node one hands back.
    await c.publish(80, short_share=0.05)
    # Node one holds a backlog; then its modems are unplugged: after handover_after
    # it hands what it holds back, and the kill lands while it does.
    held = await wait_until(_holding(c.one, 12), 20, "node one holding a backlog")
    for sim in c.one.node.sims:
        sim.vanish()
    offset = c.one.log_offsets[-1]
    await wait_until(lambda: "handed back to the shared queue" in c.one.log_text()[offset:],
                     10, "node one handing back")
    after, down = rng.uniform(0.0, 0.15), rng.uniform(0.2, 1.0)
    back_first = rng.random() < 0.5  # its modems back before its restart, or later
    await asyncio.sleep(after)  # the kill timing, within the hand-over

    async def replug() -> None:
        for sim in c.one.node.sims:
            sim.reappear()

    await kill_and_restart(c, down, replug if back_first else None,
                           modems=None if back_first else 0)
    if not back_first:
        # Still unplugged: what it resumed is handed back again (the copies'
        # ids are stable: a second copy of one is refused as a duplicate).
        await asyncio.sleep(rng.uniform(0.5, 2.0))  # how long it stays unplugged
        await replug()
    print(f"held={held} kill {after:.3f} s after the first hand-over, down {down:.2f} s,"
          f" modems back {'before' if back_first else 'after'} the restart")
    figures = await finish(c)
    copies = figures["copies_sent"]
    assert figures["handed_back"] >= 1 and sum(copies.values()) >= 1, figures
    if not back_first:  # node one could not send them: the other node did
        assert copies["two"] >= 1, figures


def _holding(node: NodeProcess, count: int) -> Callable[[], Awaitable[int]]:
    async def check() -> int:
        pending = int((await node.status())["pending"])
        return pending if pending >= count else 0
    return check


# -- the two losses and the doubles this test found, each on its own ----------------------


async def _store(path: Path, prefix: str, redis_url: str) -> RedisSharedStore:
    return await RedisSharedStore.open(path, redis_url, prefix, 3600.0, 3600.0)


def _message(tag: str, created: float, dedupe: str | None = None) -> NewMessage:
    return NewMessage(command="send-sms", channel="sms", receiver="+6281200000001",
                      subject="", sealed=b"x", created_at=created, expires_at=created + 60,
                      dedupe_key=dedupe or f"{tag}|+6281200000001")


async def test_a_row_stored_before_a_kill_is_claimed_or_dropped_at_the_restart(
        tmp_path: Path, redis_url: str) -> None:
    """A kill between the local insert and the shared id claim: at the restart the
    row takes its id if nobody has it, else (the broker redelivered it to another
    node) it is dropped here. Before: the id was claimed first, and a kill in
    between had every node refuse the redelivery as a duplicate: lost."""
    _, prefix = unique_names()
    one = await _store(tmp_path / "one.db", prefix, redis_url)
    two = await _store(tmp_path / "two.db", prefix, redis_url)
    try:
        now = time.time()
        # What a kill leaves: the rows, no claims (inserted around the shared store).
        for tag in ("kept", "taken"):
            await one.outbox.insert_message(_message(tag, now))
        assert isinstance(await two.insert_message(_message("taken", now + 1)), Inserted)
        resumed = await one.pending_messages()
        assert [r.dedupe_key for r in resumed] == ["kept|+6281200000001"]
        assert isinstance(await two.insert_message(_message("kept", now + 2)), Duplicate)
        assert [r.dedupe_key for r in await two.pending_messages()] == ["taken|+6281200000001"]
    finally:
        await one.close()
        await two.close()
        await _forget(redis_url, prefix)


def _otp_message(reference: str, created: float) -> tuple[NewMessage, NewOtp]:
    msg = NewMessage(command="request-otp", channel="sms", receiver="+6281200000001",
                     subject="", sealed=b"x", created_at=created, expires_at=created + 60,
                     otp_reference=reference)
    return msg, NewOtp(reference, "+6281200000001", b"salt", b"digest", created, created + 60)


async def test_a_request_otp_stored_before_a_kill_is_not_refused_as_a_duplicate(
        tmp_path: Path, redis_url: str) -> None:
    """A kill between the local row and the shared OTP record: the broker's
    redelivery must create the OTP (not answer 1201 "reference already used"
    for an OTP nobody sends), and the restarted node drops its orphan row.
    Before: the OTP was created first, and a kill in between lost the OTP."""
    _, prefix = unique_names()
    one = await _store(tmp_path / "one.db", prefix, redis_url)
    two = await _store(tmp_path / "two.db", prefix, redis_url)
    try:
        now = time.time()
        orphan, _ = _otp_message("r-orphan", now)
        await one.outbox.insert_message(orphan, None)  # what a kill leaves: no OTP record
        mine, mine_otp = _otp_message("r-mine", now + 1)
        assert isinstance(await one.insert_message(mine, mine_otp), Inserted)
        # The redelivery of the orphan's command reaches the other node.
        again, again_otp = _otp_message("r-orphan", now + 2)
        assert isinstance(await two.insert_message(again, again_otp), Inserted)
        resumed = await one.pending_messages()
        assert [r.otp_reference for r in resumed] == ["r-mine"]
        assert [r.otp_reference for r in await two.pending_messages()] == ["r-orphan"]
        dup, dup_otp = _otp_message("r-mine", now + 3)
        assert await two.insert_message(dup, dup_otp) == Duplicate(kind="reference")
        assert [r.otp_reference for r in await two.pending_messages()] == ["r-orphan"]
    finally:
        await one.close()
        await two.close()
        await _forget(redis_url, prefix)


async def test_a_held_hand_over_id_refuses_the_copy_until_released(
        tmp_path: Path, redis_url: str) -> None:
    """A kill after a hand-over was published, before it was recorded: the
    restarted node holds the copy's id (the copy is refused as a duplicate) and
    sends the message itself; handing it over again releases the id first."""
    _, prefix = unique_names()
    one = await _store(tmp_path / "one.db", prefix, redis_url)
    two = await _store(tmp_path / "two.db", prefix, redis_url)
    key = f"{HANDOVER_PREFIX}7-123|+6281200000001"
    try:
        assert await one.claim_id(key) is None
        assert await one.claim_id(key) is None  # a second start of the same node
        copy = _message("", time.time(), dedupe=key)
        assert isinstance(await two.insert_message(copy), Duplicate)
        assert await two.pending_messages() == []  # nothing left of the refused copy
        await one.release_id(key)
        assert isinstance(await two.insert_message(copy), Inserted)
        await one.release_id(key)  # a stored message keeps its id
        assert isinstance(await one.claim_id(key), Duplicate)
    finally:
        await one.close()
        await two.close()
        await _forget(redis_url, prefix)


async def test_an_expired_send_command_is_answered_not_bounced(
        tmp_path: Path, rabbit_url: str, redis_url: str) -> None:
    """Two nodes with nothing to do: a send command that expired in the queue is
    refused (1203) and acknowledged. Before, each node passed it on as "too late
    here", and RabbitMQ gave it back at the head of the queue: it bounced between
    them for good, ahead of the live messages."""
    queue, prefix = unique_names()
    amqp = AmqpPublisher(rabbit_url, queue)
    await amqp.declare()
    nodes = [make_node(tmp_path / n, name=n, kind="amqp", topic=queue, prefix=prefix, modems=1,
                       delay=0.01, delivery=TWO) for n in ("a", "b")]
    try:
        for node in nodes:
            await node.start()
            await node.modems_ready()
        now = time.time()
        for i, life in enumerate((-5, 600)):
            assert await amqp.confirmed(command("send-sms", {
                "id": f"e{i}", "receiver": f"+62812{i:08d}", "message": tagged(f"e{i}"),
                "expiration": int(now) + life}))

        async def done() -> bool:
            return (sum(n.sent for n in nodes) == 1 and await amqp.depth() == 0
                    and sum(n.consumer()["received"] for n in nodes) >= 2
                    and not any(n.intake()["storing"] for n in nodes))

        await wait_until(done, 10, "both read, nothing held, the live one sent")
        assert sum(n.consumer()["received"] for n in nodes) == 2  # each read once
        assert sum(n.consumer()["handed_back"] for n in nodes) == 0
        assert [tag_of(t) for n in nodes for t in n.texts()] == ["e1"]
    finally:
        for node in nodes:
            await node.stop()
        await amqp.delete()
        await _forget(redis_url, prefix)


async def _forget(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis
    client = aioredis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
