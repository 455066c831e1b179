"""WebSocket: a client of a WSMessageBroker (``otpd broker``), as the daemon is.

* Commands: one text frame on a connection to ``<url>?topic=<topic>`` with
  HTTP Basic auth. That connection is kept open (each new one costs the
  broker a password check) and reopened when lost. The broker relays every
  frame to all other clients of the topic, so whatever arrives on it (other
  publishers' commands) is read and dropped unseen.
* Answers: a connection to ``?topic=<callback_topic>`` is opened (and the
  handshake completed) before the command is sent; every frame on it is
  read in turn until one is the answer (anyone allowed on that topic can
  write there). The broker keeps nothing, so subscribing first is the only
  way not to miss it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from otpd.client.config import WsSettings
from otpd.client.publishers.base import Inbox, Transport, cleanup
from otpd.netutil import basic_authorization, safe_url, tls_context
from otpd.wire.brokers import topic_url

# websockets' DEBUG output quotes frames (commands with OTPs): keep it quiet.
_wire_log = logging.getLogger("otpd.client.websockets")
_wire_log.setLevel(logging.WARNING)

MAX_FRAME = 1 << 20


class _WsInbox(Inbox):
    def __init__(self, topic: str, ws: ClientConnection) -> None:
        super().__init__(topic)
        self.ws = ws

    async def receive(self) -> bytes:
        frame = await self.ws.recv()
        return frame.encode("utf-8") if isinstance(frame, str) else bytes(frame)


class WsTransport(Transport):
    method = "ws"
    errors: ClassVar[tuple[type[BaseException], ...]] = (
        ConnectionClosed, InvalidHandshake, InvalidURI,
    )

    def __init__(self, config: WsSettings, connect_timeout: float) -> None:
        super().__init__(connect_timeout)
        self.config = config
        self._publisher: ClientConnection | None = None
        self._drain: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return f"WebSocket broker {safe_url(self.config.url)} topic {self.config.topic!r}"

    def _connect(self, topic: str) -> connect:
        c = self.config
        headers: dict[str, str] = {}
        if c.username:
            headers["Authorization"] = basic_authorization(c.username, c.password)
        kwargs: dict[str, Any] = {}
        if c.url.startswith("wss://"):
            kwargs["ssl"] = tls_context(c.tls_ca)
        return connect(
            topic_url(c.url, topic),
            additional_headers=headers,
            open_timeout=self.connect_timeout,
            close_timeout=2.0,
            ping_interval=20.0,
            ping_timeout=20.0,
            max_size=MAX_FRAME,
            compression=None,
            logger=_wire_log,
            **kwargs,
        )

    async def _get_publisher(self) -> ClientConnection:
        async with self._lock:
            ws = self._publisher
            if ws is not None and self._drain is not None and not self._drain.done():
                return ws
            ws = await self._connect(self.config.topic)
            self._publisher = ws
            self._drain = asyncio.create_task(self._discard(ws), name="otpd-client-ws-drain")
            return ws

    @staticmethod
    async def _discard(ws: ClientConnection) -> None:
        """Read and drop what the broker relays from other publishers."""
        with contextlib.suppress(ConnectionClosed):
            async for _frame in ws:
                pass

    async def _drop_publisher(self) -> None:
        ws, self._publisher = self._publisher, None
        drain, self._drain = self._drain, None
        if ws is not None:
            await cleanup("closing the WebSocket", ws.close())
        if drain is not None:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Inbox]:
        async with self._connect(topic) as ws:
            yield _WsInbox(topic, ws)

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        text = body.decode("utf-8")
        ws = await self._get_publisher()
        try:
            await ws.send(text)
        except ConnectionClosed:
            # The broker dropped the idle connection: nothing was sent; once more.
            async with self._lock:
                if self._publisher is ws:
                    await self._drop_publisher()
            ws = await self._get_publisher()
            await ws.send(text)

    async def close(self) -> None:
        async with self._lock:
            await self._drop_publisher()
