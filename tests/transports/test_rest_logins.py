"""Credential stuffing against a real daemon over real HTTP: attempts counted before
the password check, one check in flight per address, other clients served during
a flood, failed logins logged."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from otpd.auth.htpasswd import HtpasswdFile, set_user
from tests.support.daemon import API_PASSWORD, API_USER, Running, start_daemon, write_config
from tests.support.waiting import wait_until


class Checks:
    """Counts the password checks the daemon runs (HtpasswdFile.verify: the one
    blocking check behind verify_async)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.finished = 0
        self.running = 0
        self.most_running = 0


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Checks]:
    counter = Checks()
    original = HtpasswdFile.verify

    def counted(self: HtpasswdFile, user: str, password: str) -> bool:
        with counter.lock:
            counter.started += 1
            counter.running += 1
            counter.most_running = max(counter.most_running, counter.running)
        try:
            return original(self, user, password)
        finally:
            with counter.lock:
                counter.running -= 1
                counter.finished += 1

    monkeypatch.setattr(HtpasswdFile, "verify", counted)
    yield counter


@pytest.fixture
async def wide_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session without aiohttp's 100-connection cap (a flood needs more)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


REFUSED = 0  # the connection was closed unanswered: the listener's per-address cap


async def post(session: aiohttp.ClientSession, url: str, password: str,
               user: str = API_USER) -> tuple[int, dict[str, str]]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    body = b'{"command": "echo", "data": {}}'
    try:
        async with session.post(url, data=body,
                                headers={"Authorization": f"Basic {token}"}) as r:
            await r.read()
            return r.status, dict(r.headers)
    except aiohttp.ClientError:
        return REFUSED, {}


def url_of(run: Running) -> str:
    return run.client.base + "/api/otp"


async def test_concurrent_wrong_passwords_are_counted_before_the_check(
        tmp_path: Path, checks: Checks, wide_session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path, limits="auth_failures_max = 10"),
                             wide_session)
    try:
        answers = await asyncio.gather(*(
            post(wide_session, url_of(run), f"guess-{i}") for i in range(100)))
    finally:
        await run.daemon.stop()
    statuses = [status for status, _ in answers]
    assert statuses.count(401) + statuses.count(429) + statuses.count(REFUSED) == 100
    assert checks.started <= 20, checks.started
    # Those the listener admitted (all, or its per-address connection cap) and the
    # gate did not check get 429.
    assert statuses.count(401) <= 20 and statuses.count(429) >= 40, statuses
    assert all(int(headers["Retry-After"]) >= 1 for status, headers in answers
               if status == 429)
    assert checks.most_running == 1  # one check in flight for one address


async def test_a_real_login_is_served_during_a_flood(
        tmp_path: Path, checks: Checks, wide_session: aiohttp.ClientSession) -> None:
    # A realistic cost, so that the checks (not HTTP) are what a flood queues on.
    set_user(tmp_path / "users", API_USER, API_PASSWORD, cost=10)
    users = HtpasswdFile.load(tmp_path / "users")
    started = time.perf_counter()
    await asyncio.to_thread(users.verify, API_USER, "not the password")
    one_check = time.perf_counter() - started
    checks.started = checks.finished = 0

    config = write_config(tmp_path, limits="auth_failures_max = 40")
    run = await start_daemon(config, wide_session)
    # The real client comes from another address: 127.0.0.2 (loopback, Linux).
    other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        local_addr=("127.0.0.2", 0)))
    try:
        flood = [asyncio.ensure_future(post(wide_session, url_of(run), f"guess-{i}"))
                 for i in range(200)]
        await wait_until(lambda: checks.started >= 2, 10, "the flood's checks")
        begin = time.perf_counter()
        status, _ = await post(other, url_of(run), API_PASSWORD)
        latency = time.perf_counter() - begin
        flood_checked_meanwhile = checks.finished
        assert status == 200
        results = await asyncio.gather(*flood)
    finally:
        await other.close()
        await run.daemon.stop()
    # The flood's 40 checks take 40 check durations in a row; the real login
    # waited for one or two of them, not for the flood's queue to drain.
    assert flood_checked_meanwhile <= 6, (flood_checked_meanwhile, latency, one_check)
    assert latency < 3 * one_check + 0.3, (latency, one_check)
    flood_statuses = [s for s, _ in results]
    assert flood_statuses.count(401) <= 40
    assert flood_statuses.count(429) + flood_statuses.count(REFUSED) >= 160


async def test_failed_logins_are_logged_without_the_password(
        tmp_path: Path, session: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="otpd.auth.login")
    run = await start_daemon(write_config(tmp_path, limits="auth_failures_max = 5"), session)
    try:
        status, _ = await post(session, url_of(run), "hunter2-wrong", user="mallory")
        assert status == 401
        status, _ = await post(session, url_of(run), API_PASSWORD)
        assert status == 200
    finally:
        await run.daemon.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "otpd.auth.login"]
    assert lines == ["failed login from 127.0.0.1 as user 'mallory'"]
    assert "hunter2" not in caplog.text


async def test_a_success_does_not_count_and_the_limit_still_holds(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path, limits="auth_failures_max = 3"), session)
    try:
        for _ in range(5):  # successes are forgiven: never a 429
            status, _ = await post(session, url_of(run), API_PASSWORD)
            assert status == 200
        statuses = [(await post(session, url_of(run), "guess"))[0] for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        status, headers = await post(session, url_of(run), API_PASSWORD)
        assert status == 429 and int(headers["Retry-After"]) > 1
    finally:
        await run.daemon.stop()
