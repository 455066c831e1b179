"""``[limits]``: the abuse limits' windows, caps and receiver prefix lists.

``allow_prefixes`` left out means the home country only (``+`` and
``otp.country_code``): SMS pumping fraud sends to expensive foreign numbers, so
serving them takes a line in the configuration; ``allow_prefixes = []``
written out serves every number."""

from __future__ import annotations

from dataclasses import dataclass

from otpd.msisdn import InvalidReceiver, canonical_prefix
from otpd.settings_reader import Section

DAY = 86400.0


@dataclass(frozen=True)
class LimitSettings:
    enabled: bool = True
    receiver_max: int = 3  # sends to one receiver per receiver_window
    receiver_window: float = 600.0
    receiver_cooldown: float = 30.0  # s between two sends to the same receiver
    receiver_daily_max: int = 10
    user_max: int = 600  # commands per REST user per user_window
    user_window: float = 60.0
    user_distinct_receivers_daily: int = 500  # SMS pumping: many numbers from one user
    ip_max: int = 300  # REST requests per client IP per ip_window
    ip_window: float = 60.0
    verify_failures_max: int = 10  # wrong codes for the receiver's own OTPs per verify_window
    verify_window: float = 3600.0
    # Failed verifications that count against no receiver (unknown, used or expired
    # references, another receiver's OTP) per client (REST user + address, broker).
    client_verify_failures_max: int = 30
    client_verify_window: float = 600.0
    auth_failures_max: int = 10  # failed logins per address (IPv6: /64) per auth_window, then 429
    auth_window: float = 900.0
    # E.164 prefixes; () = every number; None (not configured) = the home country only
    allow_prefixes: tuple[str, ...] | None = None
    deny_prefixes: tuple[str, ...] = ()
    sim_daily_max: int = 300  # SMS parts per SIM per day (carriers cap SIMs); 0 = no cap
    sim_monthly_max: int = 6000  # SMS parts per SIM per 30 days; 0 = no cap


def parse_limit_settings(s: Section | None, country_code: str) -> LimitSettings:
    if s is None:
        return LimitSettings()
    d = LimitSettings()

    def prefixes(key: str) -> tuple[str, ...]:
        out = []
        for raw in s.str_list(key):
            try:
                out.append(canonical_prefix(raw, country_code))
            except InvalidReceiver as exc:
                s.error(key, str(exc))
        return tuple(out)

    out = LimitSettings(
        enabled=s.bool("enabled", d.enabled),
        receiver_max=s.int("receiver_max", d.receiver_max, min=1),
        receiver_window=s.float("receiver_window", d.receiver_window, min=1.0, max=31 * DAY),
        receiver_cooldown=s.float("receiver_cooldown", d.receiver_cooldown, min=0.0,
                                  max=DAY),
        receiver_daily_max=s.int("receiver_daily_max", d.receiver_daily_max, min=1),
        user_max=s.int("user_max", d.user_max, min=1),
        user_window=s.float("user_window", d.user_window, min=1.0, max=31 * DAY),
        user_distinct_receivers_daily=s.int("user_distinct_receivers_daily",
                                            d.user_distinct_receivers_daily, min=1),
        ip_max=s.int("ip_max", d.ip_max, min=1),
        ip_window=s.float("ip_window", d.ip_window, min=1.0, max=31 * DAY),
        verify_failures_max=s.int("verify_failures_max", d.verify_failures_max, min=1),
        verify_window=s.float("verify_window", d.verify_window, min=1.0, max=31 * DAY),
        client_verify_failures_max=s.int("client_verify_failures_max",
                                         d.client_verify_failures_max, min=1),
        client_verify_window=s.float("client_verify_window", d.client_verify_window,
                                     min=1.0, max=31 * DAY),
        auth_failures_max=s.int("auth_failures_max", d.auth_failures_max, min=1),
        auth_window=s.float("auth_window", d.auth_window, min=1.0, max=DAY),
        allow_prefixes=prefixes("allow_prefixes") if s.has("allow_prefixes") else None,
        deny_prefixes=prefixes("deny_prefixes"),
        sim_daily_max=s.int("sim_daily_max", d.sim_daily_max, min=0),
        sim_monthly_max=s.int("sim_monthly_max", d.sim_monthly_max, min=0),
    )
    s.finish()
    return out
