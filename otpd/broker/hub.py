"""Topics, subscribers and fan-out with per-client back-pressure.

Each connected client gets a bounded outbox (counted in bytes) drained by its
own writer task. Publishing never waits for a receiver: a client that cannot
keep up overflows its own outbox (or stalls a send past the timeout) and is
disconnected, and nobody else slows down.

Fast path: a receiver with an empty outbox, an idle writer and room in its
socket's write buffer gets the frame written directly (one ``broadcast`` call
for all such receivers). Order is kept because the direct path is only taken
when nothing is queued for that receiver.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed

from otpd.broker.acl import Access

log = logging.getLogger("otpd.broker")

# Write directly only while the socket's pending output is below websockets'
# default write_limit (32 KiB); beyond that the writer task takes over, waits
# for the socket to drain and is subject to the send timeout.
DIRECT_WRITE_LIMIT = 32 * 1024


class Subscriber:
    """One authenticated connection on one topic, with what its user may do
    there (``access``: changed in place when the ACL file is reloaded)."""

    def __init__(
        self,
        ws: ServerConnection,
        *,
        user: str,
        topic: str,
        peer: str,
        queue_bytes: int,
        send_timeout: float,
        access: Access,
    ) -> None:
        self.ws = ws
        self.user = user
        self.topic = topic
        self.peer = peer
        self.access = access
        self.drop_reason: str | None = None
        self._queue_bytes = queue_bytes
        self._send_timeout = send_timeout
        self._items: deque[bytes] = deque()
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._sending = False

    def writable_now(self) -> bool:
        """True if a frame may be written directly without breaking order."""
        return (
            not self._items
            and not self._sending
            and self.drop_reason is None
            and self.ws.transport.get_write_buffer_size() < DIRECT_WRITE_LIMIT
        )

    def offer(self, data: bytes) -> None:
        """Queue one UTF-8 text message; drop the client if its outbox is full."""
        if self.drop_reason is not None:
            return
        if self._pending + len(data) > self._queue_bytes:
            self.drop("outgoing queue full")
            return
        self._items.append(data)
        self._pending += len(data)
        self._wakeup.set()

    def drop(self, reason: str) -> None:
        """Cut the connection at once: a client that does not read would not
        read a close frame either, and waiting for it would hold memory."""
        if self.drop_reason is not None:
            return
        self.drop_reason = reason
        self._items.clear()
        self._pending = 0
        log.warning(
            "dropping slow client user=%r topic=%r peer=%s: %s",
            self.user,
            self.topic,
            self.peer,
            reason,
        )
        self.ws.transport.abort()

    async def run_writer(self) -> None:
        """Send queued messages in order until the connection ends."""
        stalled = False
        try:
            while self.drop_reason is None:
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    # Idle, but is the socket still draining? A peer that stopped
                    # reading would otherwise hold its buffer (and block
                    # websockets' pings, which wait for the drain) forever.
                    full = self.ws.transport.get_write_buffer_size() >= DIRECT_WRITE_LIMIT
                    if full and stalled:
                        self.drop(f"not reading for {2 * self._send_timeout:g} s")
                        return
                    stalled = full
                    continue
                stalled = False
                self._wakeup.clear()
                while self._items:
                    data = self._items.popleft()
                    self._pending -= len(data)
                    self._sending = True
                    try:
                        async with asyncio.timeout(self._send_timeout):
                            await self.ws.send(data, text=True)
                    except TimeoutError:
                        self.drop(f"send blocked for {self._send_timeout:g} s")
                        return
                    finally:
                        self._sending = False
        except ConnectionClosed:
            return


class Hub:
    """Subscribers by topic."""

    def __init__(self) -> None:
        self._topics: dict[str, set[Subscriber]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, sub: Subscriber) -> None:
        subs = self._topics.setdefault(sub.topic, set())
        if sub not in subs:
            subs.add(sub)
            self._count += 1

    def remove(self, sub: Subscriber) -> None:
        subs = self._topics.get(sub.topic)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        self._count -= 1
        if not subs:
            del self._topics[sub.topic]

    def subscribers(self) -> list[Subscriber]:
        """Every connection, as a list (the caller may close some)."""
        return [sub for subs in self._topics.values() for sub in subs]

    def abort_all(self) -> None:
        """Cut every connection at once (shutdown of clients that do not read)."""
        for subs in self._topics.values():
            for sub in subs:
                sub.ws.transport.abort()

    def publish(self, sender: Subscriber, data: bytes) -> int:
        """Queue ``data`` for every other connection on the sender's topic whose
        user may subscribe there; returns how many receivers it was offered to.
        (Whether the sender may publish is the caller's check.)"""
        receivers = 0
        direct: list[ServerConnection] = []
        # A copy: offer() may drop a subscriber, and a drop may one day
        # unregister synchronously.
        for sub in tuple(self._topics.get(sender.topic, ())):
            if sub is sender or not sub.access.subscribe:
                continue
            receivers += 1
            if sub.writable_now():
                direct.append(sub.ws)
            else:
                sub.offer(data)
        if direct:
            # Write errors surface as a closed connection in its own handler.
            broadcast(direct, data, text=True)
        return receivers
