"""The REST listener: its own accept loop, and aiohttp's request handler with
the connection guard of ``otpd.transports.rest_guard`` applied.

Why not ``web.TCPSite``: asyncio's accept loop cannot refuse a connection before
the protocol (and the TLS handshake) exists, and on EMFILE it logs and reschedules
itself once per pending connection, which floods the log. Here a connection over
a cap is reset right after ``accept()``, before any TLS or HTTP, and an accept
error pauses the loop and is logged at most once per interval with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from otpd.netutil import address_group
from otpd.transports.rest_guard import (
    Backoff,
    ConnectionCaps,
    ConnectionClock,
    Expiry,
    Refusal,
    Slot,
    Throttled,
    Timeouts,
)

log = logging.getLogger("otpd.rest")

SERVER_NAME = "otpd"  # the Server header: no version for a scanner to match
REPORT_INTERVAL = 60.0  # s between two log lines about the same kind of trouble
# The process is out of descriptors or memory: pause accepting, do not spin.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The client went away between SYN and accept: nothing to report.
_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, keeps no TIME_WAIT


# Set by the routes' Expect handler: send "100 Continue" on the first read of the body.
EXPECT_CONTINUE = web.RequestKey("otpd.expect_continue", bool)
RequestFactory = Callable[[RawRequestMessage, StreamReader, RequestHandler,
                           AbstractStreamWriter, "asyncio.Task[None]"], web.BaseRequest]


class ContinueRequest(web.Request):
    """Sends ``100 Continue`` when the body is first read. The handlers read it only
    after authentication, so a refused caller is never invited to send its body."""

    async def read(self) -> bytes:
        if self.get(EXPECT_CONTINUE):
            self[EXPECT_CONTINUE] = False
            await self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.writer.output_size = 0  # the response proper has not started
        return await super().read()


def request_factory(client_max_size: int) -> RequestFactory:
    """For ``web.Server.request_factory``: requests are ``ContinueRequest``."""

    def make(message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
             writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
        return ContinueRequest(message, payload, protocol, writer, task,
                               asyncio.get_running_loop(), client_max_size=client_max_size)

    return make


class Guard:
    """Shared by the listener and its connections: caps, timeouts, counters."""

    def __init__(self, caps: ConnectionCaps, timeouts: Timeouts) -> None:
        self.caps = caps
        self.timeouts = timeouts
        self.expired = {e: 0 for e in Expiry}
        self.refusals = Throttled(REPORT_INTERVAL)
        self.accept_errors = Throttled(REPORT_INTERVAL)
        self.bad_requests = Throttled(REPORT_INTERVAL)

    def stats(self) -> dict[str, int]:
        return {
            "open": self.caps.open,
            "refused_per_address": self.caps.refused[Refusal.PER_ADDRESS],
            "refused_total": self.caps.refused[Refusal.TOTAL],
            "closed_header_timeout": self.expired[Expiry.HEADER],
            "closed_body_timeout": self.expired[Expiry.BODY],
            "closed_idle": self.expired[Expiry.IDLE],
            "accept_errors": self.accept_errors.total,
        }


class GuardedHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol, closed when its deadline passes, giving its
    slot back when it ends."""

    def __init__(self, manager: web.Server, guard: Guard, slot: Slot,
                 loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = guard
        self._slot = slot
        self._clock: ConnectionClock | None = None
        self._payload: Any = None  # the body stream of the last request head
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._clock = ConnectionClock(self._guard.timeouts, self._loop.time())
        super().connection_made(transport)
        self._reschedule()

    def data_received(self, data: bytes) -> None:
        clock = self._clock
        if clock is None:
            super().data_received(data)
            return
        now = self._loop.time()
        if data:
            clock.data(now)
        before = self._request_count
        super().data_received(data)
        heads = self._request_count - before
        if heads > 0:
            # Still queued: the handler task runs after this callback returns.
            self._payload = self._messages[-1][1] if self._messages else None
            clock.heads(now, heads, self._payload is None or self._payload.is_eof())
        elif self._payload is not None and self._payload.is_eof():
            clock.body_complete()
        self._reschedule()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        # Also aiohttp's own answers (400 for an unparsable head) that no
        # application signal sees.
        if not resp.prepared:
            resp.headers[hdrs.SERVER] = SERVER_NAME
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self._clock is not None:
                self._clock.answered(self._loop.time())
                self._reschedule()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # Garbage sent to the port is logged by aiohttp with a traceback each time:
        # one line per interval, with the count, is enough (the log is on an SD card).
        count = self._guard.bad_requests.hit(self._loop.time())
        if count:
            kw.setdefault("exc_info", True)
            self.logger.warning(*args, **kw)
            if count > 1:
                log.warning("REST: %d requests failed in the last %.0f s (one logged)", count,
                            REPORT_INTERVAL)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._clock = None
        self._payload = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slot.release()
        super().connection_lost(exc)

    def _reschedule(self) -> None:
        clock = self._clock
        found = clock.deadline() if clock is not None else None
        when = found[0] if found is not None else None
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_deadline) if when is not None else None

    def _on_deadline(self) -> None:
        self._timer, self._timer_at = None, None
        clock = self._clock
        if clock is None:
            return
        expired = clock.expired(self._loop.time())
        if expired is None:
            self._reschedule()
            return
        self._guard.expired[expired] += 1
        log.debug("REST: closing a connection from %s: %s timeout", self._slot.group,
                  expired.value)
        self.force_close()


