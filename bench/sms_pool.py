"""SMS pool benchmark: delivered rate against the physical limit of N modems, and the
latency from the outbox to the first AT byte on an idle modem.

The daemon side is the daemon's own code path: a temporary SQLite store
(``SqliteStore.open``), the real ``DeliveryEngine`` and ``ModemPool``, and the
modem driver on real pseudo-terminals; each message is inserted into the
outbox and submitted as ``Service._send`` does. The modems are
``ModemSimulator``s in a separate process (as real modems are separate
hardware: their work does not share the daemon's event loop), each taking
``--delay`` seconds per SMS like a modem waiting for the network.

Throughput: ``--messages`` messages per row, all offered at once; the rate is
messages delivered per second from the first insert to the last result, and
the ratio divides it by the physical limit N / D (goal: >= 0.97).

Latency: ``--latency-messages`` messages one at a time with idle modems; from
just before ``engine.submit`` to the moment a simulator has the whole
``AT+CMGS`` line (CLOCK_MONOTONIC in both processes; goal: p99 < 50 ms).

With ``--keep-copies`` the simulators keep a stored copy of every sent part
(``store_sent``, 30 slots), the worst case for the driver's storage cleanup.
"AT per SMS" counts every command line the modems received during the
throughput run, divided by the messages: a bare send is 1 (the AT+CMGS of its
single part); the rest is what a real modem spends tens of milliseconds on each.

    .venv/bin/python bench/sms_pool.py [--modems 1,4,8] [--delay 0.2] [--messages 400]
        [--latency-messages 200] [--keep-copies] [--profile FILE]

Bounded in count and time: each phase has a deadline and the script stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otpd.channels.sms.pool import ModemPool  # noqa: E402
from otpd.channels.sms.settings import ModemSettings, SmsSettings  # noqa: E402
from otpd.channels.sms.simulator import ModemSimulator  # noqa: E402
from otpd.delivery.channel import Job  # noqa: E402
from otpd.delivery.engine import DeliveryEngine, Result  # noqa: E402
from otpd.sealing import Sealer  # noqa: E402
from otpd.store import Inserted, NewMessage, SqliteStore  # noqa: E402

LIFETIME = 3600.0
LATENCY_DELAY = 0.01  # s per SMS in the latency phase: only the start of a send is timed
PAUSE = 0.005  # s between latency messages: every modem idle, waiting for work


# --- the modems' process -------------------------------------------------------------


async def serve_sims(folder: Path, count: int, delay: float, keep_copies: bool) -> None:
    """Run ``count`` simulators; answer JSON-line requests on stdin until it closes."""
    sims = [ModemSimulator(folder / f"m{i}", name=f"m{i}", delay=delay, seed=i,
                           store_sent=keep_copies)
            for i in range(count)]
    cmgs: list[list[float]] = [[] for _ in sims]
    base_commands = [0] * count
    base_sent = [0] * count

    def hook(i: int) -> None:
        def on_command(line: str) -> None:
            if line[:8].upper() == "AT+CMGS=":
                cmgs[i].append(time.monotonic())
        sims[i].on_command = on_command

    for i, sim in enumerate(sims):
        hook(i)
        await sim.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    try:
        while line := await reader.readline():
            req = json.loads(line)
            answer: dict[str, Any] = {}
            if req["op"] == "mark":
                base_commands = [len(s.commands) for s in sims]
                base_sent = [len(s.sent) for s in sims]
                for times in cmgs:
                    times.clear()
            elif req["op"] == "delay":
                for sim in sims:
                    sim.delay = float(req["value"])
            elif req["op"] == "stats":
                answer = {
                    "commands": [len(s.commands) - b for s, b in zip(sims, base_commands,
                                                                     strict=True)],
                    "sent": [[m.text for m in s.sent[b:]] for s, b in zip(sims, base_sent,
                                                                          strict=True)],
                    "cmgs": cmgs,
                }
            print(json.dumps(answer), flush=True)
    finally:
        for sim in sims:
            await sim.stop()


class Modems:
    """The simulators' process, seen from the daemon side."""

    def __init__(self, folder: Path, count: int, delay: float, keep_copies: bool) -> None:
        self.links = [folder / f"m{i}" for i in range(count)]
        self.args = [str(Path(__file__).resolve()), "--serve-sims", str(folder),
                     "--modems", str(count), "--delay", str(delay)]
        if keep_copies:
            self.args.append("--keep-copies")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        await self._answer(30)

    async def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._answer(30)

    async def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulators' process ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# --- the daemon side -------------------------------------------------------------------


@dataclass
class Row:
    modems: int
    messages: int
    elapsed: float
    delivered: int
    limit: float  # N / D messages per second
    at_per_sms: float
    spread: list[int]
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed

    @property
    def ratio(self) -> float:
        return self.rate / self.limit


