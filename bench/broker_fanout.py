"""Fan-out benchmark: ``otpd broker`` against a bare ``websockets`` relay.

One publisher and N subscribers (default 100) on one topic, over loopback.
Each server runs in its own process; all clients share this one. Two phases
per server:

* flood: the publisher sends M messages as fast as it can; throughput is
  deliveries (messages x subscribers) per second until the last one arrives;
* paced: messages at a fixed rate; latency from send to each receipt.

The bare relay is what websockets' documentation suggests (``broadcast`` to
the topic's other connections, no auth, no per-client queue), so the ratio is
the cost of otpd's isolation and back-pressure. Bounded in messages and time.

    .venv/bin/python bench/broker_fanout.py [--subscribers 100] [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, broadcast, serve

# Runnable from a checkout without installing otpd (also in the spawned servers).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

USER, PASSWORD = "bench", "bench-password"
TOPIC = "sms"
PHASE_TIMEOUT = 60.0


# -- servers (child processes) ------------------------------------------------


async def _raw_server(ready: Connection) -> None:
    topics: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        topic = ws.request.path.partition("topic=")[2]
        peers = topics.setdefault(topic, set())
        peers.add(ws)
        try:
            async for message in ws:
                broadcast([p for p in peers if p is not ws], message)
        finally:
            peers.discard(ws)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=65536) as server:
        ready.send(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, ready.recv)


async def _otpd_server(ready: Connection, users: str) -> None:
    from otpd.broker import BrokerConfig, BrokerServer

    broker = BrokerServer(BrokerConfig(htpasswd=Path(users), port=0))
    await broker.start()
    ready.send(broker.port)
    await asyncio.get_running_loop().run_in_executor(None, ready.recv)
    await broker.stop()


def _server_main(kind: str, ready: Connection, users: str) -> None:
    if kind == "raw":
        asyncio.run(_raw_server(ready))
    else:
        asyncio.run(_otpd_server(ready, users))


# -- clients (this process) ---------------------------------------------------


@dataclass
class Subscriber:
    expected: int = 0
    received: int = 0
    latencies: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


# About the size of a real send-sms command; the send time leads so that the
# subscribers (which share one process and CPU) can read it cheaply.
_BODY = json.dumps(
    {
        "command": "send-sms",
        "data": {"receiver": "08126666666", "message": "Your OTP is 123456", "id": 1},
    }
)


def _payload() -> str:
    return f"{time.perf_counter():.9f} {_BODY}"


async def _subscribe(ws: ClientConnection, sub: Subscriber) -> None:
    async for message in ws:
        now = time.perf_counter()
        assert isinstance(message, str)
        sub.latencies.append(now - float(message[: message.index(" ")]))
        sub.received += 1
        if sub.received >= sub.expected:
            sub.done.set()


@dataclass
class Result:
    name: str
    deliveries_per_s: float
    publish_per_s: float
    flood_p99_ms: float
    paced_p50_ms: float
    paced_p99_ms: float
    lost: int


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def _run_phase(
    url: str,
    headers: dict[str, str],
    subscribers: list[tuple[ClientConnection, Subscriber]],
    messages: int,
    rate: float | None,
) -> tuple[float, float, list[float], int]:
    for _, sub in subscribers:
        sub.expected, sub.received, sub.latencies = messages, 0, []
        sub.done.clear()
    async with connect(url, additional_headers=headers, compression=None) as pub:
        start = time.perf_counter()
        for seq in range(messages):
            await pub.send(_payload())
            if rate is not None:
                await asyncio.sleep(max(0.0, start + (seq + 1) / rate - time.perf_counter()))
        published = time.perf_counter() - start
        try:
            async with asyncio.timeout(PHASE_TIMEOUT):
                await asyncio.gather(*(sub.done.wait() for _, sub in subscribers))
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - start
    latencies = [lat for _, sub in subscribers for lat in sub.latencies]
    lost = sum(messages - sub.received for _, sub in subscribers)
    return elapsed, published, latencies, lost


async def _bench_clients(name: str, port: int, args: argparse.Namespace) -> Result:
    url = f"ws://127.0.0.1:{port}/ws?topic={TOPIC}"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    subs: list[tuple[ClientConnection, Subscriber]] = []
    for _ in range(args.subscribers):
        ws = await connect(url, additional_headers=headers, compression=None, max_size=None)
        subs.append((ws, Subscriber()))
    tasks = [asyncio.create_task(_subscribe(ws, sub)) for ws, sub in subs]
    try:
        await asyncio.sleep(0.2)
        elapsed, published, flood_lat, lost1 = await _run_phase(
            url, headers, subs, args.messages, None
        )
        delivered = args.messages * args.subscribers - lost1
        _, _, paced_lat, lost2 = await _run_phase(
            url, headers, subs, args.paced_messages, args.rate
        )
    finally:
        for ws, _ in subs:
            await ws.close()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Result(
        name=name,
        deliveries_per_s=delivered / elapsed,
        publish_per_s=args.messages / published,
        flood_p99_ms=_percentile(flood_lat, 99) * 1000,
        paced_p50_ms=statistics.median(paced_lat) * 1000 if paced_lat else float("nan"),
        paced_p99_ms=_percentile(paced_lat, 99) * 1000,
        lost=lost1 + lost2,
    )


def _median(results: list[Result]) -> Result:
    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results))

    return Result(
        name=results[0].name,
        deliveries_per_s=med("deliveries_per_s"),
        publish_per_s=med("publish_per_s"),
        flood_p99_ms=med("flood_p99_ms"),
        paced_p50_ms=med("paced_p50_ms"),
        paced_p99_ms=med("paced_p99_ms"),
        lost=sum(r.lost for r in results),
    )


def _bench(kind: str, users: Path, args: argparse.Namespace) -> Result:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(kind, child, str(users)), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError(f"{kind} server did not start")
        port = parent.recv()
        name = "otpd broker" if kind == "otpd" else "bare websockets relay"
        return asyncio.run(_bench_clients(name, port, args))
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=2000, help="flood phase messages")
    parser.add_argument("--paced-messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="paced phase messages/s")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs; medians shown")
    args = parser.parse_args()
    if not (1 <= args.subscribers <= 1000 and 1 <= args.messages <= 100_000):
        parser.error("subscribers must be 1..1000 and messages 1..100000")
    if not (1 <= args.paced_messages <= 10_000 and 1 <= args.rate <= 10_000):
        parser.error("paced messages and rate must be 1..10000")
    if not 1 <= args.rounds <= 10:
        parser.error("rounds must be 1..10")

    from otpd.auth.htpasswd import hash_password

    with tempfile.TemporaryDirectory() as tmp:
        users = Path(tmp) / "users"
        users.write_text(f"{USER}:{hash_password(PASSWORD, cost=4)}\n")
        # The default ACL file next to the users file: one account, one topic.
        (Path(tmp) / "broker.acl").write_text(f"{USER} pubsub={TOPIC}\n")
        runs: dict[str, list[Result]] = {"raw": [], "otpd": []}
        for _ in range(args.rounds):
            for kind, results in runs.items():
                results.append(_bench(kind, users, args))

    raw, ours = results = [_median(r) for r in runs.values()]
    print(
        f"\n{args.subscribers} subscribers, 1 topic, flood of {args.messages} messages, "
        f"then {args.paced_messages} at {args.rate:g}/s; loopback, ~150-byte messages; "
        f"median of {args.rounds} alternating rounds\n"
    )
    print(
        "| server | deliveries/s | publish msg/s | flood p99 ms | paced p50 ms | paced p99 ms |",
        end="",
    )
    print(" lost |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} | {r.deliveries_per_s:,.0f} | {r.publish_per_s:,.0f} | "
            f"{r.flood_p99_ms:.1f} | {r.paced_p50_ms:.2f} | {r.paced_p99_ms:.2f} | {r.lost} |"
        )
    print(
        f"\notpd / bare: throughput {ours.deliveries_per_s / raw.deliveries_per_s:.2f}x, "
        f"paced p99 {ours.paced_p99_ms / raw.paced_p99_ms:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