class GuardedListener:
    """Listening sockets for ``host:port`` and their accept loops."""

    def __init__(self, server: web.Server, guard: Guard, *, ssl_context: ssl.SSLContext | None,
                 handler_args: dict[str, Any], backlog: int = 128) -> None:
        self._server = server
        self._guard = guard
        self._ssl = ssl_context
        self._handler_args = handler_args
        self._backlog = backlog
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._flush: asyncio.TimerHandle | None = None  # reports refusals not logged yet
        self._last_refused = ""

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # Like asyncio: an IPv6 socket serves IPv6 only, IPv4 has its own.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except OSError:
            self._close_sockets()
            raise
        self._accepting = [loop.create_task(self._accept(s)) for s in self._sockets]

    async def stop(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting = []
        self._close_sockets()
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        if self._flush is not None:
            self._flush.cancel()
        self._flush_refusals()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            try:
                conn, address = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    continue
                pause = backoff.next()
                count = self._guard.accept_errors.hit(loop.time())
                if count:
                    kind = "out of resources" if exc.errno in _RESOURCE_ERRNOS else "failed"
                    log.warning("REST: accept() %s: %s (%d times since the last report);"
                                " pausing new connections", kind, exc.strerror or exc, count)
                await asyncio.sleep(pause)
                continue
            backoff.reset()
            self._admit(conn, address)

    def _admit(self, conn: socket.socket, address: Any) -> None:
        group = address_group(str(address[0]))
        slot = self._guard.caps.acquire(group)
        if isinstance(slot, Refusal):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            self._refused(group)
            return
        task = asyncio.get_running_loop().create_task(self._connect(conn, slot))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _refused(self, group: str) -> None:
        loop = asyncio.get_running_loop()
        self._last_refused = group
        count = self._guard.refusals.hit(loop.time())
        if count:
            self._report_refusals(count)
        elif self._flush is None:
            # The rest of a burst is logged once, at the end of the interval.
            self._flush = loop.call_later(REPORT_INTERVAL, self._flush_refusals)

    def _flush_refusals(self) -> None:
        self._flush = None
        self._report_refusals(self._guard.refusals.flush(asyncio.get_running_loop().time()))

    def _report_refusals(self, count: int) -> None:
        if not count:
            return
        caps = self._guard.caps
        log.warning("REST: refused %d connection(s) over the caps (%d per address, %d in all);"
                    " the latest from %s", count, caps.per_address, caps.total,
                    self._last_refused)

    async def _connect(self, conn: socket.socket, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        guard = self._guard

        def protocol() -> GuardedHandler:
            return GuardedHandler(self._server, guard, slot, loop, **self._handler_args)

        try:
            if self._ssl is None:
                await loop.connect_accepted_socket(protocol, conn)
            else:
                # The handshake is bounded like a request head.
                await loop.connect_accepted_socket(
                    protocol, conn, ssl=self._ssl,
                    ssl_handshake_timeout=guard.timeouts.header)
        except BaseException as exc:
            slot.release()
            conn.close()
            if not isinstance(exc, Exception):
                raise
            log.debug("REST: connection from %s dropped before HTTP: %s", slot.group, exc)
