"""Helpers of the fault-injection suite.

* the daemon as a subprocess (``python -m otpd run``), to SIGKILL it;
* its control socket's status and its outbox, read from outside;
* a daemon consuming all four brokers (the tables and their unique topics).

Receivers noting each message's tag and arrival (``tests.support.mail``), the
publishers counting a message as accepted only once the broker confirmed it
(``tests.support.publishers``) and the brokers' processes
(``tests.support.processes``) are shared with the other suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from otpd.app import control
from otpd.broker import BrokerServer
from tests.support.brokers import (
    BROKER_FAST,
    OTPD_PASSWORD,
    OTPD_USER,
    broker_users,
    start_ws_broker,
    unique,
)
from tests.support.daemon import Client, modem_table


def modem(name: str, port: Path, prefixes: str = "[]") -> str:
    """A [[modem]] table for a simulated modem, with a 1 s prompt timeout."""
    return modem_table(name, port, prefixes, prompt_timeout=1)


class DaemonProcess:
    """``python -m otpd run`` with its stderr appended to one log across restarts."""

    def __init__(self, config: Path, log: Path, client: Client,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.client = client
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otpd", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=self.env or dict(os.environ),
            )
        self.starts += 1

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until REST answers ``echo`` (the store is open and the engine started)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"otpd exited with {self.proc.returncode}:\n"
                                     + self.log_text()[-3000:])
            with contextlib.suppress(aiohttp.ClientError, OSError):
                status, _ = await self.client.call("echo", {})
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("otpd did not become ready:\n" + self.log_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; returns the exit status (SIGKILL and -9 after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


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
