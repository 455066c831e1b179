"""Store size and verify-otp latency with 10k, 100k and 1M OTPs stored.

Lookups are by primary key, so the latency must stay flat as the table grows.
The rows are written in bulk straight into the real schema (the daemon's own
insert path would take far longer for 1M rows and is measured by
rest_load.py); verification goes through the real store API, HMAC included.

    .venv/bin/python bench/store_scale.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otpd.otp import new_salt, otp_digest, otp_matches  # noqa: E402
from otpd.store import OtpRecord, SqliteStore  # noqa: E402
from otpd.store.migrations import migrate  # noqa: E402

KEY = b"k" * 32
PARAMS = ("100000", "", "", "")
VERIFIES = 2000


def fill(path: Path, n: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn)
    now = time.time()
    salt = new_salt()
    digest = otp_digest(KEY, salt, "ref", "123456", "+628120000000", PARAMS)
    batch = 50_000
    for start in range(0, n, batch):
        rows = [(f"ref-{i}", f"+6281{i:08d}", salt, digest, now, now + 3600, 0, "active")
                for i in range(start, min(start + batch, n))]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO otp VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def measure(path: Path, n: int) -> tuple[float, float]:
    store = await SqliteStore.open(path)
    rng = random.Random(n)
    latencies = []
    try:
        for _ in range(VERIFIES):
            i = rng.randrange(n)

            def matches(r: OtpRecord, i: int = i) -> bool:
                return otp_matches(KEY, r.salt, r.digest, f"ref-{i}", "000000",
                                   f"+6281{i:08d}", PARAMS)

            t0 = time.perf_counter()
            await store.verify_otp(f"ref-{i}", time.time(), matches, 1_000_000)
            latencies.append(time.perf_counter() - t0)
    finally:
        await store.close()
    latencies.sort()
    return statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000


async def main(sizes: list[int]) -> None:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "otpd.db"
            t0 = time.perf_counter()
            fill(path, n)
            fill_s = time.perf_counter() - t0
            p50, p99 = await measure(path, n)
            size = sum(p.stat().st_size for p in Path(tmp).glob("otpd.db*"))
            rows.append((n, size / 1e6, size / n, p50, p99, fill_s))
    base = rows[0][3]
    print(f"\nverify-otp through the store API ({VERIFIES} wrong codes, each a durable write)\n")
    print("| stored OTPs | db size MB | bytes/OTP | verify p50 ms | verify p99 ms |"
          " p50 vs smallest |")
    print("|---|---|---|---|---|---|")
    for n, mb, per, p50, p99, _ in rows:
        print(f"| {n:,} | {mb:.1f} | {per:.0f} | {p50:.2f} | {p99:.2f} | {p50 / base:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    asyncio.run(main([int(s) for s in args.sizes.split(",")]))
