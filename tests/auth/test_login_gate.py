"""The login gate, without a server: reservations before the check, per-group and
global caps, fair service across address groups, /64 grouping and the log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from otpd.auth import htpasswd
from otpd.auth.login_gate import (
    DEFAULT_PER_ADDRESS,
    DEFAULT_SLOTS,
    LOG_PERIOD,
    QUEUE_FULL_RETRY,
    LoginGate,
    Ticket,
    address_group,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("address", "group"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2:0:0:0:9", "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::5]", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 client it is
    ("-", "-"),
    ("/run/otpd.sock", "/run/otpd.sock"),
])
def test_address_groups(address: str, group: str) -> None:
    assert address_group(address) == group


def test_other_networks_are_other_groups() -> None:
    assert address_group("2001:db8:1:2::1") != address_group("2001:db8:1:3::1")
    assert address_group("192.0.2.7") != address_group("192.0.2.8")


def test_defaults_leave_a_bcrypt_slot_to_others() -> None:
    # The gate schedules the users file's bcrypt slots; one address never takes all.
    assert DEFAULT_SLOTS == htpasswd._BCRYPT_SLOTS
    assert DEFAULT_PER_ADDRESS < DEFAULT_SLOTS


async def test_concurrent_attempts_are_counted_before_the_check() -> None:
    gate = LoginGate(max_failures=10, window=900)
    checks = 0

    async def attempt(i: int) -> Ticket | float:
        nonlocal checks
        got = await gate.reserve("192.0.2.7")
        if isinstance(got, Ticket):
            checks += 1
            await asyncio.sleep(0)  # the password check: others run meanwhile
            got.release(False, f"user{i}")
        return got

    results = await asyncio.gather(*(attempt(i) for i in range(100)))
    refused = [r for r in results if not isinstance(r, Ticket)]
    assert checks == 10
    assert len(refused) == 90 and all(r > 800 for r in refused)  # the window's rest
    assert gate.inflight == 0 and gate.waiting() == 0


async def test_a_success_forgives_its_reservation() -> None:
    gate = LoginGate(max_failures=2, window=900)
    for _ in range(5):
        ticket = await gate.reserve("192.0.2.7")
        assert isinstance(ticket, Ticket)
        assert ticket.release(True, "app") == 0.0
    ticket = await gate.reserve("192.0.2.7")
    assert isinstance(ticket, Ticket)
    assert ticket.release(False, "app") > 0  # the failure delay
    assert ticket.release(False, "app") == 0.0  # a second release does nothing
    ticket = await gate.reserve("192.0.2.7")
    assert isinstance(ticket, Ticket)
    ticket.release(False, "app")
    assert gate.retry_after("192.0.2.7") > 0
    assert isinstance(await gate.reserve("192.0.2.7"), float)


async def test_an_ipv6_client_cannot_rotate_within_its_64() -> None:
    gate = LoginGate(max_failures=3, window=900)
    for i in range(3):
        ticket = await gate.reserve(f"2001:db8:1:2::{i + 1:x}")
        assert isinstance(ticket, Ticket)
        ticket.release(False, "root")
    refused = await gate.reserve("2001:db8:1:2:dead:beef:0:1")
    assert isinstance(refused, float) and refused > 0
    other = await gate.reserve("2001:db8:1:3::1")
    assert isinstance(other, Ticket)
    other.release(True, "app")


async def test_the_window_slides() -> None:
    clock = FakeClock()
    gate = LoginGate(max_failures=2, window=60, clock=clock)
    for _ in range(2):
        ticket = await gate.reserve("192.0.2.7")
        assert isinstance(ticket, Ticket)
        ticket.release(False, "x")
        clock.now += 10
    assert gate.retry_after("192.0.2.7") == pytest.approx(40)
    clock.now += 41
    ticket = await gate.reserve("192.0.2.7")
    assert isinstance(ticket, Ticket)
    ticket.release(True, "x")


async def test_one_check_per_address_and_others_get_the_free_slot() -> None:
    gate = LoginGate(max_failures=None, per_address=1, slots=2)
    first = await gate.reserve("192.0.2.7")
    assert isinstance(first, Ticket)
    flood = [asyncio.ensure_future(gate.reserve("192.0.2.7")) for _ in range(50)]
    await asyncio.sleep(0)
    assert gate.inflight == 1 and gate.waiting("192.0.2.7") == 50
    # Another client needs no wait at all: the second slot is not the flood's.
    other = await gate.reserve("198.51.100.1")
    assert isinstance(other, Ticket)
    assert gate.inflight == 2
    other.release(True, "app")
    first.release(False, "x")
    for task in flood:
        ticket = await task
        assert isinstance(ticket, Ticket)
        assert gate.inflight == 1  # one at a time for this address
        ticket.release(False, "x")
    assert gate.inflight == 0


async def test_waiting_groups_are_served_in_turn() -> None:
    gate = LoginGate(max_failures=None, per_address=1, slots=1)
    holder = await gate.reserve("192.0.2.1")
    assert isinstance(holder, Ticket)
    served: list[str] = []

    async def login(address: str) -> None:
        ticket = await gate.reserve(address)
        assert isinstance(ticket, Ticket)
        served.append(address)
        await asyncio.sleep(0)
        ticket.release(True, "x")

    flood = [asyncio.ensure_future(login("192.0.2.1")) for _ in range(20)]
    await asyncio.sleep(0)
    late = asyncio.ensure_future(login("198.51.100.1"))  # queued behind 20 of the flood
    await asyncio.sleep(0)
    holder.release(False, "x")
    await asyncio.gather(*flood, late)
    # Round-robin: the other client is served after at most one more flood check.
    assert served.index("198.51.100.1") <= 1


async def test_the_queue_per_group_is_bounded() -> None:
    gate = LoginGate(max_failures=None, per_address=1, slots=1, max_waiting=3)
    holder = await gate.reserve("192.0.2.1")
    assert isinstance(holder, Ticket)
    waiting = [asyncio.ensure_future(gate.reserve("192.0.2.1")) for _ in range(3)]
    await asyncio.sleep(0)
    assert await gate.reserve("192.0.2.1") == QUEUE_FULL_RETRY
    holder.release(True, "x")
    for task in waiting:
        ticket = await task
        assert isinstance(ticket, Ticket)
        ticket.release(True, "x")


async def test_waiters_are_refused_once_failures_fill_the_window() -> None:
    gate = LoginGate(max_failures=2, window=900, per_address=1, slots=2)
    first = await gate.reserve("192.0.2.1")
    assert isinstance(first, Ticket)
    queued = [asyncio.ensure_future(gate.reserve("192.0.2.1")) for _ in range(5)]
    await asyncio.sleep(0)
    first.release(False, "x")
    second = await queued[0]
    assert isinstance(second, Ticket)
    second.release(False, "x")
    rest = await asyncio.gather(*queued[1:])
    assert all(isinstance(r, float) and r > 0 for r in rest)
    assert gate.waiting() == 0


async def test_a_cancelled_caller_gives_its_place_back() -> None:
    gate = LoginGate(max_failures=None, per_address=1, slots=1)
    holder = await gate.reserve("192.0.2.1")
    assert isinstance(holder, Ticket)
    gone = asyncio.ensure_future(gate.reserve("192.0.2.2"))
    nxt = asyncio.ensure_future(gate.reserve("192.0.2.3"))
    await asyncio.sleep(0)
    gone.cancel()
    holder.release(True, "x")  # the slot skips the cancelled caller
    ticket = await nxt
    assert isinstance(ticket, Ticket)
    # Granted, then cancelled before it ran: the slot is freed, not leaked.
    granted_then_gone = asyncio.ensure_future(gate.reserve("192.0.2.4"))
    await asyncio.sleep(0)
    ticket.release(True, "x")
    granted_then_gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await granted_then_gone
    assert gate.inflight == 0
    last = await gate.reserve("192.0.2.5")
    assert isinstance(last, Ticket)
    last.release(True, "x")


async def test_failed_logins_are_logged_at_most_n_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    gate = LoginGate(max_failures=None, log_lines=3, clock=clock)
    caplog.set_level(logging.WARNING, logger="otpd.auth.login")
    for i in range(5):
        ticket = await gate.reserve("192.0.2.7")
        assert isinstance(ticket, Ticket)
        ticket.release(False, f"user{i}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"failed login from 192.0.2.7 as user 'user{i}'" for i in range(3)]
    clock.now += LOG_PERIOD
    ticket = await gate.reserve("192.0.2.7")
    assert isinstance(ticket, Ticket)
    ticket.release(False, "user5")
    lines = [r.getMessage() for r in caplog.records][3:]
    assert lines[0].startswith("failed logins: 2 more not logged one by one")
    assert lines[1] == "failed login from 192.0.2.7 as user 'user5'"


async def test_a_long_user_name_is_shortened_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    gate = LoginGate()
    caplog.set_level(logging.WARNING, logger="otpd.auth.login")
    ticket = await gate.reserve("192.0.2.7")
    assert isinstance(ticket, Ticket)
    ticket.release(False, "x" * 500)
    (message,) = [r.getMessage() for r in caplog.records]
    assert len(message) < 120 and message.endswith("...'")
