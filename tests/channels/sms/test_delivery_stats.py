"""Per-SIM delivery statistics (a pure model)."""

from __future__ import annotations

import pytest

from otpd.channels.sms.delivery_stats import TIME_BUCKETS, Delivery, DeliveryStats


def test_recent_window_per_sim() -> None:
    stats = DeliveryStats(window=100.0)
    stats.outcome("m1", "sim-a", Delivery.DELIVERED, 10.0, seconds=3.0)
    stats.outcome("m1", "sim-a", Delivery.UNDELIVERABLE, 50.0)
    stats.outcome("m1", "sim-a", Delivery.UNKNOWN, 60.0)
    stats.outcome("m2", "sim-b", Delivery.DELIVERED, 60.0, seconds=30.0)
    stats.outcome("m2", "sim-b", Delivery.SENT, 60.0)  # not final: ignored
    assert stats.recent("sim-a", 100.0) == {"delivered": 1, "undeliverable": 1, "unknown": 1,
                                            "total": 3, "delivered_ratio": pytest.approx(1 / 3)}
    # 10.0 leaves the window at 110.
    assert stats.recent("sim-a", 111.0)["total"] == 2
    assert stats.recent("sim-a", 111.0)["delivered_ratio"] == 0.0
    assert stats.recent("nobody", 0.0)["delivered_ratio"] is None
    assert set(stats.snapshot(100.0)) == {"sim-a", "sim-b"}
    assert stats.modem_of("sim-b") == "m2"
    # Running totals stay whatever the window.
    assert stats.messages[("m1", "sim-a", "delivered")] == 1
    assert stats.messages[("m2", "sim-b", "delivered")] == 1


def test_reports_and_time_to_deliver() -> None:
    stats = DeliveryStats(window=3600.0)
    stats.report("m1", "sim-a", "delivered")
    stats.report("m1", "sim-a", "delivered")
    stats.report("m1", "sim-a", "failed")
    stats.report_unmatched()
    assert stats.reports == {("m1", "sim-a", "delivered"): 2, ("m1", "sim-a", "failed"): 1}
    assert stats.unmatched == 1
    stats.outcome("m1", "sim-a", Delivery.DELIVERED, 5.0, seconds=1.0)
    stats.outcome("m1", "sim-a", Delivery.DELIVERED, 6.0, seconds=4.5)
    stats.outcome("m1", "sim-a", Delivery.DELIVERED, 7.0, seconds=1e9)
    hist = stats.time_to_deliver[("m1", "sim-a")]
    buckets = dict(hist.cumulative())
    assert buckets["1"] == 1 and buckets["2"] == 1 and buckets["5"] == 2
    assert buckets[str(TIME_BUCKETS[-1])] == 2 and buckets["+Inf"] == 3
    assert hist.count == 3 and hist.total == pytest.approx(1e9 + 5.5)


def test_load_after_a_restart_keeps_time_order() -> None:
    stats = DeliveryStats(window=1000.0)
    stats.outcome("m1", "sim-a", Delivery.DELIVERED, 900.0)
    stats.load([("m1", "sim-a", Delivery.UNKNOWN, 100.0), ("m1", "sim-a", Delivery.DELIVERED,
                                                           500.0)])
    assert stats.recent("sim-a", 1150.0)["total"] == 2  # 100.0 has left the window
    assert stats.messages == {("m1", "sim-a", "delivered"): 1}  # reloads are not new events


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DeliveryStats(window=0)
