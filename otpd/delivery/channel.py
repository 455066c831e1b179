"""The contract between the delivery engine and a delivery channel (SMS, email).

The engine owns the durable outbox; a channel pulls jobs from a
:class:`WorkSource` whenever one of its senders is free, tries to deliver, and
reports one :data:`Outcome` per job. Channels never see JSON or the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from otpd.wire.codes import Code


@dataclass(frozen=True)
class Job:
    """One message to deliver. ``text`` may hold a clear OTP: never log it."""

    id: int
    channel: str  # "sms" or "email"
    receiver: str  # sms: E.164 with "+", e.g. "+628126666666"; email: address
    subject: str  # email only
    text: str
    expires_at: float  # unix seconds; never deliver after this
    attempts: int  # delivery attempts made so far (across restarts)
    created_at: float


@dataclass(frozen=True)
class Delivered:
    """Handed to the modem or SMTP server. ``via`` names the modem/account."""

    via: str
    detail: str = ""


@dataclass(frozen=True)
class Failed:
    """Failed for good: the job is never tried again."""

    reason: str
    code: Code = Code.FAILED


@dataclass(frozen=True)
class Retry:
    """Failed this time; try again after ``delay`` seconds (until it expires)."""

    reason: str
    delay: float = 0.0


Outcome = Delivered | Failed | Retry


@dataclass(frozen=True)
class Capacity:
    """How much a channel can send now (read by the intake to decide how much
    work this node takes from a shared queue; see otpd.delivery.admission).

    ``ready``: senders that can take a message now or as soon as their current
    one is sent (modems up and under their SIM cap; SMTP workers while an
    account is reachable). ``busy``: of those, sending right now. ``senders``:
    configured in all. ``send_time``: seconds one message takes, as the channel
    observed it (None: not known yet; the engine fills in what it measures).
    ``reason``: why ``ready`` is 0 ("" when it is not).
    """

    ready: int
    senders: int
    busy: int = 0
    send_time: float | None = None
    reason: str = ""


class WorkSource(Protocol):
    """What the delivery engine offers a channel."""

    async def take(self, accept: Callable[[Job], bool] | None = None) -> Job:
        """Wait for the next due job of this channel that ``accept`` allows
        (oldest first). The job is reserved for the caller until finish()."""
        ...

    async def finish(self, job: Job, outcome: Outcome) -> None:
        """Record the outcome durably and wake whoever waits for it."""
        ...

    def wake(self) -> None:
        """Re-run waiting take() calls, e.g. after an ``accept`` filter changed."""
        ...


class Channel(Protocol):
    name: str  # "sms" or "email"

    def configured(self) -> bool:
        """At least one modem / SMTP account is configured."""
        ...

    def usable(self) -> bool:
        """At least one modem / account can take a message right now."""
        ...

    async def run(self, source: WorkSource) -> None:
        """Deliver jobs until cancelled. Must not raise on a single bad job."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-able state for get-modem-list, health and metrics."""
        ...

    def capacity(self) -> Capacity:
        """Senders ready now, and why none is (cheap: called per message)."""
        ...
