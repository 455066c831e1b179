"""What every client transport shares: subscribe first, publish, wait bounded.

A broker transport implements :meth:`Transport.subscribe` (a context manager
listening on a reply topic, whose :class:`Inbox` hands over every frame in
turn) and :meth:`Transport.publish`. :meth:`request` runs them in the only
safe order, subscribing before publishing so that no reply can be missed,
and bounds every step: connecting, subscribing and publishing by
``connect_timeout`` (:class:`TransportError` when exceeded), the wait for the
answer by ``timeout`` (:class:`ReplyTimeout`). Anyone allowed to publish on
the broker can write to a reply topic, so the answer is the first frame the
caller's ``accept`` takes (:class:`otpd.client.replies.ReplyCheck`); the
others are logged without their content and skipped. A transport that
answers every request directly (REST) implements :meth:`Transport.exchange`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar, overload

from otpd.client.errors import ReplyTimeout, TransportError
from otpd.client.replies import UnacceptableReply

log = logging.getLogger("otpd.client")

CLEANUP_TIMEOUT = 2.0
# Frames kept for one inbox while the waiting task has not read them yet; a
# flood beyond that is dropped (the checks are quick, so it rarely fills).
MAX_QUEUED_FRAMES = 256

T = TypeVar("T")
# The answer in a frame, or UnacceptableReply (the frame is skipped).
Accept = Callable[[bytes], T]


class Frames:
    """The frames of one reply topic, in arrival order, for transports whose
    library calls back (AMQP, MQTT); fed and failed on the event loop."""

    def __init__(self, limit: int = MAX_QUEUED_FRAMES) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._limit = limit
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        self.dropped = 0

    def put(self, frame: bytes) -> None:
        if self._error is not None:
            return
        if len(self._frames) >= self._limit:
            self.dropped += 1
            return
        self._frames.append(frame)
        self._notify()

    def fail(self, error: BaseException) -> None:
        """No more frames: ``get`` raises ``error`` once the queued ones are read."""
        if self._error is None:
            self._error = error
            self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def get(self) -> bytes:
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
        return self._frames.popleft()


class Inbox(ABC):
    """Where the answer to one request arrives."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    @abstractmethod
    async def receive(self) -> bytes:
        """The next message on the reply topic (cancelled by the caller's timeout)."""


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

    async def exchange(self, body: bytes, timeout: float, command: str) -> bytes:
        """Transports that always answer (REST): send ``body``, return the answer."""
        raise TransportError(f"{self.describe()}: has no direct answers")

    @overload
    async def request(self, body: bytes, reply_topic: str | None, timeout: float,
                      command: str = "", accept: None = None) -> bytes | None: ...

    @overload
    async def request(self, body: bytes, reply_topic: str | None, timeout: float,
                      command: str = "", *, accept: Accept[T]) -> T | None: ...

    async def request(self, body: bytes, reply_topic: str | None, timeout: float,
                      command: str = "", accept: Accept[Any] | None = None) -> Any:
        """Publish ``body``; with ``reply_topic``, wait for the first frame on it
        that ``accept`` takes and return what it made of it (without ``accept``:
        the first frame). Frames it refuses are skipped until ``timeout``."""
        take: Accept[Any] = _as_is if accept is None else accept
        if self.always_answers:
            answer = await self.exchange(body, timeout, command)
            try:
                return take(answer)
            except UnacceptableReply as exc:  # the only answer there will be
                raise TransportError(f"{self.describe()}: the answer to"
                                     f" {command or 'the request'} is unusable: {exc}") from None
        if reply_topic is None:
            async with self.step("publish"):
                await self.publish(body, None)
            return None
        skipped = _Skipped(command or "request", reply_topic, self.describe())
        async with contextlib.AsyncExitStack() as stack:
            async with self.step("subscribe"):
                inbox = await stack.enter_async_context(self.subscribe(reply_topic))
            async with self.step("publish"):
                await self.publish(body, inbox)
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        frame = await inbox.receive()
                        try:
                            return take(frame)
                        except UnacceptableReply as exc:
                            skipped.note(exc)
            except TimeoutError:
                raise ReplyTimeout(
                    f"{command or 'request'}: no answer on {reply_topic!r} via"
                    f" {self.describe()} within {timeout:g} s (the command was published and"
                    f" may still be executed){skipped.summary()}", command=command,
                    topic=reply_topic) from None
            except TransportError:
                raise
            except self._failures() as exc:
                raise TransportError(f"{self.describe()}: lost while waiting for the answer"
                                     f" (the command was published): {_text(exc)}") from exc
        raise AssertionError("unreachable")


def _as_is(frame: bytes) -> bytes:
    return frame


class _Skipped:
    """Frames on one reply topic that were not the answer: the first logged as a
    warning (someone else writes there, or the keys differ), the rest counted."""

    def __init__(self, command: str, topic: str, where: str) -> None:
        self.command, self.topic, self.where = command, topic, where
        self.count = 0
        self.last = ""

    def note(self, why: UnacceptableReply) -> None:
        self.count += 1
        self.last = str(why)
        level = logging.WARNING if self.count == 1 else logging.DEBUG
        log.log(level, "%s: ignored a message on the reply topic %r via %s that is not"
                " the answer (%s); still waiting", self.command, self.topic, self.where,
                self.last)

    def summary(self) -> str:
        if not self.count:
            return ""
        return (f"; {self.count} message(s) on it were ignored as not the answer"
                f" (last: {self.last})")


def _text(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:300]


async def cleanup(what: str, aw: Awaitable[object]) -> None:
    """Best-effort clean-up (unsubscribe, close): bounded, errors only logged."""
    try:
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            await aw
    except Exception as exc:
        log.debug("%s failed: %s", what, _text(exc))
