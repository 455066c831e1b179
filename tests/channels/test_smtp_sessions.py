"""The email channel's session pool against real SMTP servers (aiosmtpd): sessions
reused (counted at the server), PIPELINING (counted in round trips), sessions that
die idle or mid-stream, provider refusals that rest an account and fail over, TLS
with a test CA, authentication, and the caps kept in the store."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from email import policy
from pathlib import Path
from typing import Any

import pytest

from otpd.channels.email import SmtpChannel, build_message, render_message
from otpd.channels.email_settings import SmtpAccount
from otpd.channels.smtp_rules import Rests
from otpd.delivery.channel import Delivered, Failed, Job, Outcome, Retry
from otpd.email_quota import EmailQuota
from otpd.store import SqliteStore
from tests.support.daemon import free_port
from tests.support.mail import (
    LatencyProxy,
    ProviderServer,
    ProviderSink,
    make_test_ca,
    server_tls,
    tagged,
)
from tests.support.waiting import wait_until

RCPT = "user@example.org"


def account(port: int, name: str = "primary", **changes: Any) -> SmtpAccount:
    base = SmtpAccount(name=name, host="127.0.0.1", port=port, security="none", username="",
                       password="", sender="OTP <otp@example.com>", timeout=5.0,
                       validate_certs=True, helo_name="otpd.test")
    return dataclasses.replace(base, **changes)


_ids = iter(range(1, 10**6))


def job(tag: str) -> Job:
    now = time.time()
    return Job(id=next(_ids), channel="email", receiver=RCPT, subject="Your code",
               text=tagged(tag, "Your OTP is 123456"), expires_at=now + 60, attempts=0,
               created_at=now)


def channel(*accounts: SmtpAccount, quota: Any = None) -> SmtpChannel:
    return SmtpChannel(accounts, workers=1, retry_base=0.1, retry_max=0.2, quota=quota)


@pytest.fixture
def provider() -> Iterator[Callable[..., ProviderServer]]:
    servers: list[ProviderServer] = []

    def start(sink: ProviderSink | None = None, **kwargs: Any) -> ProviderServer:
        server = ProviderServer(sink or ProviderSink(), free_port(), **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def closing() -> AsyncIterator[list[SmtpChannel]]:
    """Channels whose sessions are closed after the test."""
    channels: list[SmtpChannel] = []
    yield channels
    for ch in channels:
        await asyncio.gather(*(p.close_all() for p in ch.pools))


async def send_all(ch: SmtpChannel, tags: list[str], concurrency: int) -> list[Outcome]:
    limit = asyncio.Semaphore(concurrency)

    async def one(tag: str) -> Outcome:
        async with limit:
            return await ch.deliver(job(tag))

    return list(await asyncio.gather(*(one(t) for t in tags)))


@pytest.mark.parametrize("pipelining", [True, False])
async def test_many_messages_go_through_few_sessions(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        pipelining: bool) -> None:
    server = provider(ProviderSink(pipelining=pipelining))
    ch = channel(account(server.port, max_sessions=3))
    closing.append(ch)
    tags = [f"m{i}" for i in range(60)]
    outcomes = await send_all(ch, tags, concurrency=10)
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert sorted(server.sink.tags()) == sorted(tags)  # each once
    assert server.sessions.opened <= 3, server.sessions.opened
    pool = ch.pools[0]
    assert pool.connections == server.sessions.opened
    assert pool.pipelining is pipelining
    assert ch.status()["accounts"][0]["sessions"]["max"] == 3


@pytest.mark.parametrize(("pipelining", "turns"), [(True, 2), (False, 4)])
async def test_round_trips_per_message(provider: Callable[..., ProviderServer],
                                       closing: list[SmtpChannel], pipelining: bool,
                                       turns: int) -> None:
    # Pipelined: RSET, MAIL, RCPT, DATA in one write, then the message: two round
    # trips. One command at a time: MAIL, RCPT, DATA, the message: four.
    server = provider(ProviderSink(pipelining=pipelining))
    proxy = LatencyProxy(server.port, delay=0.002)
    await proxy.start()
    try:
        ch = channel(account(proxy.port, max_sessions=1))
        closing.append(ch)
        assert isinstance(await ch.deliver(job("first")), Delivered)  # opens the session
        before = proxy.turns
        for i in range(5):
            assert isinstance(await ch.deliver(job(f"n{i}")), Delivered)
        assert proxy.turns - before == 5 * turns
        assert proxy.connections == 1
    finally:
        await proxy.stop()


async def test_a_session_sends_at_most_max_messages(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel]) -> None:
    server = provider()
    ch = channel(account(server.port, max_sessions=1, max_messages_per_session=5))
    closing.append(ch)
    for i in range(12):
        assert isinstance(await ch.deliver(job(f"c{i}")), Delivered)
    assert server.sessions.opened == 3  # 5 + 5 + 2
    await wait_until(lambda: server.sessions.closed >= 2, 5, "retired sessions closed")


async def test_a_session_the_server_closed_while_idle_is_replaced(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel]) -> None:
    server = provider(idle_timeout=0.3)
    ch = channel(account(server.port, max_sessions=1))
    closing.append(ch)
    assert isinstance(await ch.deliver(job("before")), Delivered)
    await wait_until(lambda: server.sessions.closed == 1, 5, "the server to close the session")
    outcome = await ch.deliver(job("after"))
    assert isinstance(outcome, Delivered), outcome
    assert sorted(server.sink.tags()) == ["after", "before"]
    assert server.sessions.opened == 2
    assert not ch.pools[0].resting(time.monotonic())


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_session_dropped_mid_stream_loses_nothing(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        pipelining: bool) -> None:
    sink = ProviderSink(pipelining=pipelining)
    sink.drop_every = 4  # the server takes every 4th message, then drops the session
    server = provider(sink)
    ch = channel(account(server.port, max_sessions=2))
    closing.append(ch)
    tags = [f"d{i}" for i in range(30)]
    outcomes = await send_all(ch, tags, concurrency=4)
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    got = collections.Counter(sink.tags())
    assert set(got) == set(tags)  # nothing lost
    doubled = sum(n - 1 for n in got.values())
    assert sink.dropped > 0
    # Only a message in flight when its session died can come twice.
    assert doubled <= sink.dropped, (doubled, sink.dropped)
    assert ch.pools[0].reconnects >= 1


@pytest.mark.parametrize(("reply", "rest"), [
    ("421 4.7.0 Try again later, closing connection.", 60),
    ("452 4.3.1 Insufficient system resources", 60),
    ("451 4.7.1 Rate limit exceeded", 60),
    ("550 5.4.5 Daily user sending quota exceeded.", 3600),
])
async def test_a_quota_reply_rests_the_account_and_the_next_one_sends(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        reply: str, rest: float) -> None:
    first, second = provider(), provider()
    first.sink.mail_replies = [reply]
    ch = channel(account(first.port), account(second.port, name="backup"))
    closing.append(ch)
    outcome = await ch.deliver(job("q1"))
    assert outcome == Delivered(via="backup")
    primary = ch.pools[0]
    now = time.monotonic()
    assert primary.resting(now)
    assert rest - 5 < primary.rest_left(now) <= rest
    assert reply[:3] in primary.rest_reason
    # While it rests, nothing more is offered to it: the backup takes the next ones.
    for i in range(3):
        assert await ch.deliver(job(f"q{i + 2}")) == Delivered(via="backup")
    assert len(first.sink.mail_froms) == 1
    assert first.sink.tags() == [] and sorted(second.sink.tags()) == ["q1", "q2", "q3", "q4"]
    status = ch.status()["accounts"][0]
    assert status["resting"] and status["rests"] == 1 and reply[:3] in status["rest_reason"]
    assert ch.summary() == "smtp 1/2 ok"


async def test_every_account_resting_puts_the_job_back_saying_why(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel]) -> None:
    server = provider()
    server.sink.mail_replies = ["421 4.7.0 Too many messages, try again in 30 seconds"]
    ch = channel(account(server.port))
    closing.append(ch)
    outcome = await ch.deliver(job("r"))
    assert isinstance(outcome, Retry), outcome
    assert "421" in outcome.reason
    assert 29 < outcome.delay <= 36  # when the rest ends (with jitter)
    assert not ch.usable()
    cap = ch.capacity()
    assert cap.ready == 0 and "resting" in cap.reason
    outcome = await ch.deliver(job("r2"))  # not even tried on the resting account
    assert isinstance(outcome, Retry) and "resting" in outcome.reason
    assert len(server.sink.mail_froms) == 1


async def test_a_refused_recipient_fails_for_good_and_the_account_keeps_sending(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel]) -> None:
    server = provider()
    server.sink.reject_with = "550 5.1.1 No such user"
    ch = channel(account(server.port))
    closing.append(ch)
    outcome = await ch.deliver(job("x"))
    assert isinstance(outcome, Failed) and "550" in outcome.reason, outcome
    assert ch.usable() and not ch.pools[0].resting(time.monotonic())
    server.sink.reject_with = None
    assert isinstance(await ch.deliver(job("y")), Delivered)
    assert server.sessions.opened == 1  # the session survived the refusal (RSET)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_tls_with_a_test_ca_and_a_login(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        test_ca: tuple[Path, Path], security: str) -> None:
    cert, key = test_ca
    tls = server_tls(cert, key)
    server = provider(logins={"otp": "secret"},
                      **({"starttls": tls} if security == "starttls" else {"implicit_tls": tls}))
    ch = channel(account(server.port, security=security, ca_file=str(cert), username="otp",
                         password="secret", max_sessions=1))
    closing.append(ch)
    for i in range(3):
        assert isinstance(await ch.deliver(job(f"t{i}")), Delivered)
    assert server.sessions.opened == 1  # one TLS handshake and login for the three
    assert sorted(server.sink.tags()) == ["t0", "t1", "t2"]


async def test_a_certificate_not_trusted_rests_the_account(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        test_ca: tuple[Path, Path]) -> None:
    cert, key = test_ca
    tls_server = provider(starttls=server_tls(cert, key))
    backup = provider()
    ch = channel(account(tls_server.port, security="starttls"),  # system CAs only
                 account(backup.port, name="backup"))
    closing.append(ch)
    assert await ch.deliver(job("c")) == Delivered(via="backup")
    primary = ch.pools[0]
    assert primary.resting(time.monotonic())
    assert "TLS" in primary.rest_reason and "certificate" in primary.rest_reason
    assert tls_server.sink.mail_froms == []


async def test_a_failed_login_rests_the_account_with_a_clear_error(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        caplog: pytest.LogCaptureFixture) -> None:
    server = provider(logins={"otp": "right"})
    backup = provider()
    ch = channel(account(server.port, username="otp", password="wrong"),
                 account(backup.port, name="backup"))
    closing.append(ch)
    with caplog.at_level(logging.WARNING):
        assert await ch.deliver(job("a1")) == Delivered(via="backup")
        assert await ch.deliver(job("a2")) == Delivered(via="backup")
    primary = ch.pools[0]
    assert primary.resting(time.monotonic())
    assert primary.rest_reason.startswith("authentication failed: 535")
    assert 295 < primary.rest_left(time.monotonic()) <= 300
    assert server.auth_failures >= 1 and server.sink.mail_froms == []
    logged = [r.getMessage() for r in caplog.records]
    assert any("primary" in m and "authentication failed" in m for m in logged), logged
    assert not any(r.exc_info for r in caplog.records)


async def test_an_unreachable_account_rests_briefly_then_is_tried_again(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel]) -> None:
    backup = provider()
    ch = channel(account(free_port()), account(backup.port, name="backup"))
    closing.append(ch)
    assert await ch.deliver(job("u")) == Delivered(via="backup")
    primary = ch.pools[0]
    assert 0 < primary.rest_left(time.monotonic()) <= 1.0
    assert "unreachable" in primary.rest_reason
    await wait_until(lambda: not primary.resting(time.monotonic()), 3, "the rest to end")
    assert await ch.deliver(job("u2")) == Delivered(via="backup")
    assert 1.0 < primary.rest_left(time.monotonic()) <= 2.0  # doubled


async def test_caps_kept_in_the_store_hold_across_a_restart(
        provider: Callable[..., ProviderServer], closing: list[SmtpChannel],
        tmp_path: Path) -> None:
    first, backup = provider(), provider()
    store = await SqliteStore.open(tmp_path / "otpd.db")
    try:
        accounts = (account(first.port, max_per_minute=2, max_per_day=1000),
                    account(backup.port, name="backup"))
        ch = channel(*accounts, quota=EmailQuota(store))
        closing.append(ch)
        vias = [o.via for o in [await ch.deliver(job(f"k{i}")) for i in range(3)]
                if isinstance(o, Delivered)]
        assert vias == ["primary", "primary", "backup"]
        assert "max_per_minute = 2" in ch.pools[0].rest_reason
        assert 0 < ch.pools[0].rest_left(time.monotonic()) <= 60
        assert await EmailQuota(store).sent_day("primary", time.time()) == 2
        # A restarted channel (same store) knows the minute is used up.
        again = channel(*accounts, quota=EmailQuota(store))
        closing.append(again)
        outcome = await again.deliver(job("k3"))
        assert outcome == Delivered(via="backup")
        assert len(first.sink.tags()) == 2
    finally:
        await store.close()


async def test_sent_day_counts_by_bisection(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "otpd.db")
    try:
        quota = EmailQuota(store)
        now = time.time()
        assert await quota.sent_day("a", now) == 0
        for n in range(1, 38):
            assert await quota.reserve("a", 0, 10**6, now) == 0
            if n in (1, 2, 3, 16, 17, 37):
                assert await quota.sent_day("a", now) == n
        assert await quota.reserve("a", 0, 37, now) > 0  # the day cap holds
        assert await quota.sent_day("b", now) == 0
    finally:
        await store.close()


class ListSource:
    """A WorkSource over a list of jobs (the engine's, reduced to what the channel uses)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = collections.deque(jobs)
        self.outcomes: dict[int, Outcome] = {}
        self._more = asyncio.Event()

    async def take(self, accept: Callable[[Job], bool] | None = None) -> Job:
        while not self.jobs:
            self._more.clear()
            await self._more.wait()
        return self.jobs.popleft()

    async def finish(self, job: Job, outcome: Outcome) -> None:
        self.outcomes[job.id] = outcome

    def wake(self) -> None:
        self._more.set()


async def test_the_running_channel_sends_on_its_sessions_and_closes_idle_ones(
        provider: Callable[..., ProviderServer]) -> None:
    server = provider()
    jobs = [job(f"w{i}") for i in range(40)]
    source = ListSource(jobs)
    ch = channel(account(server.port, max_sessions=4, idle_timeout=0.3))
    assert ch.senders == 4 and ch.workers == 16
    task = asyncio.create_task(ch.run(source))
    try:
        await wait_until(lambda: len(source.outcomes) == len(jobs), 10, "every outcome")
        assert all(isinstance(o, Delivered) for o in source.outcomes.values())
        assert server.sessions.opened <= 4
        cap = ch.capacity()
        assert (cap.ready, cap.senders) == (4, 4) and cap.send_time is not None
        # Idle past idle_timeout: closed by otpd (QUIT), not left to the server.
        await wait_until(lambda: server.sessions.open == 0, 5, "idle sessions closed")
        assert ch.status()["accounts"][0]["sessions"]["open"] == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(server.sink.tags()) == sorted(f"w{i}" for i in range(40))


def test_rests_settings_reach_the_rules() -> None:
    assert account(25).rests == Rests()
    assert account(25).reuse.max_messages == 100


@pytest.mark.parametrize(("subject", "text", "sender"), [
    ("Your code", "Your OTP is 123456", "OTP <otp@example.com>"),
    ("Kode ✓ " + "x" * 90, "Kode Anda 123456\nberlaku 5 menit.\n", '"Bank, Inc" <otp@example.com>'),
    ("Your code", "Votre code : 123456 ✓", "Bücher <otp@bücher.example>"),
    ("Your code", "a line far longer than seventy-eight characters " * 3, "otp@example.com"),
    ("Your code", ".leading dot\n.\nend", "OTP <otp@example.com>"),
])
def test_the_fast_rendering_is_what_the_email_library_writes(
        subject: str, text: str, sender: str) -> None:
    acc = account(25, sender=sender)
    j = dataclasses.replace(job("r"), subject=subject, text=text)
    fast, envelope_from, envelope_to = render_message(acc, j)
    message, *envelope = build_message(acc, j)
    slow = message.as_bytes(policy=policy.SMTP)

    def without_date_and_id(data: bytes) -> list[bytes]:
        return [line for line in data.split(b"\r\n")
                if not line.startswith((b"Date: ", b"Message-ID: "))]

    assert without_date_and_id(fast) == without_date_and_id(slow)
    assert [envelope_from, envelope_to] == envelope


async def test_the_daemon_shows_sessions_caps_and_rests(
        tmp_path: Path, smtp: Any, session: Any) -> None:
    from otpd.app import control
    from otpd.app.cli import smtp_status_line
    from tests.support.daemon import start_daemon, write_config

    config = write_config(tmp_path, f"""
        [[smtp]]
        name = "provider"
        host = "127.0.0.1"
        port = {smtp.port}
        sender = "OTP <otp@example.com>"
        max_sessions = 2
        max_per_day = 500
    """)
    run = await start_daemon(config, session)
    try:
        for i in range(3):
            _, body = await run.client.call("request-otp", {
                "receiver": f"u{i}@example.org", "reference": f"r{i}",
                "message": "Your code is %s"})
            assert body["response_code"] == "0000", body
        answer = await control.request(tmp_path / "control.sock", {"op": "status"})
        (acc,) = answer["status"]["channels"]["email"]["accounts"]
        assert acc["sent"] == 3 and acc["sent_day"] == 3 and acc["max_per_day"] == 500
        assert acc["sessions"]["max"] == 2 and 1 <= acc["sessions"]["idle"] <= 2
        line = smtp_status_line(acc)
        assert line.startswith("smtp provider: ok") and "today 3/500" in line, line
        assert run.daemon.metrics is not None
        from prometheus_client import generate_latest
        text = generate_latest(run.daemon.metrics.registry).decode()
        assert 'otpd_smtp_sent_total{account="provider"} 3.0' in text, text
        assert 'otpd_smtp_sent_day{account="provider"} 3.0' in text
        assert 'otpd_smtp_resting_seconds{account="provider"} 0.0' in text
    finally:
        await run.daemon.stop()


def test_a_resting_account_in_otpd_status() -> None:
    from otpd.app.cli import smtp_status_line

    line = smtp_status_line({
        "name": "primary", "host": "smtp.example.com", "port": 587, "healthy": False,
        "resting": True, "rest_left": 55.2, "rest_reason": "throttled: 421 4.7.0 later",
        "sessions": {"busy": 0, "idle": 0, "max": 4}, "pipelining": True, "sent": 10,
        "sent_day": None, "max_per_day": 2000, "rests": 3, "last_error": "x"})
    assert line == ("smtp primary: resting 55 s: throttled: 421 4.7.0 later"
                    " (smtp.example.com:587), sessions 0 busy + 0 idle of 4, pipelining,"
                    " sent 10 since start, today ?/2000, 3 rests")
