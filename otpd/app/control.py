"""Operator control socket: ``otpd status``, ``block``, ``unblock``, ``blocklist``, ``outbox``.

A Unix socket (mode 0660: root and the otpd group) speaking one JSON object
per line each way. It never shows message text or full numbers: receivers
are masked as in the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otpd.aio import within
from otpd.msisdn import InvalidReceiver, mask
from otpd.settings_reader import Section

if TYPE_CHECKING:  # only annotations: check-config (which reads ControlSettings) stays light
    from otpd.service import Service
    from otpd.store import Store

log = logging.getLogger("otpd.app.control")

_MAX_LINE = 4096
DEFAULT_SOCKET = Path("/run/otpd/control.sock")


@dataclass(frozen=True)
class ControlSettings:
    socket: Path  # Unix socket for the operator CLI (otpd status, block, outbox...)


def parse_control_settings(s: Section) -> ControlSettings:
    out = ControlSettings(socket=Path(s.str("socket", str(DEFAULT_SOCKET))))
    s.finish()
    return out


class ControlServer:
    def __init__(self, path: Path, service: Service, store: Store,
                 status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        # Changes go through the service (its rules, clock and logs); the store
        # is only read here, for the operator's lists and counts.
        self.service = service
        self.store = store
        self.status = status
        self._server: asyncio.AbstractServer | None = None
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "status": self._status,
            "block": self._block,
            "unblock": self._unblock,
            "blocklist": self._blocklist,
            "outbox": self._outbox,
        }

    async def start(self) -> bool:
        if self.path.exists() and await _answers(self.path):
            log.error("control.socket: another otpd answers on %s; this one has no control"
                      " socket (give each daemon its own control.socket)", self.path)
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a stale socket from a crash
            self._server = await asyncio.start_unix_server(
                self._client, sock=_private_socket(self.path), limit=_MAX_LINE)
        except OSError as exc:
            log.warning("control.socket: cannot listen on %s (%s); otpd status/block/outbox"
                        " will not reach this daemon", self.path, exc.strerror or exc)
            return False
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await within(10, reader.readline())
            answer = await self.handle(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = self._ops[request["op"]]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"unknown request; ops: {', '.join(self._ops)}"}
        try:
            return {"ok": True, **await op(request)}
        except (InvalidReceiver, ValueError) as exc:
            return {"ok": False, "error": str(exc)}

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status(), "counts": await self.store.counts()}

    async def _block(self, request: dict[str, Any]) -> dict[str, Any]:
        receiver = await self.service.block(str(request.get("receiver", "")), by="control")
        return {"receiver": receiver}

    async def _unblock(self, request: dict[str, Any]) -> dict[str, Any]:
        receiver, removed = await self.service.unblock(str(request.get("receiver", "")),
                                                       by="control")
        return {"receiver": receiver, "removed": removed}

    async def _blocklist(self, request: dict[str, Any]) -> dict[str, Any]:
        # The operator manages this list, so it shows full numbers.
        return {"blocked": await self.store.blocked()}

    async def _outbox(self, request: dict[str, Any]) -> dict[str, Any]:
        from otpd.store import MESSAGE_STATES  # here: reading the settings needs no store

        states = request.get("states") or ["pending", "failed", "expired"]
        if (not isinstance(states, list) or len(states) > len(MESSAGE_STATES)
                or not all(isinstance(x, str) and x in MESSAGE_STATES for x in states)):
            raise ValueError(f"states: a list of {', '.join(MESSAGE_STATES)}")
        limit = request.get("limit", 50)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit: a positive integer")
        rows = await self.store.recent_messages(sorted(set(states)), min(limit, 1000))
        return {"messages": [
            {"id": r.id, "command": r.command, "channel": r.channel,
             "receiver": mask(r.receiver), "state": r.state, "code": r.code,
             "reason": r.reason, "attempts": r.attempts, "via": r.via,
             "created_at": r.created_at, "expires_at": r.expires_at,
             # What the network reported since (SMS with delivery reports only).
             "delivery": r.delivery, "delivery_at": r.delivery_at,
             "delivered_at": r.delivered_at, "reported_at": r.reported_at}
            for r in rows
        ]}


def _private_socket(path: Path) -> socket.socket:
    """A listening Unix socket created 0660: the umask is narrowed only around
    the synchronous bind (no await in between, so no other task runs with it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def intake_lines(status: dict[str, Any]) -> list[str]:
    """``otpd status``: each channel's free capacity and backlog, and each
    consumer's intake (several nodes on one queue)."""
    intake = status.get("intake") or {}
    lines = []
    for name, c in intake.get("channels", {}).items():
        why = "" if c.get("taking") else f": {c.get('reason') or 'no room'}"
        lines.append(f"intake {name}: {c.get('ready', 0)}/{c.get('senders', 0)} senders ready"
                     f" ({c.get('free', 0)} free), {c.get('send_time', 0):.2f} s per message,"
                     f" backlog {c.get('backlog', 0)} of {c.get('target', 0)},"
                     f" {'taking' if c.get('taking') else 'not taking'}{why};"
                     f" {c.get('handed_over', 0)} handed back")
    for b in status.get("brokers", []):
        if "taking" in b:
            lines.append(f"consumer {b['name']}: "
                         + ("taking work" if b["taking"]
                            else f"not taking work ({b.get('not_taking') or '?'})")
                         + f", {b.get('handed_back', 0)} passed on")
    return lines


async def _answers(path: Path) -> bool:
    try:
        _, writer = await within(1.0, asyncio.open_unix_connection(path))
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def request(path: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request to a running daemon's control socket."""
    reader, writer = await within(timeout, asyncio.open_unix_connection(path))
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        line = await within(timeout, reader.readline())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    answer: dict[str, Any] = json.loads(line)
    return answer
