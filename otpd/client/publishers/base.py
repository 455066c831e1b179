"""What every client transport shares: subscribe first, publish, wait bounded.

A broker transport implements :meth:`Transport.subscribe` (a context manager
listening on a reply topic) and :meth:`Transport.publish`. :meth:`request`
runs them in the only safe order, subscribing before publishing so that no
reply can be missed, and bounds every step: connecting, subscribing and
publishing by ``connect_timeout`` (:class:`TransportError` when exceeded),
the wait for the answer by ``timeout`` (:class:`ReplyTimeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from typing import ClassVar

from otpd.client.errors import ReplyTimeout, TransportError

log = logging.getLogger("otpd.client")

CLEANUP_TIMEOUT = 2.0


class Inbox(ABC):
    """Where the answer to one request arrives."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    @abstractmethod
    async def receive(self) -> bytes:
        """The first message on the reply topic (cancelled by the caller's timeout)."""


class Transport(ABC):
    method: ClassVar[str]
    # The reply address travels as the envelope's ``callback_topic`` (False:
    # the transport has its own, e.g. AMQP reply_to, or answers directly).
    callback_in_envelope: ClassVar[bool] = True
    # Every request gets its answer (REST): there is no fire-and-forget.
    always_answers: ClassVar[bool] = False
    # Exceptions of the client library meaning "could not deliver".
    errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout

    @abstractmethod
    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Inbox]:
        """Listen on ``topic`` (subscription confirmed on entry); stop on exit."""

    @abstractmethod
    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        """Hand ``body`` to the broker (confirmed where the protocol allows)."""

    @abstractmethod
    async def close(self) -> None:
        """Close connections; the transport reconnects if used again."""

    def describe(self) -> str:
        """Where commands go, without credentials (for messages)."""
        return self.method

    def _failures(self) -> tuple[type[BaseException], ...]:
        return (OSError, *self.errors)

    @contextlib.asynccontextmanager
    async def step(self, what: str) -> AsyncIterator[None]:
        """Bound one delivery step by ``connect_timeout``; library errors become
        :class:`TransportError`."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                yield
        except TransportError:
            raise
        except TimeoutError:
            raise TransportError(f"{self.describe()}: {what} took longer than"
                                 f" {self.connect_timeout:g} s") from None
        except self._failures() as exc:
            raise TransportError(f"{self.describe()}: {what} failed: {_text(exc)}") from exc

    async def request(self, body: bytes, reply_topic: str | None, timeout: float,
                      command: str = "") -> bytes | None:
        """Publish ``body``; with ``reply_topic``, return the first answer on it."""
        if reply_topic is None:
            async with self.step("publish"):
                await self.publish(body, None)
            return None
        async with contextlib.AsyncExitStack() as stack:
            async with self.step("subscribe"):
                inbox = await stack.enter_async_context(self.subscribe(reply_topic))
            async with self.step("publish"):
                await self.publish(body, inbox)
            try:
                async with asyncio.timeout(timeout):
                    return await inbox.receive()
            except TimeoutError:
                raise ReplyTimeout(
                    f"{command or 'request'}: no answer on {reply_topic!r} via"
                    f" {self.describe()} within {timeout:g} s (the command was published and"
                    f" may still be executed)", command=command, topic=reply_topic) from None
            except TransportError:
                raise
            except self._failures() as exc:
                raise TransportError(f"{self.describe()}: lost while waiting for the answer"
                                     f" (the command was published): {_text(exc)}") from exc
        raise AssertionError("unreachable")


def _text(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:300]


async def cleanup(what: str, aw: Awaitable[object]) -> None:
    """Best-effort clean-up (unsubscribe, close): bounded, errors only logged."""
    try:
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            await aw
    except Exception as exc:
        log.debug("%s failed: %s", what, _text(exc))
