"""SMTP provider caps: messages per account per minute and per day, in the store.

Like the SIM caps of the modem pool (``otpd.limits.SimQuota``): sliding
windows kept by the store's ``rate_hit``, so a cap holds across restarts and,
with the Redis backend, across nodes sending through the same account.
"""

from __future__ import annotations

from otpd.limits_settings import DAY
from otpd.store import RateLimit, Store

MINUTE = 60.0
_MAX_COUNT = 2**27  # counting stops there (far above any provider's daily cap)


def _minute_key(account: str) -> str:
    return f"smtp-min:{account}"


def _day_key(account: str) -> str:
    return f"smtp-day:{account}"


class EmailQuota:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def reserve(self, account: str, per_minute: int, per_day: int, now: float) -> float:
        """Count one message before it is sent (so that nodes sending at once
        never overshoot a cap together) and return 0; or count nothing and
        return the seconds until the caps allow one. A message that then fails
        stays counted: the caps err on the side of the provider's."""
        limits = []
        if per_minute:
            limits.append(RateLimit(_minute_key(account), MINUTE, per_minute))
        if per_day:
            limits.append(RateLimit(_day_key(account), DAY, per_day))
        if not limits:
            return 0.0
        return await self.store.rate_hit(limits, now)

    async def sent_day(self, account: str, now: float) -> int:
        """Messages counted in the last 24 hours, by every node.

        The store answers only "would one more fit under a limit of k", so the
        count is found by bisection over k with checks that record nothing:
        about 2·log2(count) reads, for the status view now and then.
        """
        key = _day_key(account)

        async def at_least(k: int) -> bool:  # count >= k
            return await self.store.rate_hit([RateLimit(key, DAY, k)], now, record=False) > 0

        if not await at_least(1):
            return 0
        low, high = 1, 2  # count >= low; high unknown yet
        while high < _MAX_COUNT and await at_least(high):
            low, high = high, high * 2
        while high - low > 1:  # count >= low, count < high
            mid = (low + high) // 2
            if await at_least(mid):
                low = mid
            else:
                high = mid
        return low