class Bench:
    def __init__(self, tmp: Path, count: int, delay: float, keep_copies: bool) -> None:
        self.tmp = tmp
        self.delay = delay
        self.modems = Modems(tmp, count, delay, keep_copies)
        self.pool = ModemPool(SmsSettings(modems=tuple(
            ModemSettings(name=link.name, port=str(link)) for link in self.modems.links)))
        self.sealer = Sealer(os.urandom(32))
        self.store: SqliteStore | None = None
        self.engine: DeliveryEngine | None = None
        self.serial = 0

    async def __aenter__(self) -> Bench:
        await self.modems.start()
        self.store = await SqliteStore.open(self.tmp / "otpd.db")
        self.engine = DeliveryEngine(self.store, {"sms": self.pool}, self.sealer)
        await self.engine.start()
        async with asyncio.timeout(30):
            while any(m["state"] != "ready" for m in self.pool.status()["modems"]):
                await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.engine is not None:
            await self.engine.stop()  # bounded by itself
        if self.store is not None:
            await self.store.close()
        await self.modems.stop()

    async def insert(self) -> Job:
        """Store one message in the outbox as the service does; the job to submit."""
        assert self.store is not None
        self.serial += 1
        receiver = f"+62812{self.serial:07d}"
        text = f"Your OTP is {self.serial:06d}. Do not share it."
        now = time.time()
        msg = NewMessage(command="send-sms", channel="sms", receiver=receiver, subject="",
                         sealed=self.sealer.seal(text, receiver), created_at=now,
                         expires_at=now + LIFETIME)
        inserted = await self.store.insert_message(msg)
        assert isinstance(inserted, Inserted)
        return Job(id=inserted.id, channel="sms", receiver=receiver, subject="", text=text,
                   expires_at=msg.expires_at, attempts=0, created_at=msg.created_at)

    async def send(self) -> Result:
        assert self.engine is not None
        job = await self.insert()
        result = await (await self.engine.submit(job))
        if result is None:
            raise RuntimeError("the engine is shutting down")
        return result

    async def throughput(self, count: int) -> tuple[float, int, float, list[int]]:
        await self.modems.ask(op="mark")
        t0 = time.perf_counter()
        async with asyncio.timeout(count * self.delay / len(self.modems.links) * 3 + 30):
            results = await asyncio.gather(*(self.send() for _ in range(count)))
        elapsed = time.perf_counter() - t0
        stats = await self.modems.ask(op="stats")
        delivered = sum(r.state == "sent" for r in results)
        texts = [t for sent in stats["sent"] for t in sent]
        if len(texts) != delivered or len(set(texts)) != len(texts):
            raise RuntimeError(f"{delivered} delivered but the modems sent {len(texts)}"
                               f" ({len(set(texts))} different)")
        return (elapsed, delivered, sum(stats["commands"]) / max(delivered, 1),
                [len(sent) for sent in stats["sent"]])

    async def latency(self, count: int) -> list[float]:
        """Outbox (just before submit) -> AT+CMGS at the modem, one message at a time."""
        assert self.engine is not None
        await self.modems.ask(op="delay", value=LATENCY_DELAY)
        await self.modems.ask(op="mark")
        starts: list[float] = []
        async with asyncio.timeout(count * 0.5 + 30):
            for _ in range(count):
                job = await self.insert()
                await asyncio.sleep(PAUSE)
                starts.append(time.monotonic())
                result = await (await self.engine.submit(job))
                if result is None or result.state != "sent":
                    raise RuntimeError(f"unexpected result {result}")
        stats = await self.modems.ask(op="stats")
        seen = sorted(t for times in stats["cmgs"] for t in times)
        if len(seen) != count:
            raise RuntimeError(f"{len(seen)} AT+CMGS for {count} single-part messages")
        return [cmgs - start for start, cmgs in zip(starts, seen, strict=True)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run_row(count: int, args: argparse.Namespace) -> Row:
    with tempfile.TemporaryDirectory(prefix="otpd-bench-") as tmp:
        async with Bench(Path(tmp), count, args.delay, args.keep_copies) as bench:
            elapsed, delivered, at_per_sms, spread = await bench.throughput(args.messages)
            latencies = await bench.latency(args.latency_messages)
    return Row(count, args.messages, elapsed, delivered, count / args.delay, at_per_sms,
               spread, latencies)


async def main(args: argparse.Namespace) -> int:
    rows = [await run_row(n, args) for n in args.modems]
    copies = "modems keep a copy of each sent part" if args.keep_copies else "no stored copies"
    print(f"\nD = {args.delay:g} s per SMS, {args.messages} messages per row offered at once,"
          f" {copies}; latency over {args.latency_messages} messages sent one at a time to"
          f" idle modems; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    print("| modems N | delivered | seconds | msg/s | limit N/D | ratio | AT per SMS |"
          " per modem | latency p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        lat = r.latencies
        p99 = percentile(lat, 0.99) * 1000
        spread = "/".join(map(str, r.spread))
        print(f"| {r.modems} | {r.delivered}/{r.messages} | {r.elapsed:.2f} | {r.rate:.2f} |"
              f" {r.limit:.1f} | {r.ratio:.3f} | {r.at_per_sms:.2f} | {spread} |"
              f" {statistics.median(lat) * 1000:.1f} | {p99:.1f} | {max(lat) * 1000:.1f} |")
        ok = ok and r.ratio >= 0.97 and p99 < 50 and r.delivered == r.messages
    print(f"\ngoals (ratio >= 0.97, p99 < 50 ms, all delivered): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--modems", default="1,4,8",
                        type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per SMS")
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--latency-messages", type=int, default=200)
    parser.add_argument("--keep-copies", action="store_true",
                        help="simulated modems keep a stored copy of every sent part")
    parser.add_argument("--profile", help="write cProfile stats of the daemon side here")
    parser.add_argument("--serve-sims", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.messages <= 20_000 or not 1 <= args.latency_messages <= 20_000:
        parser.error("--messages and --latency-messages: 1..20000 (the run stays bounded)")
    if not 0 < args.delay <= 5 or not all(1 <= n <= 64 for n in args.modems):
        parser.error("--delay 0..5 s and 1..64 modems (the run stays bounded)")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_sims:
        asyncio.run(serve_sims(arguments.serve_sims, arguments.modems[0], arguments.delay,
                               arguments.keep_copies))
        sys.exit(0)
    if arguments.profile:
        profiler = cProfile.Profile()
        code = profiler.runcall(asyncio.run, main(arguments))
        profiler.dump_stats(arguments.profile)
        pstats.Stats(arguments.profile).sort_stats("cumulative").print_stats(25)
    else:
        code = asyncio.run(main(arguments))
    sys.exit(code)
