"""What the REST status page shows, gathered from the running daemon and its store.

The transports layer never imports the store: it is handed this object (the
``StatusBoard`` protocol of ``otpd.transports.rest``) and gets plain dicts,
receivers already masked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from otpd.msisdn import mask
from otpd.store import Store, StoreError

HOURS = 24
RECENT_FAILURES = 10


class StatusView:
    def __init__(self, status: Callable[[], dict[str, Any]], store: Store, sim_daily_max: int,
                 clock: Callable[[], float] = time.time) -> None:
        self._status = status
        self._store = store
        self._sim_daily_max = sim_daily_max
        self._clock = clock

    async def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        since = (int(now // 3600) - (HOURS - 1)) * 3600  # the chart's first full hour
        out: dict[str, Any] = {"now": now, "status": self._status(), "activity": [],
                               "failures": [], "counts": {},
                               "sim_daily_max": self._sim_daily_max, "error": ""}
        try:
            out["activity"] = [asdict(a) for a in await self._store.hourly_activity(since)]
            rows = await self._store.recent_messages(["failed", "expired"], RECENT_FAILURES)
            out["counts"] = await self._store.counts()
        except StoreError as exc:
            out["error"] = str(exc)
            return out
        out["failures"] = [
            {"id": r.id, "channel": r.channel, "receiver": mask(r.receiver), "state": r.state,
             "code": r.code, "reason": r.reason, "via": r.via, "attempts": r.attempts,
             "created_at": r.created_at, "finished_at": r.finished_at}
            for r in rows]
        return out
