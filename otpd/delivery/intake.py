"""The node's intake: what the broker consumers ask before taking work.

An adapter between the delivery engine and the transports (which never
import delivery: they see this through the ``Intake`` protocol of
otpd.transports.consumer). It counts the commands being stored, which are
not in the outbox yet, so that every consumer of the node shares one budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otpd.delivery import admission
from otpd.delivery.admission import Gate
from otpd.delivery.engine import DeliveryEngine

_UNGATED = 1000  # room of a node with no sending channel (the prefetch bounds it)


class EngineIntake:
    def __init__(self, engine: DeliveryEngine) -> None:
        self.engine = engine
        self.storing = 0  # commands taken from a broker, not in the outbox yet

    def lead(self) -> str:
        """The channel whose capacity sets how much the node takes from a queue
        that may carry both: SMS when modems are configured, else email."""
        queues = self.engine.queues
        for name in ("sms", "email"):
            if name in queues and queues[name].channel.configured():
                return name
        return next(iter(queues), "sms")

    def gate(self) -> Gate:
        queue = self.engine.queues.get(self.lead())
        if queue is None or not queue.channel.configured():
            # Nothing to send here: commands are answered (refused) as they come.
            return Gate(True, _UNGATED, max(_UNGATED - self.storing, 0), "")
        return queue.gate(extra=self.storing)

    def refusal(self, channel: str, expires_at: float | None) -> str | None:
        """Why this node should leave a parsed message of ``channel`` to the
        others (None: take it). A channel not configured here is the service's
        to refuse, with its usual answer."""
        queue = self.engine.queues.get(channel)
        if queue is None or not queue.channel.configured():
            return None
        s = self.engine.admission
        cap, seen = queue.capacity(), queue.observed
        if cap.ready <= 0:
            return cap.reason or "no sender ready"
        if admission.failing(cap, seen, s):
            if self.engine.monotonic() - seen.last_failure < s.probe_after:
                return f"the last {seen.failures} sends failed"
            return None  # a probe
        if expires_at is None:
            return None
        left = expires_at - self.engine.clock()
        if admission.late(cap, seen, 0, left, s):
            # Too late even for an idle node (or expired already): passed on, it
            # would bounce between the nodes until it expired, ahead of the live
            # messages the broker redelivers it before. Taken here, it is refused
            # as expired (1203) or tried, and dropped at its expiry, as on one node.
            return None
        position = len(queue.jobs) + max(self.storing - 1, 0)
        if admission.late(cap, seen, position, left, s):
            return "its backlog here would send it too late"
        return None

    def hold(self) -> None:
        self.storing += 1

    def release(self) -> None:
        self.storing = max(self.storing - 1, 0)
        self.engine.changed()

    def watch(self, callback: Callable[[], None]) -> None:
        self.engine.listen(callback)

    def status(self) -> dict[str, Any]:
        """Per channel: free capacity, local backlog and whether the node takes more."""
        out: dict[str, Any] = {"lead": self.lead(), "storing": self.storing, "channels": {}}
        for name, queue in self.engine.queues.items():
            if not queue.channel.configured():
                continue
            cap = queue.capacity()
            g = queue.gate(extra=self.storing if name == self.lead() else 0)
            out["channels"][name] = {
                "ready": cap.ready, "senders": cap.senders, "busy": cap.busy,
                "free": max(cap.ready - cap.busy, 0),
                "send_time": admission.send_time(cap, queue.observed, self.engine.admission),
                "backlog": len(queue.jobs), "target": g.target, "room": g.room,
                "taking": g.taking, "reason": g.reason, "handed_over": queue.handed_over,
            }
        return out
