"""Which SIMs the network seems to filter, from their delivery outcomes (pure: no I/O).

A SIM whose messages stop arriving (status reports say "undeliverable", or
no final report comes in time: "unknown") while the pool's other SIMs
deliver is probably being filtered by the network, or out of credit. The
pool asks this policy after each final outcome and routes around such SIMs:

* no judgement before ``min_sample`` final outcomes (counted since the SIM
  last came back, so old failures never judge it twice);
* a SIM is *bad* when its delivered ratio is below ``relative`` times the
  other in-rotation SIMs' pooled ratio (when they have ``min_sample``
  outcomes between them); with nothing to compare to (a one-SIM Pi, or the
  others too new), when it is below the absolute ``floor``. When the others
  are below the floor too (a network outage, bad receivers), the floor is the
  bar and no SIM leaves: routing around it would not help, they are flagged;
* a bad SIM leaves the rotation (FILTERED) only when another SIM can take its
  work; otherwise it keeps sending and is FLAGGED (alerted, not stopped: the
  only SIM is never stopped for good). A flagged SIM leaves once another SIM
  is there to take over, and is unflagged when its ratio is back ``HYSTERESIS``
  above the bar;
* a filtered SIM is probed after ``probe_interval`` (doubling up to
  ``max_probe_interval`` after each failed probe): one real message at a
  time (PROBING); after ``recover_probes`` delivered probes in a row it is
  back (OK) and judged afresh from then on.

Times are the caller's wall-clock seconds; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# How far above the bar a flagged SIM's ratio must climb before it is unflagged,
# so that a ratio hovering around the bar does not flip the flag every message.
HYSTERESIS = 0.1


class Health(StrEnum):
    OK = "ok"  # in rotation
    FLAGGED = "flagged"  # looks filtered, but no other SIM can take over: keeps sending
    FILTERED = "filtered"  # out of rotation until a probe is due
    PROBING = "probing"  # out of rotation, one probe message out

    @property
    def out(self) -> bool:
        """Out of rotation (the pool sends it a probe only)."""
        return self in (Health.FILTERED, Health.PROBING)


@dataclass(frozen=True)
class HealthSettings:
    enabled: bool = True
    min_sample: int = 20  # final outcomes before a SIM is judged
    relative: float = 0.5  # bad below this share of the other SIMs' delivered ratio
    floor: float = 0.2  # bad below this ratio when there is nothing to compare to
    probe_interval: float = 900.0  # s before the first probe of a filtered SIM
    max_probe_interval: float = 21600.0  # s, the probe backoff's cap
    recover_probes: int = 2  # delivered probes in a row that bring a SIM back


@dataclass(frozen=True)
class Counts:
    """Final outcomes (delivered of total) over some stretch of time."""

    delivered: int = 0
    total: int = 0

    @property
    def ratio(self) -> float | None:
        return self.delivered / self.total if self.total else None

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.delivered + other.delivered, self.total + other.total)


@dataclass
class SimHealth:
    """One SIM's standing; ``since``: outcomes before this are not judged."""

    state: Health = Health.OK
    reason: str = ""
    since: float = float("-inf")
    changed_at: float | None = None
    probe_at: float | None = None  # FILTERED: when the next probe may go
    probe_message: int | None = None  # PROBING: the probe's outbox id, once sent
    failed_probes: int = 0  # in a row: the backoff's exponent
    good_probes: int = 0  # delivered probes in a row
    filtered_count: int = 0  # times taken out (or flagged) since start
    judged: dict[str, float | int | None] = field(default_factory=dict)  # the last numbers

    def as_dict(self) -> dict[str, object]:
        return {"state": str(self.state), "reason": self.reason, "since": _finite(self.since),
                "changed_at": self.changed_at, "probe_at": self.probe_at,
                "failed_probes": self.failed_probes, "good_probes": self.good_probes,
                "filtered_count": self.filtered_count, "judged": dict(self.judged)}


def _finite(value: float) -> float | None:
    return value if value != float("-inf") else None


@dataclass(frozen=True)
class Change:
    """A SIM's standing changed: the pool logs ``reason`` and re-routes."""

    sim: str
    before: Health
    after: Health
    reason: str


