"""Several otpd nodes on one broker queue, each with its own simulated modems
and SQLite outbox, sharing a Redis store (``[store] backend = "redis"``).

Used by tests/transports/test_shared_queue.py, tests/faults/test_shared_queue_kill.py
and bench/shared_queue.py. Nodes run in this process (the simulated modems
mostly sleep out their send time), or as a subprocess to SIGKILL
(:class:`NodeProcess`; its modems stay here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otpd.app import control
from otpd.app.daemon import Daemon
from otpd.app.settings import parse_settings
from otpd.channels.sms.simulator import ModemSimulator
from tests.support.daemon import modem_table
from tests.support.processes import OtpdChild
from tests.support.services import MQTT_HOST, MQTT_PORT, RABBIT_URL, REDIS_URL
from tests.support.waiting import wait_until


@dataclass
class Node:
    folder: Path
    config: Path
    sims: list[ModemSimulator]
    daemon: Daemon | None = None
    delivered: list[str] = field(default_factory=list)  # message texts, as sent

    @property
    def sent(self) -> int:
        return sum(len(s.sent) for s in self.sims)

    def texts(self) -> list[str]:
        return [m.text for s in self.sims for m in s.sent]

    async def start(self) -> None:
        for sim in self.sims:
            await sim.start()
        await self.restart()

    async def restart(self) -> None:
        self.daemon = Daemon(parse_settings(self.config.read_text(), self.config))
        await self.daemon.start()
        await wait_until(lambda: self.daemon is not None and all(
            c.connected for c in self.daemon.consumers), 15, "consumer connected")

    async def modems_ready(self, count: int | None = None) -> None:
        want = len(self.sims) if count is None else count

        def ready() -> bool:
            assert self.daemon is not None
            modems = self.daemon.status()["channels"]["sms"]["modems"]
            return sum(m["state"] in ("ready", "busy") for m in modems) >= want

        await wait_until(ready, 15, f"{want} modem(s) ready", interval=0.05)

    async def stop_daemon(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
            self.daemon = None

    async def stop(self) -> None:
        await self.stop_daemon()
        for sim in self.sims:
            await sim.stop()

    def intake(self) -> dict[str, Any]:
        assert self.daemon is not None
        return dict(self.daemon.status()["intake"] or {})

    def consumer(self) -> dict[str, Any]:
        assert self.daemon is not None
        return dict(self.daemon.status()["brokers"][0])


def broker_table(kind: str, topic: str) -> str:
    fast = "reconnect_min = 0.1\nreconnect_max = 0.5\nretry_delay = 0.2\n"
    if kind == "amqp":
        return f'[amqp]\nurl = "{RABBIT_URL}"\ntopic = "{topic}"\n{fast}'
    if kind == "redis":
        return (f'[redis]\nurl = "{REDIS_URL}"\nmode = "stream"\ntopic = "{topic}"\n'
                f'claim_idle = 2\n{fast}')
    if kind == "mqtt":
        return (f'[mqtt]\nhost = "{MQTT_HOST}"\nport = {MQTT_PORT}\ntopic = "{topic}"\n'
                f'protocol = 5\nshared_group = "g{topic[-6:]}"\n{fast}')
    raise ValueError(kind)


def make_node(folder: Path, *, name: str, kind: str, topic: str, prefix: str, modems: int,
              delay: float, failing: bool = False, delivery: str = "") -> Node:
    """A node (not started): ``modems`` simulators taking ``delay`` s per SMS;
    ``failing``: every send answered with an error."""
    folder.mkdir(parents=True, exist_ok=True)
    sims = [ModemSimulator(folder / f"m{i}", name=f"{name}-m{i}", delay=delay, seed=i,
                           fail_rate=1.0 if failing else 0.0) for i in range(modems)]
    tables = "".join(modem_table(f"{name}-m{i}", folder / f"m{i}") for i in range(modems))
    consumer = f'consumer = "{name}"\n' if kind == "redis" else ""
    client = f'client_id = "{name}-{prefix}"\n' if kind == "mqtt" else ""
    text = textwrap.dedent(f"""
        [server]
        enabled = false
        [store]
        path = "{folder / 'otpd.db'}"
        backend = "redis"
        redis_url = "{REDIS_URL}"
        redis_prefix = "{prefix}"
        [otp]
        key_file = "{folder.parent / 'otp.key'}"
        country_code = "62"
        [control]
        socket = "{folder / 'control.sock'}"
        [limits]
        enabled = false
        [metrics]
        enabled = false
        [sms]
        retry_delay = 0.2
        probe_interval = 0.3
        max_probe_interval = 1
        [delivery]
        wait = 0
        retry_base = 0.2
        retry_max = 0.5
        {delivery}
    """) + tables + "\n" + broker_table(kind, topic) + consumer + client
    config = folder / "otpd.toml"
    config.write_text(text)
    return Node(folder, config, sims)


def send_sms(i: int, lifetime: float, now: float, tag: str) -> bytes:
    """One send-sms command (receiver +62812..., text ``<tag> <i>``)."""
    return json.dumps({"command": "send-sms", "data": {
        "receiver": f"+62812{i:08d}", "message": f"{tag} {i}",
        "expiration": int(now + lifetime), "id": f"{tag}-{i}"}}).encode()


def unique_names() -> tuple[str, str]:
    """A queue/stream/topic name and a Redis key prefix nobody else uses."""
    token = uuid.uuid4().hex[:10]
    return f"otpd-share-{token}", f"otpdshare{token}:"


class NodeProcess(OtpdChild):
    """A node's daemon as a subprocess (``python -m otpd run``), to SIGKILL it;
    its simulated modems stay in this process (``node.sims``). Its stderr is
    appended to one log across restarts; its status is read over the control socket."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.log = node.folder / "otpd.log"
        self.socket = node.folder / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_offsets: list[int] = []  # where each start's lines begin in the log

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.log_offsets.append(self.log.stat().st_size if self.log.exists() else 0)
        with self.log.open("ab") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otpd", "run", "--config", str(self.node.config)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ))
        self.starts += 1

    async def status(self) -> dict[str, Any]:
        answer = await control.request(self.socket, {"op": "status"}, timeout=5.0)
        assert answer.get("ok"), answer
        return dict(answer["status"])

    async def wait_ready(self, modems: int | None = None, timeout: float = 30.0) -> None:
        """Until its consumers are connected and ``modems`` (default: all) are ready."""
        want = len(self.node.sims) if modems is None else modems

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"otpd exited with {self.proc.returncode}:\n"
                                     + self.log_text()[-3000:])
            try:
                status = await self.status()
            except (OSError, ValueError, TimeoutError):
                return False  # not listening yet
            sms = status.get("channels", {}).get("sms", {}).get("modems", [])
            up = sum(m.get("state") in ("ready", "busy") for m in sms)
            brokers = status.get("brokers", [])
            return bool(brokers) and all(b["connected"] for b in brokers) and up >= want

        await wait_until(ready, timeout, f"{self.node.folder.name} ready", interval=0.05)

