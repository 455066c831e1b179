"""``[store]``: which backend holds the durable state, and how long it keeps it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from otpd.settings_reader import Section


@dataclass(frozen=True)
class StoreSettings:
    path: Path  # the local SQLite file: everything, or the outbox alone with backend redis
    backend: str  # sqlite | redis
    redis_url: str = field(repr=False)
    redis_prefix: str
    purge_interval: float
    expired_grace: float  # keep expired OTPs this long so verify says 1203, not 1202
    retention: float  # keep final outbox rows (for duplicate-id detection) this long


def parse_store_settings(s: Section) -> StoreSettings:
    backend = s.str("backend", "sqlite", choices=("sqlite", "redis"))
    redis_url = s.secret("redis_url", "redis://127.0.0.1:6379/0")
    if backend == "redis" and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        s.error("redis_url", "must start with redis://, rediss:// or unix://")
    out = StoreSettings(
        path=Path(s.str("path", "/var/lib/otpd/otpd.db")),
        backend=backend,
        redis_url=redis_url,
        redis_prefix=s.str("redis_prefix", "otpd:"),
        purge_interval=s.float("purge_interval", 60.0, min=1.0, max=86400.0),
        expired_grace=s.float("expired_grace", 3600.0, min=0.0, max=30 * 86400.0),
        retention=s.float("retention", 7 * 86400.0, min=3600.0, max=366 * 86400.0),
    )
    s.finish()
    return out
