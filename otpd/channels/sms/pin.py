"""SIM PIN entry as a pure state machine (every rule that changes its state is here).

The driver asks ``AT+CPIN?`` and feeds the SIM state it read to ``state()``,
feeds the outcome of ``AT+CPIN=<pin>`` to ``pin_answer()``, and performs the
action each returns: ``AskState`` (wait ``delay`` s, ask again), ``EnterPin``
(send the PIN), ``Unlocked`` (done) or ``Refused`` (raise; the modem must not
be retried). Rules:

- the PIN is entered at most once per ``SimPin``: a wrong PIN, or a PIN whose
  outcome is unknown (no answer), could lock the SIM (3 tries, then PUK), so
  after any failure ``rejected`` stays set and every later ``opening()`` is
  refused until otpd restarts with a fixed PIN;
- only "SIM PIN" is answered; any other request (SIM PUK, PH-SIM PIN, ...)
  is refused without sending anything;
- after the PIN, states other than "SIM PIN" (e.g. "NOT READY" while the SIM
  starts) are asked again every ``RECHECK_DELAY`` s for ``settle`` s (at
  least ``MIN_SETTLE``); "SIM PIN" again means the PIN did not take.

Clock values are passed in (``now``); nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

READY = "READY"
SIM_PIN = "SIM PIN"
RECHECK_DELAY = 0.3  # s between AT+CPIN? while the SIM starts after the PIN
MIN_SETTLE = 1.0  # s a SIM gets after the PIN, however short the not-ready window


@dataclass(frozen=True)
class AskState:
    """Ask ``AT+CPIN?`` (after ``delay`` s) and feed the answer to ``state()``."""

    delay: float = 0.0


@dataclass(frozen=True)
class EnterPin:
    """Send ``AT+CPIN=<pin>`` and feed the outcome to ``pin_answer()``."""

    pin: str


@dataclass(frozen=True)
class Unlocked:
    """Done: the SIM is ready; ``entered`` tells whether the PIN was sent."""

    entered: bool


@dataclass(frozen=True)
class Refused:
    """Give up: ``reason`` for the operator; never send the PIN again."""

    reason: str


Action = AskState | EnterPin | Unlocked | Refused


class Stage(Enum):
    IDLE = "idle"  # not unlocking
    ASKING = "asking"  # waiting for the first AT+CPIN? answer
    ENTERING = "entering"  # the PIN is out, waiting for its OK
    SETTLING = "settling"  # the PIN was accepted, waiting for READY
    REJECTED = "rejected"  # the PIN must never be sent again


class PinStateError(RuntimeError):
    """An event the machine does not expect in its current stage (a driver bug)."""


class SimPin:
    """The PIN state of one modem, kept across its opens."""

    def __init__(self, pin: str, settle: float) -> None:
        self.pin = pin
        self.settle = max(settle, MIN_SETTLE)
        self.stage = Stage.IDLE
        self._deadline = 0.0

    @property
    def rejected(self) -> bool:
        return self.stage is Stage.REJECTED

    def reject(self) -> None:
        """Never send the PIN again (also for a driver that learned it elsewhere)."""
        self.stage = Stage.REJECTED

    def allow(self) -> None:
        """Forget an earlier rejection (only an operator who fixed the PIN should)."""
        if self.stage is Stage.REJECTED:
            self.stage = Stage.IDLE

    def opening(self) -> Refused | None:
        """Before the port is opened: refused when the SIM already rejected the PIN."""
        if self.rejected:
            return Refused("the SIM rejected the configured PIN; fix the PIN and restart")
        return None

    def begin(self) -> Action:
        """Unlocking starts (the modem answers AT)."""
        if self.rejected:
            return Refused("the SIM rejected the configured PIN; fix the PIN and restart")
        self.stage = Stage.ASKING
        return AskState()

    def state(self, state: str, now: float) -> Action:
        """The SIM state of an ``AT+CPIN?`` answer (upper case), at time ``now``."""
        if self.stage is Stage.ASKING:
            if state == READY:
                self.stage = Stage.IDLE
                return Unlocked(entered=False)
            if state != SIM_PIN:
                return self._refuse(f"SIM needs {state}; otpd only enters the SIM PIN")
            if not self.pin:
                return self._refuse("SIM needs a PIN but none is configured")
            self.stage = Stage.ENTERING
            return EnterPin(self.pin)
        if self.stage is Stage.SETTLING:
            if state == READY:
                self.stage = Stage.IDLE
                return Unlocked(entered=True)
            if state != SIM_PIN and now < self._deadline:
                return AskState(RECHECK_DELAY)
            return self._refuse(f"SIM still not ready after the PIN ({state})")
        raise PinStateError(f"a SIM state while {self.stage.value}")

    def pin_answer(self, ok: bool | None, final: str, now: float) -> Action:
        """The outcome of ``AT+CPIN=<pin>``: ok, refused (``final`` describes it) or
        None when no answer came (the outcome is unknown: never risk a second try)."""
        if self.stage is not Stage.ENTERING:
            raise PinStateError(f"a PIN answer while {self.stage.value}")
        if ok is None:
            return self._refuse("no answer to the SIM PIN")
        if not ok:
            return self._refuse(f"SIM rejected the PIN ({final})")
        self.stage = Stage.SETTLING
        self._deadline = now + self.settle
        return AskState()

    def _refuse(self, reason: str) -> Refused:
        self.stage = Stage.REJECTED
        return Refused(reason)
