"""The filtered-SIM policy, without devices: judging, flagging, probing, backoff."""

from __future__ import annotations

import pytest

from otpd.channels.sms.sim_health import (
    HYSTERESIS,
    Counts,
    Health,
    HealthPolicy,
    HealthSettings,
)

SETTINGS = HealthSettings(min_sample=10, relative=0.5, floor=0.2, probe_interval=100.0,
                          max_probe_interval=350.0, recover_probes=2)
GOOD = Counts(95, 100)


def policy(**kw: object) -> HealthPolicy:
    return HealthPolicy(HealthSettings(**{**SETTINGS.__dict__, **kw}))


def test_no_judgement_before_the_minimum_sample() -> None:
    p = policy()
    assert p.judge("a", Counts(0, 9), GOOD, can_leave=True, now=0.0) is None
    assert p.state("a") is Health.OK
    change = p.judge("a", Counts(0, 10), GOOD, can_leave=True, now=1.0)
    assert change is not None and change.after is Health.FILTERED
    assert "0/10 delivered (0%)" in change.reason and "other SIMs' 95%" in change.reason


def test_compared_with_the_other_sims() -> None:
    p = policy()
    # 60% against the others' 95%: above half of it, stays.
    assert p.judge("a", Counts(6, 10), GOOD, can_leave=True, now=0.0) is None
    # 40%: below 47.5%, filtered.
    change = p.judge("a", Counts(4, 10), GOOD, can_leave=True, now=0.0)
    assert change is not None and change.after is Health.FILTERED
    h = p.get("a")
    assert h.probe_at == 100.0 and h.judged["bar"] == pytest.approx(0.475)
    assert h.filtered_count == 1


def test_every_sim_low_at_once_filters_none() -> None:
    # A network outage or bad receivers: the others are as bad, nothing to route
    # around; each SIM is flagged (alerted) and keeps sending.
    p = policy()
    change = p.judge("a", Counts(0, 50), Counts(0, 50), can_leave=True, now=0.0)
    assert change is not None and change.after is Health.FLAGGED
    assert "the other SIMs too: 0%" in change.reason
    change = p.judge("b", Counts(1, 50), Counts(3, 50), can_leave=True, now=0.0)
    assert change is not None and change.after is Health.FLAGGED
    # Others fine again (above the floor): now it leaves.
    change = p.judge("b", Counts(1, 51), GOOD, can_leave=True, now=1.0)
    assert change is not None and change.after is Health.FILTERED


def test_absolute_floor_without_others_to_compare() -> None:
    p = policy()
    # Others too new to compare (fewer than min_sample between them): the floor.
    assert p.judge("a", Counts(3, 10), Counts(1, 5), can_leave=True, now=0.0) is None
    change = p.judge("a", Counts(1, 10), Counts(1, 5), can_leave=True, now=0.0)
    assert change is not None and change.after is Health.FILTERED
    assert "floor 20%" in change.reason


def test_the_only_sim_is_flagged_never_stopped() -> None:
    p = policy()
    change = p.judge("a", Counts(0, 30), Counts(), can_leave=False, now=0.0)
    assert change is not None and change.after is Health.FLAGGED
    assert not Health.FLAGGED.out and "kept sending" in change.reason
    # Still bad, still no other SIM: no change (and no repeated alert).
    assert p.judge("a", Counts(0, 40), Counts(), can_leave=False, now=1.0) is None
    # Another SIM came up: now it leaves the rotation.
    change = p.judge("a", Counts(0, 41), Counts(), can_leave=True, now=2.0)
    assert change is not None and change.after is Health.FILTERED
    assert p.get("a").filtered_count == 1  # flagged then filtered: one episode


def test_flag_clears_only_well_above_the_bar() -> None:
    p = policy()
    p.judge("a", Counts(1, 10), Counts(), can_leave=False, now=0.0)
    assert p.state("a") is Health.FLAGGED
    # Just over the floor: not yet (hysteresis).
    assert p.judge("a", Counts(5, 20), Counts(), can_leave=False, now=1.0) is None
    assert p.state("a") is Health.FLAGGED
    ok = round((SETTINGS.floor + HYSTERESIS) * 20)
    change = p.judge("a", Counts(ok, 20), Counts(), can_leave=False, now=2.0)
    assert change is not None and change.after is Health.OK


def test_probe_backoff_and_recovery() -> None:
    p = policy()
    p.judge("a", Counts(0, 10), GOOD, can_leave=True, now=0.0)
    assert not p.probe_due("a", 99.0) and p.probe_due("a", 100.0)
    assert p.probe_started("a", 100.0).after is Health.PROBING
    assert not p.probe_due("a", 100.0)  # one at a time
    p.probe_sent("a", 7)
    # Another message's outcome is not the probe's.
    assert p.outcome("a", 8, True, 101.0) is None
    change = p.outcome("a", 7, False, 110.0)
    assert change is not None and change.after is Health.FILTERED
    assert p.get("a").probe_at == 110.0 + 200.0  # doubled
    p.probe_started("a", 310.0)
    p.probe_sent("a", 9)
    p.outcome("a", 9, False, 320.0)
    assert p.get("a").probe_at == 320.0 + 350.0  # capped
    # Fixed: two delivered probes in a row bring it back.
    p.probe_started("a", 670.0)
    p.probe_sent("a", 10)
    change = p.outcome("a", 10, True, 680.0)
    assert change is not None and change.after is Health.FILTERED
    assert p.probe_due("a", 680.0)  # the next probe at once
    p.probe_started("a", 681.0)
    p.probe_sent("a", 11)
    change = p.outcome("a", 11, True, 690.0)
    assert change is not None and change.after is Health.OK
    assert "back in rotation" in change.reason
    # Judged afresh from then on: the caller counts outcomes since ``since``.
    assert p.get("a").since == 690.0 and p.get("a").failed_probes == 0


def test_probe_not_sent_is_due_again_without_backoff() -> None:
    p = policy()
    p.judge("a", Counts(0, 10), GOOD, can_leave=True, now=0.0)
    p.probe_started("a", 100.0)
    change = p.probe_aborted("a", 101.0)
    assert change is not None and change.after is Health.FILTERED
    assert p.probe_due("a", 101.0) and p.get("a").failed_probes == 0
    assert p.probe_aborted("a", 102.0) is None  # not probing: nothing to abort


def test_filtered_sims_are_not_judged_by_their_window() -> None:
    # Only probes bring a filtered SIM back; a good-looking window does not.
    p = policy()
    p.judge("a", Counts(0, 10), GOOD, can_leave=True, now=0.0)
    assert p.judge("a", Counts(10, 10), GOOD, can_leave=True, now=1.0) is None
    assert p.state("a") is Health.FILTERED


def test_disabled_never_judges() -> None:
    p = policy(enabled=False)
    assert p.judge("a", Counts(0, 100), GOOD, can_leave=True, now=0.0) is None


def test_snapshot_is_plain_data() -> None:
    p = policy()
    p.judge("a", Counts(0, 10), GOOD, can_leave=True, now=5.0)
    snap = p.snapshot()
    assert snap["a"]["state"] == "filtered" and snap["a"]["probe_at"] == 105.0
    assert snap["a"]["since"] is None  # -inf is not JSON
