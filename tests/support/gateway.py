"""``Gateway``: a daemon running in the test's process, and what it delivers to
(the SMTP sink, a simulated modem), with the consumers, clients and broker a
test starts next to it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from otpd.app.daemon import store_key_prefixes
from otpd.broker import BrokerServer
from otpd.channels.sms.simulator import ModemSimulator, SentMessage
from otpd.client import AsyncOtpClient, ClientConfig, parse_client_config
from otpd.store import StoreError
from otpd.transports.consumer import Consumer
from otpd.transports.registry import build_consumers
from tests.support.brokers import broker_settings
from tests.support.client_config import client_toml
from tests.support.daemon import Running, start_daemon
from tests.support.mail import SmtpServer, SmtpSink, tag_of
from tests.support.waiting import wait_until

C = TypeVar("C", bound=Consumer)


class FakeClock:
    """Wall-clock time that the test can jump; runs at the real rate in between."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Gateway:
    """A running daemon (REST, SMTP to the sink, maybe a simulated modem)."""

    run: Running
    smtp: SmtpServer
    sim: ModemSimulator  # started or not: SMS is then queued for an absent modem
    clock: FakeClock = field(default_factory=FakeClock)  # what the test gave the daemon
    link: Any = None  # the application side of the daemon's broker (tests.transports.links)
    method: str = ""  # the client method the daemon consumes (tests/client)
    topic: str = ""
    broker: BrokerServer | None = None  # an ``otpd broker``, stopped with the gateway
    ws_port: int | None = None  # its port (it may be restarted on it)
    consumers: list[Consumer] = field(default_factory=list)  # started by the test
    clients: list[AsyncOtpClient] = field(default_factory=list)
    insert_failures: int = 0
    insert_calls: int = 0
    stopped: bool = False

    @property
    def config(self) -> Path:
        return self.run.config

    @property
    def sink(self) -> SmtpSink:
        return self.smtp.sink

    @property
    def consumer(self) -> Consumer:
        """The one broker consumer the daemon started itself."""
        (consumer,) = self.run.daemon.consumers
        return consumer

    @property
    def rest_port(self) -> int:
        assert self.run.daemon.rest is not None and self.run.daemon.rest.port is not None
        return self.run.daemon.rest.port

    async def call(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """Command ``name`` over REST; the answer's body."""
        _, body = await self.run.client.call(name, data)
        result: dict[str, Any] = body
        return result

    # -- what was delivered ------------------------------------------------------------

    def mails_to(self, address: str) -> list[Message]:
        return self.sink.to(address)

    async def mail(self, address: str, timeout: float = 10.0) -> Message:
        found: list[Message] = await wait_until(lambda: self.mails_to(address), timeout,
                                                f"mail to {address}")
        return found[0]

    def sms_to(self, number: str) -> list[SentMessage]:
        """SMS the modem sent to ``number`` (E.164, or its last digits)."""
        return [m for m in self.sim.sent if m.receiver.endswith(number)]

    async def sms(self, number: str, timeout: float = 10.0, count: int = 1) -> SentMessage:
        """The ``count``-th SMS to ``number``, once it is sent."""
        await wait_until(lambda: len(self.sms_to(number)) >= count, timeout,
                         f"SMS to {number}")
        return self.sms_to(number)[count - 1]

    async def sms_text(self, number: str, count: int = 1, timeout: float = 10.0) -> str:
        return (await self.sms(number, timeout, count)).text

    def delivered(self) -> Counter[str]:
        """The tags of everything mailed or sent by SMS, counted."""
        return Counter([*self.sink.tags(), *(tag_of(m.text) or "?" for m in self.sim.sent)])

    async def outcome(self, name: str, data: dict[str, Any]) -> tuple[str, str]:
        """How the first command with this id ended, as a repeat of it tells."""
        body = await self.call(name, data)
        assert body["response_code"] == "1201", body
        return body["data"]["status"], body["data"]["first_response_code"]

    # -- consumers started by the test -----------------------------------------------------

    async def start(self, toml: str, default_wait: float = 5.0) -> list[Consumer]:
        """Start the consumers of broker tables ``toml`` on the daemon's service."""
        daemon = self.run.daemon
        assert daemon.service is not None
        started = build_consumers(broker_settings(toml), daemon.service, default_wait,
                                  store_key_prefixes(daemon.settings.store))
        for consumer in started:
            await consumer.start()
        self.consumers.extend(started)
        return started

    async def start_one(self, toml: str, kind: type[C]) -> C:
        """Start the one consumer of ``toml`` (of class ``kind``); return once connected."""
        (consumer,) = await self.start(toml)
        assert isinstance(consumer, kind)
        await wait_until(lambda: consumer.connected, 10, f"{kind.__name__} connected")
        return consumer

    async def stop_consumer(self, consumer: Consumer) -> None:
        await consumer.stop()
        self.consumers.remove(consumer)

    def fail_store(self, times: int) -> None:
        """The next ``times`` inserts fail as a broken disk would (StoreError)."""
        store = self.run.daemon.store
        assert store is not None
        real = store.insert_message
        self.insert_failures = times

        async def insert(*args: Any, **kwargs: Any) -> Any:
            self.insert_calls += 1
            if self.insert_failures > 0:
                self.insert_failures -= 1
                raise StoreError("disk I/O error (simulated)")
            return await real(*args, **kwargs)

        store.insert_message = insert  # type: ignore[method-assign]

    def slow_store(self, delay: float = 0.5) -> asyncio.Event:
        """Every insert takes ``delay`` s more; the event is set once one started."""
        store = self.run.daemon.store
        assert store is not None
        real = store.insert_message
        entered = asyncio.Event()

        async def insert(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await asyncio.sleep(delay)
            return await real(*args, **kwargs)

        store.insert_message = insert  # type: ignore[method-assign]
        return entered

    # -- publisher library clients (tests/client) -------------------------------------------

    def toml(self, method: str | None = None, *, client: str = "", extra: str = "") -> str:
        return client_toml(method or self.method, self.topic, rest_port=self.rest_port,
                           ws_port=self.ws_port, client=client, extra=extra)

    def client_config(self, method: str | None = None, *, client: str = "",
                      extra: str = "") -> ClientConfig:
        return parse_client_config(self.toml(method, client=client, extra=extra))

    def client(self, method: str | None = None, *, client: str = "",
               extra: str = "") -> AsyncOtpClient:
        c = AsyncOtpClient(self.client_config(method, client=client, extra=extra))
        self.clients.append(c)
        return c

    # -- life ----------------------------------------------------------------------------

    async def restart(self, session: aiohttp.ClientSession) -> None:
        """Stop the daemon and start it again on the same configuration."""
        await self.run.daemon.stop()
        self.run = await start_daemon(self.config, session)

    async def stop(self) -> None:
        """Stop the daemon (once)."""
        if not self.stopped:
            self.stopped = True
            await self.run.daemon.stop()

    async def close(self) -> None:
        """Clients, the test's consumers, the daemon, the modem and the broker."""
        for c in self.clients:
            await c.close()
        for consumer in self.consumers:
            await consumer.stop(grace=1.0)
        await self.stop()
        await self.sim.stop()
        if self.broker is not None:
            await self.broker.stop()


MakeGateway = Callable[..., Awaitable[Gateway]]
