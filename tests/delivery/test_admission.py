"""The intake policy (otpd.delivery.admission): pure, no sockets."""

from __future__ import annotations

from otpd.delivery.admission import (
    AdmissionSettings,
    Observed,
    gate,
    late,
    target,
    wait_time,
)
from otpd.delivery.channel import Capacity

S = AdmissionSettings(horizon=2.0, max_backlog=100, default_send_time=1.0,
                      failures_to_stop=3, probe_after=30.0)


def test_target_follows_ready_senders_and_observed_send_time() -> None:
    seen = Observed(send_time=0.2)
    assert target(Capacity(ready=1, senders=1), seen, S) == 10
    assert target(Capacity(ready=3, senders=3), seen, S) == 30
    # Before a send was observed: the default (1 s) -> 2 per sender.
    assert target(Capacity(ready=3, senders=3), Observed(), S) == 6
    # Slower than the horizon: still one each, so no sender idles.
    assert target(Capacity(ready=2, senders=2), Observed(send_time=10.0), S) == 2
    assert target(Capacity(ready=50, senders=50), seen, S) == 100  # bounded


def test_room_is_target_minus_what_the_node_holds() -> None:
    g = gate(Capacity(ready=1, senders=1), Observed(send_time=0.2), held=7, now=0.0, s=S)
    assert (g.taking, g.target, g.room) == (True, 10, 3)
    full = gate(Capacity(ready=1, senders=1), Observed(send_time=0.2), held=10, now=0.0, s=S)
    assert not full.taking and full.room == 0 and "backlog full" in full.reason


def test_no_ready_sender_takes_nothing_and_says_why() -> None:
    g = gate(Capacity(ready=0, senders=2, reason="no modem ready (port gone)"), Observed(),
             held=0, now=0.0, s=S)
    assert not g.taking and g.room == 0 and g.reason == "no modem ready (port gone)"


def test_failing_sends_stop_the_intake_then_probe_one_at_a_time() -> None:
    cap = Capacity(ready=1, senders=1)
    seen = Observed(send_time=0.2, failures=3, last_failure=100.0)
    stopped = gate(cap, seen, held=0, now=110.0, s=S)
    assert not stopped.taking and "failed" in stopped.reason
    probe = gate(cap, seen, held=0, now=131.0, s=S)
    assert probe.taking and probe.room == 1
    assert not gate(cap, seen, held=1, now=131.0, s=S).taking
    # Two failures of a node with two senders is not yet failing.
    assert gate(Capacity(ready=2, senders=2), Observed(failures=3), 0, 0.0, S).taking is True


def test_late_judges_the_backlog_ahead_against_the_lifetime() -> None:
    cap, seen = Capacity(ready=2, senders=2), Observed(send_time=1.0)
    assert wait_time(cap, seen, 0, S) == 1.0
    assert wait_time(cap, seen, 5, S) == 3.0
    assert not late(cap, seen, position=5, left=10.0, s=S)
    assert late(cap, seen, position=5, left=4.0, s=S)  # 3 s + 2 s margin > 4 s
    assert late(Capacity(ready=0, senders=2), seen, 0, 60.0, S)  # cannot send at all
    assert late(cap, Observed(failures=6), 0, 60.0, S)  # failing
