"""Delivery statistics per SIM and per modem, from status reports: a pure model.

The pool feeds it what the store decided (a message became delivered,
undeliverable or unknown; a report arrived) and shows ``snapshot()`` in its
status. The recent window per SIM is what ``sim_health.py`` judges
(``counts_since``) to take a SIM that the network filters (everything
"unknown" or "undeliverable") out of rotation; the running totals and the
time-to-deliver histogram are what ``/metrics`` exports. Times are the
caller's wall-clock values; nothing here reads a clock.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Delivery(StrEnum):
    """A sent SMS's delivery state (the outbox's ``delivery`` column)."""

    SENT = "sent"  # handed to the network, no final report yet
    DELIVERED = "delivered"  # every part reported delivered
    UNDELIVERABLE = "undeliverable"  # a part reported a final failure
    UNKNOWN = "unknown"  # no final report within the report timeout


FINAL = (Delivery.DELIVERED, Delivery.UNDELIVERABLE, Delivery.UNKNOWN)

# Seconds from the hand-off to the last part's delivery report.
TIME_BUCKETS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
# Outcomes kept per SIM for the recent window, whatever the window's length.
MAX_RECENT = 5000


@dataclass
class Histogram:
    """Cumulative-free bucket counts (``counts[i]``: values <= ``TIME_BUCKETS[i]``,
    the last one above every bound), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(TIME_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        value = max(value, 0.0)
        self.counts[bisect.bisect_left(TIME_BUCKETS, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus-style ``(le, count)`` pairs, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, TIME_BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class _Outcome:
    at: float
    delivery: Delivery


class DeliveryStats:
    """Per-SIM recent outcomes, and running totals per (modem, SIM)."""

    def __init__(self, window: float) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._recent: dict[str, deque[_Outcome]] = {}
        self._modem_of: dict[str, str] = {}  # SIM -> modem it last reported through
        # (modem, sim, report outcome) -> reports received since start
        self.reports: dict[tuple[str, str, str], int] = {}
        # (modem, sim, final delivery state) -> messages since start
        self.messages: dict[tuple[str, str, str], int] = {}
        self.time_to_deliver: dict[tuple[str, str], Histogram] = {}
        self.unmatched = 0  # reports that matched no sent part

    # --- events ---------------------------------------------------------------------

    def report(self, modem: str, sim: str, outcome: str) -> None:
        """A status report for one part arrived (``outcome``: pdu.ReportOutcome)."""
        key = (modem, sim, outcome)
        self.reports[key] = self.reports.get(key, 0) + 1

    def report_unmatched(self) -> None:
        self.unmatched += 1

    def outcome(self, modem: str, sim: str, delivery: Delivery, at: float,
                seconds: float | None = None) -> None:
        """A message reached a final delivery state at ``at``; ``seconds`` from
        its hand-off to delivery, for delivered ones."""
        if delivery not in FINAL:
            return
        key = (modem, sim, str(delivery))
        self.messages[key] = self.messages.get(key, 0) + 1
        if delivery is Delivery.DELIVERED and seconds is not None:
            self.time_to_deliver.setdefault((modem, sim), Histogram()).observe(seconds)
        self.remember(modem, sim, delivery, at)

    def remember(self, modem: str, sim: str, delivery: Delivery, at: float) -> None:
        """Only the recent window (what a restart reloads from the store)."""
        if delivery not in FINAL:
            return
        recent = self._recent.setdefault(sim, deque(maxlen=MAX_RECENT))
        # Kept in time order: an older outcome (reloaded) goes to its place.
        if recent and recent[-1].at > at:
            items = sorted([*recent, _Outcome(at, delivery)], key=lambda o: o.at)
            recent.clear()
            recent.extend(items[-MAX_RECENT:])
        else:
            recent.append(_Outcome(at, delivery))
        self._modem_of[sim] = modem

    def load(self, rows: Iterable[tuple[str, str, Delivery, float]]) -> None:
        """Seed the recent window with ``(modem, sim, delivery, at)`` from the store."""
        for modem, sim, delivery, at in sorted(rows, key=lambda r: r[3]):
            self.remember(modem, sim, delivery, at)

    # --- questions ---------------------------------------------------------------------

    def recent(self, sim: str, now: float) -> dict[str, float | int | None]:
        """Outcomes of the SIM's messages that became final in the last ``window`` s."""
        recent = self._recent.get(sim)
        counts = dict.fromkeys(map(str, FINAL), 0)
        if recent is not None:
            while recent and recent[0].at < now - self.window:
                recent.popleft()
            for item in recent:
                counts[str(item.delivery)] += 1
        total = sum(counts.values())
        return {**counts, "total": total,
                "delivered_ratio": counts["delivered"] / total if total else None}

    def counts_since(self, sim: str, since: float, now: float) -> tuple[int, int]:
        """``(delivered, total)`` of the SIM's outcomes in the window and at or
        after ``since`` (what the filter policy judges)."""
        delivered = total = 0
        for item in self._recent.get(sim, ()):
            if item.at >= since and item.at >= now - self.window:
                total += 1
                delivered += item.delivery is Delivery.DELIVERED
        return delivered, total

    def snapshot(self, now: float) -> dict[str, dict[str, float | int | None]]:
        """Every known SIM's recent outcomes, with the modem it was last seen in."""
        out: dict[str, dict[str, float | int | None]] = {}
        for sim in sorted(self._recent):
            out[sim] = self.recent(sim, now)
        return out

    def modem_of(self, sim: str) -> str | None:
        return self._modem_of.get(sim)
