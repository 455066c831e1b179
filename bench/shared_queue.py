"""Several nodes on one queue: delivered rate against the modems' physical limit,
and where the work goes when nodes differ or one cannot send (issue #13).

Each node is a whole daemon (its own SQLite outbox, the Redis store shared,
``[store] backend = "redis"``) with simulated modems on pseudo-terminals taking
``--delay`` s per SMS; all nodes consume one RabbitMQ queue (or one Redis
stream group, or one MQTT shared subscription). A burst of ``--messages``
``send-sms`` is published at once; the rate is messages delivered per second
from the first publish to the last send, the ratio divides it by the physical
limit (modems / delay). Rows:

* 1 + 3 modems: goal >= 0.9 (without the intake each node took half: ~0.5);
* 3 nodes x 2 modems: goal >= 0.95;
* a node whose modem fails every send next to a healthy node, 60 s lifetime:
  goal: every message delivered by the healthy node before it expires;
* a node stopped mid-burst and started again: goal: nothing lost (each message
  delivered; "dup" counts the one a modem was sending at the stop, if any);
* the same with the node a subprocess (``python -m otpd run``), SIGKILLed
  mid-burst and started again after 0.5 s: goal: nothing lost; "dup" counts
  the messages its modems were sending at the kill (the restart logs each as
  an uncertain resend: shown after the count).

    .venv/bin/python bench/shared_queue.py [--delay 0.2] [--messages 400]
        [--brokers amqp,redis,mqtt] [--rows sigkill]

Nodes run in one process (the modems sleep out their send time), but for the
SIGKILLed one (its modems stay here); bounded: each row has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from tests.faults.helpers import uncertain_rows  # noqa: E402
from tests.support.cluster import (  # noqa: E402
    Node,
    NodeProcess,
    make_node,
    send_sms,
    unique_names,
)
from tests.support.services import MQTT_HOST, MQTT_PORT, RABBIT_URL, REDIS_URL  # noqa: E402

DELIVERY = "horizon = 2.0\nhandover_after = 2.0\n"
Publish = Callable[[list[bytes]], Awaitable[None]]


async def publisher(kind: str, topic: str) -> tuple[Publish, Callable[[], Awaitable[None]]]:
    if kind == "amqp":
        connection = await aio_pika.connect(RABBIT_URL)
        channel = await connection.channel()
        await channel.declare_queue(topic, durable=True)

        async def amqp(bodies: list[bytes]) -> None:
            for body in bodies:
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key=topic)

        async def close_amqp() -> None:
            await channel.queue_delete(topic)
            await connection.close()

        return amqp, close_amqp
    if kind == "redis":
        client = aioredis.from_url(REDIS_URL)

        async def stream(bodies: list[bytes]) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for body in bodies:
                    pipe.xadd(topic, {"message": body})
                await pipe.execute()

        async def close_redis() -> None:
            await client.delete(topic)
            await client.aclose()

        return stream, close_redis
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client5 = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client5.connect(MQTT_HOST, MQTT_PORT)
    client5.loop_start()

    async def mqtt_pub(bodies: list[bytes]) -> None:
        for body in bodies:
            client5.publish(topic, body, qos=1).wait_for_publish(5)

    async def close_mqtt() -> None:
        client5.loop_stop()
        client5.disconnect()

    return mqtt_pub, close_mqtt


async def wait_for(check: Callable[[], bool], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


async def burst(kind: str, shape: list[tuple[int, bool]], messages: int, delay: float,
                lifetime: float, restart: str = "") -> dict[str, object]:
    """Nodes of ``shape`` (modems, failing) on one queue; the burst; the result.
    ``restart``: "stop" (the first node stopped and started in this process) or
    "kill" (the first node a subprocess, SIGKILLed and started again)."""
    topic, prefix = unique_names()
    pub, close = await publisher(kind, topic)
    nodes: list[Node] = []
    killed: NodeProcess | None = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, (modems, failing) in enumerate(shape):
                node = make_node(Path(tmp) / f"n{i}", name=f"n{i}", kind=kind, topic=topic,
                                 prefix=prefix, modems=modems, delay=delay, failing=failing,
                                 delivery=DELIVERY)
                if i == 0 and restart == "kill":
                    killed = NodeProcess(node)
                    for sim in node.sims:
                        await sim.start()
                    killed.start()
                    await killed.wait_ready()
                else:
                    await node.start()
                    await node.modems_ready()
                nodes.append(node)
            now = time.time()
            bodies = [send_sms(i, lifetime, now, "b") for i in range(messages)]
            t0 = time.monotonic()
            await pub(bodies)

            def all_sent() -> bool:
                return len({t for n in nodes for t in n.texts()}) >= messages

            if restart:
                await wait_for(lambda: nodes[0].sent >= messages // 10, t0 + 60)
                if killed is not None:
                    killed.kill()
                    await asyncio.sleep(0.5)  # its downtime
                    killed.start()
                    await killed.wait_ready()
                else:
                    await nodes[0].stop_daemon()
                    await nodes[0].restart()
            done = await wait_for(all_sent, t0 + min(lifetime, 180))
            took = max(time.monotonic() - t0, 1e-6)
            texts = Counter(t for n in nodes for t in n.texts())
            healthy = [n for n, (_, failing) in zip(nodes, shape, strict=True) if not failing]
            limit = sum(m for m, f in shape if not f) / delay
            handed_back = 0
            for n in nodes:
                if killed is not None and n is killed.node:
                    intake = (await killed.status())["intake"] or {}
                else:
                    intake = n.intake()
                handed_back += intake["channels"]["sms"]["handed_over"]
            uncertain = sum(uncertain_rows(killed.log_text()).values()) if killed else 0
            return {
                "done": done, "took": took, "delivered": len(texts),
                "dup": sum(texts.values()) - len(texts), "split": [n.sent for n in nodes],
                "ratio": len(texts) / took / limit,
                "healthy_sent": sum(n.sent for n in healthy),
                "handed_back": handed_back, "uncertain": uncertain,
            }
        finally:
            if killed is not None:
                await asyncio.to_thread(killed.terminate)
                for sim in killed.node.sims:
                    await sim.stop()
            for node in nodes:
                if killed is None or node is not killed.node:
                    await node.stop()
            await close()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--brokers", default="amqp,redis,mqtt")
    parser.add_argument("--rows", default="", help="only rows whose title has one of these"
                        " words (comma-separated), e.g. sigkill")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    n, d = args.messages, args.delay
    rows = [
        ("1 + 3 modems", [(1, False), (3, False)], n, 3600.0, "", "ratio", 0.9),
        ("3 x 2 modems", [(2, False), (2, False), (2, False)], n, 3600.0, "", "ratio", 0.95),
        ("failing + healthy (2 + 2), 60 s", [(2, True), (2, False)], max(n // 4, 20), 60.0,
         "", "healthy", 1.0),
        ("restart mid-burst (2 + 2)", [(2, False), (2, False)], max(n // 2, 20), 3600.0, "stop",
         "all", 1.0),
        ("SIGKILL mid-burst (2 + 2)", [(2, False), (2, False)], max(n // 2, 20), 3600.0, "kill",
         "all", 1.0),
    ]
    print(f"{d:g} s per SMS; burst of the size shown, all published at once.\n")
    print("| broker | nodes | messages | delivered | split per node | handed back | dup |"
          " time s | vs limit | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for kind in args.brokers.split(","):
        for title, shape, count, lifetime, restart, goal, want in rows:
            if restart == "kill" and kind == "mqtt":
                continue  # the broker assigns the work; nothing new to measure
            if args.rows and not any(w in title.lower() for w in args.rows.split(",")):
                continue
            r = await burst(kind, shape, count, d, lifetime, restart)
            if goal == "ratio":
                met = bool(r["done"]) and float(str(r["ratio"])) >= want
                goal_text = f">= {want:g}"
            elif goal == "healthy":
                met = bool(r["done"]) and r["healthy_sent"] == count
                goal_text = "all by the healthy node"
            else:
                met = bool(r["done"]) and r["delivered"] == count
                goal_text = "none lost"
            failed |= not met and kind == "amqp"
            dup = f"{r['dup']} ({r['uncertain']} uncertain)" if restart == "kill" else r["dup"]
            print(f"| {kind} | {title} | {count} | {r['delivered']} |"
                  f" {json.dumps(r['split'])} | {r['handed_back']} | {dup} |"
                  f" {float(str(r['took'])):.1f} | {float(str(r['ratio'])):.2f} | {goal_text} |"
                  f" {'yes' if met else 'NO'} |", flush=True)
    print("\nMQTT: the broker assigns each message to a group member when it is published"
          " (Mosquitto: round robin), whatever the member can send; a node can only hand"
          " back, by re-publishing, what it stored and cannot send in time.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
