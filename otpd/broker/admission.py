"""Connection caps for ``otpd broker``: per client address group (IPv6: per /64)
and in total, kept below the descriptor limit.

websockets' ``serve()`` runs asyncio's own accept loop, which cannot refuse a
connection before its protocol exists. So the check is in the protocol's
``connection_made``: a connection over a cap is reset there, before a byte of
HTTP is read or written, and gives nothing back. While the caps hold, the process
stays below its descriptor limit and accept() never fails with EMFILE; if it
fails anyway (another process ate the system's descriptors), asyncio's log line
for it, repeated once a second, is reduced to one per interval with a count.

With TLS, asyncio calls ``connection_made`` only after the TLS handshake, so a
handshake in progress is not counted; it is bounded by ``open_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import struct
from typing import Any

from websockets.asyncio.server import ServerConnection

from otpd.connection_caps import ConnectionCaps, ConnectionLimits, Refusal, Slot, Throttled
from otpd.connection_caps import connection_limits as _limits
from otpd.netutil import address_group

log = logging.getLogger("otpd.broker")

REPORT_INTERVAL = 60.0  # s between two log lines about the same kind of trouble
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, keeps no TIME_WAIT
# asyncio's message when accept() fails with EMFILE, ENFILE, ENOBUFS or ENOMEM.
_ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


def descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limits(total: int | None, per_address: int | None,
                      nofile: int | None = None) -> ConnectionLimits:
    """The caps in force: the configured ones (None: derived from the descriptor
    limit, like the REST listener's), lowered to fit below that limit."""
    return _limits(descriptor_limit() if nofile is None else nofile, total, per_address)


class Admission:
    """The caps and the throttled log lines of one broker."""

    def __init__(self, caps: ConnectionCaps, interval: float = REPORT_INTERVAL) -> None:
        self.caps = caps
        self.interval = interval
        self.refusals = Throttled(interval)
        self.accept_errors = Throttled(interval)
        self._flush: asyncio.TimerHandle | None = None  # reports refusals not logged yet
        self._last_refused = ""

    def admit(self, transport: asyncio.BaseTransport) -> Slot | None:
        """A slot for the connection, or None: it was reset (and counted)."""
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        group = address_group(address)
        got = self.caps.acquire(group)
        if isinstance(got, Slot):
            return got
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A reset rather than a FIN: the client learns at once and no TIME_WAIT stays.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:
            transport.close()
        self._refused(group)
        return None

    def close(self) -> None:
        """Log the refusals not reported yet (at stop)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._report_refusals(self.refusals.flush(_now()))

    def stats(self) -> dict[str, int]:
        return {
            "open": self.caps.open,
            "refused_per_address": self.caps.refused[Refusal.PER_ADDRESS],
            "refused_total": self.caps.refused[Refusal.TOTAL],
            "accept_errors": self.accept_errors.total,
        }

    def _refused(self, group: str) -> None:
        self._last_refused = group
        count = self.refusals.hit(_now())
        if count:
            self._report_refusals(count)
        elif self._flush is None:
            # The rest of a burst is logged once, at the end of the interval.
            self._flush = asyncio.get_running_loop().call_later(self.interval,
                                                                self._flush_refusals)

    def _flush_refusals(self) -> None:
        self._flush = None
        self._report_refusals(self.refusals.flush(_now()))

    def _report_refusals(self, count: int) -> None:
        if count:
            log.warning("refused %d connection(s) over the caps (%d per address, %d in all);"
                        " the latest from %s", count, self.caps.per_address, self.caps.total,
                        self._last_refused)

    def exception_handler(self, loop: asyncio.AbstractEventLoop,
                          context: dict[str, Any]) -> None:
        """For ``loop.set_exception_handler``: asyncio's accept-error line throttled,
        everything else to the default handler."""
        if str(context.get("message", "")).startswith(_ACCEPT_OUT_OF_RESOURCES):
            count = self.accept_errors.hit(loop.time())
            if count:
                exc = context.get("exception")
                log.warning("accept() out of resources: %s (%d times since the last report);"
                            " asyncio retries each second", exc, count)
            return
        loop.default_exception_handler(context)


def _now() -> float:
    return asyncio.get_running_loop().time()


def capped_connection(admission: Admission) -> type[ServerConnection]:
    """For ``serve(create_connection=...)``: connections checked against the caps
    as soon as they exist, their slot given back when they end."""

    class CappedConnection(ServerConnection):
        _slot: Slot | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # websockets' state first: connection_lost and the handler task need it.
            super().connection_made(transport)
            self._slot = admission.admit(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._slot is not None:
                self._slot.release()
                self._slot = None
            super().connection_lost(exc)

    return CappedConnection
