"""The OTP attempt state machine: the one description every OTP store follows (pure).

An OTP record is ``active``, ``used`` (consumed by the right code) or
``burned`` (``max_attempts`` wrong codes). Verifying a code against a record:

=========================  ==================  ===========  ==========
record                     code                answer       record now
=========================  ==================  ===========  ==========
missing                    (not checked)       UNKNOWN      missing
used                       (not checked)       USED         used
burned                     (not checked)       BURNED       burned
active, now >= expires_at  (not checked)       EXPIRED      active
active                     right               OK           used
active                     wrong, not last     WRONG        active, attempts + 1
active                     wrong, the last     BURNED       burned, attempts + 1
=========================  ==================  ===========  ==========

The daemon's stores (SQLite, Redis) and the publisher library's
``manage_otp`` stores (SQLite, Redis) all run these rules: the Python ones
call :func:`precheck` and :func:`settle`, the Redis Lua scripts are
formatted with :data:`LUA_NAMES` so their state and outcome strings are
these. What verify-otp answers for each outcome is :data:`VERIFY_RESPONSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum

from otpd.wire.codes import Code

DEFAULT_MAX_ATTEMPTS = 5


class OtpState(StrEnum):
    ACTIVE = "active"
    USED = "used"
    BURNED = "burned"


class VerifyResult(Enum):
    """The outcome of one verification; the values are what the Lua scripts return."""

    OK = "ok"
    WRONG = "wrong"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    BURNED = "burned"


# Returned by a compare-and-set Lua script when the record changed between the
# read and the settle (another node verified meanwhile): read it again.
RETRY = "retry"

# The answer of a final (non-active) state, without checking the code.
_FINAL: dict[str, VerifyResult] = {
    OtpState.USED.value: VerifyResult.USED,
    OtpState.BURNED.value: VerifyResult.BURNED,
}


@dataclass(frozen=True)
class Step:
    """One settled verification: the answer and the record's new state and attempts."""

    result: VerifyResult
    state: OtpState
    attempts: int


def precheck(state: str | None, expires_at: float, now: float) -> VerifyResult | None:
    """The answer that needs no code check (missing, used, burned, expired), or None:
    the record is active and the code must be checked, then :func:`settle`d."""
    if state is None:
        return VerifyResult.UNKNOWN
    final = _FINAL.get(state)
    if final is not None:
        return final
    if state != OtpState.ACTIVE.value:
        return VerifyResult.UNKNOWN  # a state this version does not know: never accept it
    if now >= expires_at:
        return VerifyResult.EXPIRED
    return None


def settle(attempts: int, matched: bool, max_attempts: int) -> Step:
    """An active record after one code check: consumed, one more wrong try, or burned."""
    if matched:
        return Step(VerifyResult.OK, OtpState.USED, attempts)
    attempts += 1
    if attempts >= max_attempts:
        return Step(VerifyResult.BURNED, OtpState.BURNED, attempts)
    return Step(VerifyResult.WRONG, OtpState.ACTIVE, attempts)


def verify_step(state: str | None, attempts: int, expires_at: float, now: float,
                matches: Callable[[], bool], max_attempts: int) -> Step | VerifyResult:
    """The whole transition for a store that reads and writes in one transaction:
    a :class:`Step` to write back, or the answer when nothing changes.
    ``matches`` (the HMAC check) runs only for an active, unexpired record."""
    early = precheck(state, expires_at, now)
    if early is not None:
        return early
    return settle(attempts, matches(), max_attempts)


def outcome(text: str) -> VerifyResult:
    """A Lua script's outcome string as a :class:`VerifyResult` (UNKNOWN if foreign)."""
    try:
        return VerifyResult(text)
    except ValueError:
        return VerifyResult.UNKNOWN


# Names the Lua scripts are formatted with (``{active}``, ``{ok}``, ``{retry}``...).
LUA_NAMES: dict[str, str] = {
    **{state.name.lower(): state.value for state in OtpState},
    **{result.name.lower(): result.value for result in VerifyResult},
    "retry": RETRY,
}

# What verify-otp answers for each outcome (the daemon and the client's manage_otp).
VERIFY_RESPONSES: dict[VerifyResult, tuple[Code, str | None]] = {
    VerifyResult.OK: (Code.SUCCESS, None),
    VerifyResult.WRONG: (Code.INVALID_OTP, "invalid OTP"),
    VerifyResult.UNKNOWN: (Code.INVALID_OTP, "invalid OTP"),
    VerifyResult.USED: (Code.INVALID_OTP, "invalid OTP"),
    VerifyResult.EXPIRED: (Code.EXPIRED, "OTP expired"),
    VerifyResult.BURNED: (Code.TOO_MANY_ATTEMPTS, "too many attempts: the OTP is no longer valid"),
}
