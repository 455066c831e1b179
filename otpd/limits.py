"""Abuse limits: SMS pumping, OTP guessing and credential stuffing.

Every limit is a sliding window kept in the store (so it holds across restarts
and, with the Redis backend, across nodes). A command over a limit gets 1401
with ``retry_after``; a receiver outside the allowed prefixes gets 1400.

Logins are also gated in memory (``otpd.auth.login_gate``: counted before the
password check, checks in flight capped per address); the store windows here
are what several nodes share. Addresses are limited by group (IPv6 per /64).
"""

from __future__ import annotations

from otpd.limits_settings import DAY, LimitSettings
from otpd.msisdn import is_email
from otpd.store import RateLimit, Store

__all__ = ["DAY", "LimitSettings", "Limiter", "SimQuota"]


class Limiter:
    def __init__(self, settings: LimitSettings, store: Store) -> None:
        self.s = settings
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.s.enabled

    def allowed_prefixes(self, country_code: str) -> tuple[str, ...]:
        """The allow list in force: the configured one, else the home country's."""
        if self.s.allow_prefixes is None:
            return (f"+{country_code}",)
        return self.s.allow_prefixes

    def receiver_refusal(self, receiver: str, country_code: str) -> str | None:
        """Why a canonical receiver is outside the deny/allow prefix lists (phone
        numbers only), naming the setting that decides; None when it is not."""
        if is_email(receiver):
            return None
        if any(receiver.startswith(p) for p in self.s.deny_prefixes):
            return "receiver is in a denied number range (limits.deny_prefixes)"
        allowed = self.allowed_prefixes(country_code)
        if not allowed or any(receiver.startswith(p) for p in allowed):
            return None
        if self.s.allow_prefixes is None:
            return (f"receiver is outside the allowed number ranges: only +{country_code}"
                    " numbers by default; the operator allows others with"
                    " limits.allow_prefixes")
        return ("receiver is outside the allowed number ranges (limits.allow_prefixes:"
                f" {', '.join(allowed)})")

    def receiver_allowed(self, receiver: str, country_code: str) -> bool:
        """Prefix allow/deny lists (phone numbers only)."""
        return self.receiver_refusal(receiver, country_code) is None

    async def command(self, user: str, ip: str | None, now: float) -> float:
        """Every command: per user and per client IP. Returns seconds to wait (0 = ok)."""
        if not self.s.enabled:
            return 0.0
        limits = [RateLimit(f"user:{user}", self.s.user_window, self.s.user_max)]
        if ip:
            limits.append(RateLimit(f"ip:{ip}", self.s.ip_window, self.s.ip_max))
        return await self.store.rate_hit(limits, now)

    async def send(self, user: str, receiver: str, now: float) -> float:
        """A message to ``receiver``: per receiver and distinct receivers per user."""
        if not self.s.enabled:
            return 0.0
        s = self.s
        limits = [
            RateLimit(f"rcpt:{receiver}", s.receiver_window, s.receiver_max),
            RateLimit(f"rcpt-day:{receiver}", DAY, s.receiver_daily_max),
            RateLimit(f"distinct:{user}", DAY, s.user_distinct_receivers_daily,
                      member=receiver),
        ]
        if s.receiver_cooldown > 0:
            limits.append(RateLimit(f"cool:{receiver}", s.receiver_cooldown, 1))
        return await self.store.rate_hit(limits, now)

    async def verify_blocked(self, receiver: str, now: float) -> float:
        """Too many wrong codes for this receiver's own OTPs lately (whatever the
        reference)?"""
        if not self.s.enabled:
            return 0.0
        lim = RateLimit(f"vfail:{receiver}", self.s.verify_window, self.s.verify_failures_max)
        return await self.store.rate_hit([lim], now, record=False)

    async def verify_failed(self, receiver: str, now: float) -> None:
        """A wrong code for an existing OTP of ``receiver``. Only then: a stranger's
        made-up reference must not lock the receiver out."""
        if self.s.enabled:
            lim = RateLimit(f"vfail:{receiver}", self.s.verify_window,
                            self.s.verify_failures_max + 1)
            await self.store.rate_hit([lim], now)

    async def client_verify_blocked(self, client: str, now: float) -> float:
        """Too many failed verifications by this client (user + address) that
        count against no receiver (guessing references)?"""
        if not self.s.enabled:
            return 0.0
        lim = RateLimit(f"vfail-client:{client}", self.s.client_verify_window,
                        self.s.client_verify_failures_max)
        return await self.store.rate_hit([lim], now, record=False)

    async def client_verify_failed(self, client: str, now: float) -> None:
        if self.s.enabled:
            lim = RateLimit(f"vfail-client:{client}", self.s.client_verify_window,
                            self.s.client_verify_failures_max + 1)
            await self.store.rate_hit([lim], now)

    async def auth_blocked(self, ip: str, now: float) -> float:
        """Failed logins from this address (group: the caller passes
        ``otpd.auth.login_gate.address_group``), shared by the nodes."""
        if not self.s.enabled:
            return 0.0
        lim = RateLimit(f"authfail:{ip}", self.s.auth_window, self.s.auth_failures_max)
        return await self.store.rate_hit([lim], now, record=False)

    async def auth_failed(self, ip: str, now: float) -> None:
        if self.s.enabled:
            lim = RateLimit(f"authfail:{ip}", self.s.auth_window, self.s.auth_failures_max + 1)
            await self.store.rate_hit([lim], now)


class SimQuota:
    """SMS parts per SIM per day and per 30 days, across restarts.

    Keyed by the SIM's IMSI when the modem reports one (a SIM moved to another
    modem keeps its count), else by the modem's name. The pool asks before it
    takes work for a modem and records each part it hands to the network.
    """

    def __init__(self, settings: LimitSettings, store: Store) -> None:
        self.s = settings
        self.store = store

    def _limits(self, sim: str) -> list[RateLimit]:
        out = []
        if self.s.sim_daily_max:
            out.append(RateLimit(f"sim-day:{sim}", DAY, self.s.sim_daily_max))
        if self.s.sim_monthly_max:
            out.append(RateLimit(f"sim-month:{sim}", 30 * DAY, self.s.sim_monthly_max))
        return out

    async def wait(self, sim: str, now: float) -> float:
        """Seconds until this SIM may send again (0 = it may now)."""
        limits = self._limits(sim)
        if not self.s.enabled or not limits:
            return 0.0
        return await self.store.rate_hit(limits, now, record=False)

    async def record(self, sim: str, parts: int, now: float) -> float:
        """Count sent parts; returns the wait before the next send (0 = none)."""
        limits = self._limits(sim)
        if not self.s.enabled or not limits:
            return 0.0
        for _ in range(parts):
            # Recorded even past the cap: the network took these parts.
            if await self.store.rate_hit(limits, now) > 0:
                relaxed = [RateLimit(lim.key, lim.window, 2**31) for lim in limits]
                await self.store.rate_hit(relaxed, now)
        return await self.store.rate_hit(limits, now, record=False)