class HealthPolicy:
    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self._sims: dict[str, SimHealth] = {}

    def get(self, sim: str) -> SimHealth:
        return self._sims.setdefault(sim, SimHealth())

    def state(self, sim: str) -> Health:
        found = self._sims.get(sim)
        return found.state if found is not None else Health.OK

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {sim: h.as_dict() for sim, h in sorted(self._sims.items())}

    # --- judging ------------------------------------------------------------------------

    def bar(self, others: Counts) -> tuple[float, str, bool]:
        """The ratio below which a SIM is bad, what it is based on, and whether
        the others deliver well enough to take its work."""
        s = self.settings
        ratio = others.ratio
        if others.total < s.min_sample or ratio is None:
            return s.floor, f"the floor {s.floor:.0%} (no other SIM to compare with)", True
        if ratio < s.floor:
            return s.floor, f"the floor {s.floor:.0%} (the other SIMs too: {ratio:.0%})", False
        return ratio * s.relative, f"{s.relative:g} x the other SIMs' {ratio:.0%}", True

    def judge(self, sim: str, own: Counts, others: Counts, *, can_leave: bool,
              now: float) -> Change | None:
        """Judge a SIM in rotation on its outcomes since ``since`` (``own``) against
        the other in-rotation SIMs' (``others``). ``can_leave``: another SIM could
        take its work now. Filtered and probing SIMs come back by probes only."""
        h = self.get(sim)
        if not self.settings.enabled or h.state.out or own.total < self.settings.min_sample:
            return None
        ratio = own.ratio or 0.0
        bar, basis, others_good = self.bar(others)
        can_leave = can_leave and others_good
        h.judged = {"delivered": own.delivered, "total": own.total, "ratio": ratio,
                    "bar": bar, "others_delivered": others.delivered,
                    "others_total": others.total}
        numbers = f"{own.delivered}/{own.total} delivered ({ratio:.0%}), below {basis}"
        if h.state is Health.OK:
            if ratio >= bar:
                return None
            if can_leave:
                return self._filter(h, sim, now, f"filtered: {numbers}")
            return self._set(h, sim, Health.FLAGGED, now,
                             f"looks filtered, kept sending (no other SIM delivers): {numbers}")
        # FLAGGED
        if ratio >= min(bar + HYSTERESIS, 1.0) - 1e-9:  # -1e-9: 0.2 + 0.1 is not 0.3
            return self._set(h, sim, Health.OK, now,
                             f"delivering again: {own.delivered}/{own.total} ({ratio:.0%})")
        if can_leave:
            return self._filter(h, sim, now, f"filtered: {numbers}")
        return None

    def _filter(self, h: SimHealth, sim: str, now: float, reason: str) -> Change:
        h.failed_probes = 0
        h.good_probes = 0
        h.probe_at = now + self.settings.probe_interval
        return self._set(h, sim, Health.FILTERED, now, reason)

    def _set(self, h: SimHealth, sim: str, state: Health, now: float, reason: str) -> Change:
        before = h.state
        if state in (Health.FILTERED, Health.FLAGGED) and not before.out \
                and before is not Health.FLAGGED:
            h.filtered_count += 1
        h.state, h.reason, h.changed_at = state, reason, now
        if state is not Health.PROBING:
            h.probe_message = None
        return Change(sim, before, state, reason)

    # --- probing ------------------------------------------------------------------------

    def probe_due(self, sim: str, now: float) -> bool:
        h = self._sims.get(sim)
        return (h is not None and h.state is Health.FILTERED and h.probe_at is not None
                and now >= h.probe_at)

    def next_probe(self, sim: str) -> float | None:
        h = self._sims.get(sim)
        return h.probe_at if h is not None and h.state is Health.FILTERED else None

    def probe_started(self, sim: str, now: float) -> Change:
        """The pool gave the SIM one message to probe with."""
        h = self.get(sim)
        return self._set(h, sim, Health.PROBING, now,
                         f"probing ({h.good_probes}/{self.settings.recover_probes} delivered)")

    def probe_sent(self, sim: str, message_id: int) -> None:
        h = self.get(sim)
        if h.state is Health.PROBING:
            h.probe_message = message_id

    def probe_aborted(self, sim: str, now: float) -> Change | None:
        """The probe message was not handed to the network (or its report can
        never come): due again now, without counting as a failed probe."""
        h = self.get(sim)
        if h.state is not Health.PROBING:
            return None
        h.probe_at = now
        return self._set(h, sim, Health.FILTERED, now,
                         "filtered: the probe message was not sent; another when one comes")

    def outcome(self, sim: str, message_id: int, delivered: bool, now: float) -> Change | None:
        """A message of the SIM became final: the probe's result, if it was the probe."""
        h = self._sims.get(sim)
        if h is None or h.state is not Health.PROBING or h.probe_message != message_id:
            return None
        s = self.settings
        if delivered:
            h.good_probes += 1
            h.failed_probes = 0
            if h.good_probes >= s.recover_probes:
                h.since = now  # judged afresh: the failures that filtered it are past
                h.probe_at = None
                h.good_probes = 0
                return self._set(h, sim, Health.OK, now,
                                 f"back in rotation: {s.recover_probes} probe(s) delivered")
            h.probe_at = now  # the next probe at once, one at a time
            return self._set(h, sim, Health.FILTERED, now,
                             f"filtered: probe delivered ({h.good_probes}/{s.recover_probes})")
        h.good_probes = 0
        h.failed_probes += 1
        wait = min(s.max_probe_interval, s.probe_interval * 2 ** min(h.failed_probes, 20))
        h.probe_at = now + wait
        return self._set(h, sim, Health.FILTERED, now,
                         f"filtered: probe not delivered ({h.failed_probes} in a row),"
                         f" next in {wait:.0f} s")
