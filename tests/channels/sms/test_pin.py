"""The SIM PIN state machine (pin.py): answers in, actions out, no modem."""

from __future__ import annotations

import pytest

from otpd.channels.sms.pin import (
    MIN_SETTLE,
    RECHECK_DELAY,
    AskState,
    EnterPin,
    PinStateError,
    Refused,
    SimPin,
    Stage,
    Unlocked,
)


def test_ready_sim_needs_no_pin() -> None:
    sim = SimPin("1234", settle=5.0)
    assert sim.opening() is None
    assert sim.begin() == AskState()
    assert sim.state("READY", 0.0) == Unlocked(entered=False)
    assert sim.stage is Stage.IDLE and not sim.rejected


def test_pin_entered_then_settles() -> None:
    sim = SimPin("1234", settle=5.0)
    sim.begin()
    assert sim.state("SIM PIN", 0.0) == EnterPin("1234")
    assert sim.pin_answer(True, "OK", 10.0) == AskState()
    assert sim.state("NOT READY", 11.0) == AskState(RECHECK_DELAY)
    assert sim.state("READY", 12.0) == Unlocked(entered=True)
    assert not sim.rejected


def test_not_ready_after_the_pin_for_too_long() -> None:
    sim = SimPin("1234", settle=5.0)
    sim.begin()
    sim.state("SIM PIN", 0.0)
    sim.pin_answer(True, "OK", 10.0)
    assert sim.state("NOT READY", 14.9) == AskState(RECHECK_DELAY)
    action = sim.state("NOT READY", 15.0)
    assert action == Refused("SIM still not ready after the PIN (NOT READY)")
    assert sim.rejected


def test_settle_has_a_floor() -> None:
    sim = SimPin("1234", settle=0.0)
    assert sim.settle == MIN_SETTLE
    sim.begin()
    sim.state("SIM PIN", 0.0)
    sim.pin_answer(True, "OK", 0.0)
    assert sim.state("NOT READY", MIN_SETTLE - 0.1) == AskState(RECHECK_DELAY)


def test_still_sim_pin_after_the_pin_is_final() -> None:
    sim = SimPin("1234", settle=5.0)
    sim.begin()
    sim.state("SIM PIN", 0.0)
    sim.pin_answer(True, "OK", 0.0)
    assert isinstance(sim.state("SIM PIN", 0.1), Refused) and sim.rejected


@pytest.mark.parametrize("state", ["SIM PUK", "PH-SIM PIN", "SIM PIN2"])
def test_only_the_sim_pin_is_entered(state: str) -> None:
    sim = SimPin("1234", settle=5.0)
    sim.begin()
    assert sim.state(state, 0.0) == Refused(f"SIM needs {state}; otpd only enters the SIM PIN")
    assert sim.rejected


def test_no_pin_configured() -> None:
    sim = SimPin("", settle=5.0)
    sim.begin()
    assert sim.state("SIM PIN", 0.0) == Refused("SIM needs a PIN but none is configured")


def test_wrong_pin_is_never_sent_again() -> None:
    sim = SimPin("0000", settle=5.0)
    sim.begin()
    sim.state("SIM PIN", 0.0)
    refused = sim.pin_answer(False, "+CME ERROR: 16 (incorrect password)", 0.0)
    assert refused == Refused("SIM rejected the PIN (+CME ERROR: 16 (incorrect password))")
    expected = Refused("the SIM rejected the configured PIN; fix the PIN and restart")
    assert sim.opening() == expected
    assert sim.begin() == expected


def test_unknown_outcome_counts_as_rejected() -> None:
    sim = SimPin("1234", settle=5.0)
    sim.begin()
    sim.state("SIM PIN", 0.0)
    assert sim.pin_answer(None, "", 0.0) == Refused("no answer to the SIM PIN")
    assert sim.rejected


def test_unlock_interrupted_before_an_answer_starts_over() -> None:
    # A port lost while asking: the next open asks again (the PIN was not sent).
    sim = SimPin("1234", settle=5.0)
    sim.begin()
    assert sim.begin() == AskState()
    assert sim.state("SIM PIN", 0.0) == EnterPin("1234")


def test_events_out_of_order_are_driver_bugs() -> None:
    sim = SimPin("1234", settle=5.0)
    with pytest.raises(PinStateError):
        sim.state("READY", 0.0)
    with pytest.raises(PinStateError):
        sim.pin_answer(True, "OK", 0.0)


def test_reject_and_allow() -> None:
    sim = SimPin("1234", settle=5.0)
    sim.reject()
    assert sim.rejected and sim.opening() is not None
    sim.allow()
    assert not sim.rejected and sim.opening() is None
