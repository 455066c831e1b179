"""What the modem pool needs to match delivery reports to what it sent.

Every part sent with a status report request is recorded (message, modem,
SIM, TP-MR, receiver) so that a report matches it even after a restart; a
report updates the part and, through its parts, the message's delivery state.
The daemon hands the pool an implementation over the store (see
``otpd.app.daemon.StoreReportStore``) that reports store failures as
``ReportStoreError``, so the channel never depends on the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from otpd.channels.sms.delivery_stats import Delivery


class ReportStoreError(Exception):
    """The sent parts or a report could not be read or written."""


@dataclass(frozen=True)
class SentPart:
    message_id: int
    part: int  # 1-based
    parts: int
    modem: str
    sim: str  # the SIM's key (IMSI, or "modem:<name>")
    reference: int  # TP-MR from +CMGS
    receiver: str
    sent_at: float


@dataclass(frozen=True)
class PartReport:
    modem: str  # the modem it arrived on
    sim: str
    reference: int  # TP-MR
    recipient: str  # TP-RA
    outcome: str  # pdu.ReportOutcome value
    status: int  # TP-ST
    at: float  # arrival (wall clock)
    discharged: float | None = None  # TP-DT (the SC's clock)


@dataclass(frozen=True)
class ReportMatch:
    """The part a report matched, and the message's delivery state after it."""

    message_id: int
    modem: str  # the modem that sent the part
    sim: str
    delivery: Delivery
    became_final: bool  # this report made the message delivered or undeliverable
    first_sent_at: float  # the message's first part


@dataclass(frozen=True)
class Unreported:
    """A message that got no final report in time: its delivery is now unknown."""

    message_id: int
    modem: str
    sim: str
    sent_at: float


@dataclass(frozen=True)
class RecentOutcome:
    modem: str
    sim: str
    delivery: Delivery
    at: float


class ReportStore(Protocol):
    async def sent(self, parts: Sequence[SentPart]) -> None:
        """Record the parts of one message (its delivery becomes ``sent``)."""
        ...

    async def report(self, report: PartReport) -> ReportMatch | None:
        """Apply a report to the newest unfinished part with this SIM, TP-MR and
        receiver; None when none matches."""
        ...

    async def expire(self, sent_before: float, now: float) -> list[Unreported]:
        """Messages still ``sent`` whose last part went before ``sent_before``
        become ``unknown``."""
        ...

    async def recent(self, since: float) -> list[RecentOutcome]:
        """Final delivery states reached since ``since`` (the status window after
        a restart)."""
        ...


@dataclass(frozen=True)
class DeliveryEvent:
    """A sent SMS reached a final delivery state (the pool's ``on_delivery``)."""

    message_id: int
    modem: str  # the modem that sent it
    sim: str
    delivery: Delivery  # delivered | undeliverable | unknown
    sent_at: float  # its first part's hand-off (wall clock)
    at: float  # when the report arrived, or when it was given up as unknown
    delivered_at: float | None = None  # the SC's discharge time of the last part delivered
