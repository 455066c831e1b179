"""The REST connection guard's bookkeeping (otpd.transports.rest_guard), without sockets:
address groups, caps, the descriptor budget, each connection's deadline, log throttling."""

from __future__ import annotations

import pytest

from otpd.transports.rest_guard import (
    Backoff,
    ConnectionCaps,
    ConnectionClock,
    Expiry,
    Refusal,
    Slot,
    Throttled,
    Timeouts,
    connection_limits,
)

T = Timeouts(header=10.0, body=20.0, keepalive=15.0)


def test_caps_per_address_then_total() -> None:
    caps = ConnectionCaps(total=3, per_address=2)
    a1, a2 = caps.acquire("a"), caps.acquire("a")
    assert isinstance(a1, Slot) and isinstance(a2, Slot)
    assert caps.acquire("a") is Refusal.PER_ADDRESS
    b1 = caps.acquire("b")
    assert isinstance(b1, Slot)
    assert caps.acquire("c") is Refusal.TOTAL
    assert caps.refused == {Refusal.PER_ADDRESS: 1, Refusal.TOTAL: 1}
    assert caps.open == 3 and caps.held("a") == 2
    a1.release()
    a1.release()  # idempotent: the handshake and the connection may both release
    assert caps.open == 2 and caps.held("a") == 1
    assert isinstance(caps.acquire("c"), Slot)
    a2.release()
    b1.release()
    assert caps.held("a") == 0 and "a" not in caps._groups  # no memory kept per address


@pytest.mark.parametrize(("nofile", "total", "per_address"), [
    (256, 192, 48),  # a quarter kept back, at least 64 descriptors
    (1024, 768, 64),
    (8192, 1024, 64),  # the unit's LimitNOFILE: memory, not descriptors, bounds it
    (100, 36, 9),
    (10, 1, 1),
])
def test_derived_limits_stay_below_the_descriptor_limit(nofile: int, total: int,
                                                        per_address: int) -> None:
    limits = connection_limits(nofile)
    assert (limits.total, limits.per_address) == (total, per_address)
    assert limits.total < nofile and limits.per_address <= limits.total
    assert limits.notes == ()


def test_configured_limits_are_clamped_with_a_note() -> None:
    limits = connection_limits(256, total=5000, per_address=10)
    assert (limits.total, limits.per_address) == (192, 10)
    assert "max_connections 5000 lowered to 192" in limits.notes[0]
    limits = connection_limits(8192, total=100, per_address=500)
    assert (limits.total, limits.per_address) == (100, 100)
    assert "max_connections_per_address 500 lowered" in limits.notes[0]
    limits = connection_limits(8192, total=2000, per_address=None)
    assert (limits.total, limits.per_address) == (2000, 64) and limits.notes == ()


def test_slowloris_head_expires_however_it_trickles() -> None:
    clock = ConnectionClock(T, now=100.0)
    assert clock.deadline() == (110.0, Expiry.HEADER)
    for t in range(101, 110):
        clock.data(float(t))  # a byte a second: the deadline does not move
    assert clock.expired(109.9) is None
    assert clock.expired(110.0) is Expiry.HEADER


def test_body_deadline_from_the_head_until_the_body_is_complete() -> None:
    clock = ConnectionClock(T, now=0.0)
    clock.data(1.0)
    clock.heads(2.0, 1, body_complete=False)
    assert clock.deadline() == (22.0, Expiry.BODY)
    clock.data(21.0)
    assert clock.expired(22.0) is Expiry.BODY
    clock.body_complete()
    # In the handler with the whole body: nothing expires (delivery.wait bounds it).
    assert clock.deadline() is None and clock.expired(1e9) is None


def test_idle_after_an_answer_then_a_new_head_deadline() -> None:
    clock = ConnectionClock(T, now=0.0)
    clock.heads(1.0, 1, body_complete=True)
    clock.answered(3.0)
    assert clock.deadline() == (18.0, Expiry.IDLE)
    clock.data(17.0)  # the next request starts just in time: its head gets the full timeout
    assert clock.deadline() == (27.0, Expiry.HEADER)
    clock.heads(18.0, 1, body_complete=True)
    clock.answered(19.0)
    assert clock.expired(33.9) is None and clock.expired(34.0) is Expiry.IDLE


def test_pipelined_requests_stay_in_the_handler() -> None:
    clock = ConnectionClock(T, now=0.0)
    clock.heads(1.0, 2, body_complete=True)
    clock.answered(2.0)
    assert clock.pending == 1 and clock.deadline() is None
    clock.answered(3.0)
    assert clock.deadline() == (18.0, Expiry.IDLE)
    # A pipelined head whose body stalls while another request is handled.
    clock.heads(4.0, 1, body_complete=True)
    clock.heads(5.0, 1, body_complete=False)
    assert clock.deadline() == (25.0, Expiry.BODY)


def test_throttled_reports_first_then_once_per_interval_with_the_count() -> None:
    report = Throttled(interval=60.0)
    assert report.hit(0.0) == 1
    assert [report.hit(t) for t in (1.0, 2.0, 59.0)] == [0, 0, 0]
    assert report.hit(60.0) == 4  # three held back plus this one
    assert report.hit(61.0) == 0
    assert report.flush(62.0) == 1 and report.flush(63.0) == 0
    assert report.total == 6


def test_backoff_doubles_to_a_ceiling_and_resets() -> None:
    backoff = Backoff(0.05, 1.0)
    assert [backoff.next() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.05
