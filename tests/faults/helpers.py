"""Helpers of the fault-injection suite.

* its control socket's status and its outbox, read from outside;
* a daemon consuming all four brokers (the tables and their unique topics);
* after SIGKILLs: the rows a restart resent as uncertain, and the message id
  each outbox row carries across nodes (hand-over copies included).

Receivers noting each message's tag and arrival (``tests.support.mail``), the
publishers counting a message as accepted only once the broker confirmed it
(``tests.support.publishers``) and the brokers' processes
and the daemon as a subprocess (``tests.support.processes``) are shared with the other suites.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otpd.app import control
from otpd.broker import BrokerServer
from otpd.delivery.handover import HANDOVER_PREFIX
from tests.support.brokers import (
    BROKER_FAST,
    OTPD_PASSWORD,
    OTPD_USER,
    broker_users,
    start_ws_broker,
    unique,
)
from tests.support.daemon import modem_table


def modem(name: str, port: Path, prefixes: str = "[]") -> str:
    """A [[modem]] table for a simulated modem, with a 1 s prompt timeout."""
    return modem_table(name, port, prefixes, prompt_timeout=1)


async def daemon_status(socket_path: Path) -> dict[str, Any]:
    """The control socket's ``status`` (engine state, broker consumers, outbox counts)."""
    answer = await control.request(socket_path, {"op": "status"}, timeout=5.0)
    assert answer.get("ok"), answer
    return answer


def outbox(db: Path) -> list[dict[str, Any]]:
    """Every outbox row (read from another connection; WAL lets it read alongside)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")]
    finally:
        conn.close()


# -- a daemon consuming all four brokers ----------------------------------------------------


async def start_fault_broker(tmp_path: Path, port: int = 0) -> BrokerServer:
    """``otpd broker`` with otpd's account and OTP-Publisher's (user name as password)."""
    return await start_ws_broker(broker_users(tmp_path / "broker-users"), port)


@dataclass(frozen=True)
class BrokerTopics:
    queue: str = field(default_factory=lambda: unique("q"))
    stream: str = field(default_factory=lambda: unique("s"))
    topic: str = field(default_factory=lambda: unique("t"))
    ws_topic: str = field(default_factory=lambda: unique("w"))
    client_id: str = field(default_factory=lambda: unique("otpd"))


def broker_tables(topics: BrokerTopics, *, rabbit_url: str, redis_url: str, mqtt_host: str,
                  mqtt_port: int, ws_port: int, ws_extra: str = "") -> str:
    """The [amqp], [redis] (stream), [mqtt] and [ws] tables of a daemon."""
    return f"""
[amqp]
url = "{rabbit_url}"
topic = "{topics.queue}"
{BROKER_FAST}
[redis]
url = "{redis_url}"
topic = "{topics.stream}"
mode = "stream"
group = "otpd"
consumer = "pi-1"
claim_idle = 0.5
{BROKER_FAST}
[mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
topic = "{topics.topic}"
client_id = "{topics.client_id}"
{BROKER_FAST}
[ws]
url = "ws://127.0.0.1:{ws_port}/ws"
username = "{OTPD_USER}"
password = "{OTPD_PASSWORD}"
topic = "{topics.ws_topic}"
reply_min_delay = 0
{ws_extra}{BROKER_FAST}
"""


# -- who sent what, after SIGKILLs -------------------------------------------------------

# The restart's log line for a message a kill caught inside its send.
UNCERTAIN = re.compile(r"message (\d+) to \S+ was being sent when otpd stopped; it may have"
                       r" gone out already")


def uncertain_rows(log_text: str) -> Counter[int]:
    """Outbox row ids a restart resent because a kill landed inside their send."""
    return Counter(int(m.group(1)) for m in UNCERTAIN.finditer(log_text))


def tags_of_rows(outboxes: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, int], str]:
    """(node, row id) -> the message id (tag) it carries, across several nodes'
    outboxes: a row's ``dedupe_key`` is ``<id>|<receiver>``; a hand-over copy's
    id names the row it came from (``handover-<row>-<created µs>``) on another node."""
    direct: dict[tuple[str, int], str] = {}
    by_origin: dict[tuple[int, int], str] = {}
    for node, rows in outboxes.items():
        for r in rows:
            key = str(r["dedupe_key"] or "").split("|")[0]
            if key and not key.startswith(HANDOVER_PREFIX):
                direct[(node, r["id"])] = key
                by_origin[(r["id"], int(r["created_at"] * 1_000_000))] = key
    out = dict(direct)
    for _ in range(3):  # a copy of a copy (handed over twice) resolves in a later pass
        for node, rows in outboxes.items():
            for r in rows:
                key = str(r["dedupe_key"] or "").split("|")[0]
                if not key.startswith(HANDOVER_PREFIX) or (node, r["id"]) in out:
                    continue
                row_id, _, micros = key[len(HANDOVER_PREFIX):].partition("-")
                tag = by_origin.get((int(row_id), int(micros)))
                if tag is not None:
                    out[(node, r["id"])] = tag
                    by_origin[(r["id"], int(r["created_at"] * 1_000_000))] = tag
    return out
