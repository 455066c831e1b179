"""WebSocket consumer: a client of a WSMessageBroker (``otpd broker`` or the PHP/Java ones).

* ``GET <path>?topic=<topic>`` (any ``topic`` already in ``url`` is replaced)
  with HTTP Basic auth from ``username``/``password``; ``wss://`` for TLS
  (``tls_ca`` for a private CA).
* Every text frame is one command (a binary frame is read as UTF-8 too).
* Ping/pong keepalive every ``ping_interval`` s; no pong within
  ``ping_timeout`` s means the connection is dead and is reopened.
* The broker neither stores nor acknowledges: what is published while otpd
  is disconnected is lost, and a command the store could not take is answered
  with its error instead of being retried.
* Replies, as OTP-Pi sends them and OTP-Publisher's client reads them: a new
  connection to ``?topic=<callback_topic>``, one text frame, close. The PHP
  client connects to that topic only after publishing and the broker keeps
  nothing for late subscribers, so a reply waits ``callback_delay`` but at
  least ``reply_min_delay`` ms (250) for it to get there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import connect

from otpd.netutil import basic_authorization, safe_url, tls_context
from otpd.transports.consumer import Consumer, Inbound
from otpd.transports.settings import WsSettings
from otpd.wire.brokers import topic_url

if TYPE_CHECKING:
    from otpd.service import Service

log = logging.getLogger("otpd.transports.ws")
# websockets' DEBUG output quotes frames (commands with OTPs): keep it quiet.
_wire_log = logging.getLogger("otpd.transports.ws.websockets")
_wire_log.setLevel(logging.WARNING)

OPEN_TIMEOUT = 10.0


class WsConsumer(Consumer):
    def __init__(self, settings: WsSettings, service: Service, default_wait: float,
                 name: str = "ws") -> None:
        super().__init__(name, settings.common, service, default_wait,
                         secrets=(settings.password,))
        self.settings = settings
        self.min_reply_delay_ms = settings.reply_min_delay

    def _connect(self, topic: str) -> connect:
        s = self.settings
        headers: dict[str, str] = {}
        if s.username:
            headers["Authorization"] = basic_authorization(s.username, s.password)
        kwargs: dict[str, Any] = {}
        if s.url.startswith("wss://"):
            kwargs["ssl"] = tls_context(s.common.tls_ca)
        return connect(
            topic_url(s.url, topic),
            additional_headers=headers,
            open_timeout=OPEN_TIMEOUT,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=2.0,
            # Larger than max_message so an oversize command is dropped by us
            # (with a warning) instead of closing the connection.
            max_size=max(4 * s.common.max_message, 1 << 20),
            compression=None,
            logger=_wire_log,
            **kwargs,
        )

    async def _session(self) -> None:
        s = self.settings
        async with self._connect(s.common.topic) as ws:
            self._set_connected(True, f"topic {s.common.topic!r} on {safe_url(s.url)}")
            async for frame in ws:
                if self.stopping:
                    break
                body = frame.encode("utf-8") if isinstance(frame, str) else bytes(frame)
                await self.admit(Inbound(body))

    async def publish_reply(self, topic: str, body: bytes, correlation: bytes | str | None,
                            callback: bool) -> None:
        async with self._connect(topic) as ws:
            await ws.send(body.decode("utf-8"))
