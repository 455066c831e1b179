"""What every broker consumer shares: reconnecting, acknowledging, replying.

A broker-specific subclass implements :meth:`Consumer._session` (connect,
subscribe, feed messages to :meth:`Consumer.admit`, return or raise when the
connection ends) and :meth:`Consumer.publish_reply`. This base class runs the
session forever with capped exponential backoff and jitter, and turns each
message into one command:

* too big / not JSON / not an object / unknown command / bad field: logged
  (at most ``REFUSAL_LOG_BURST`` lines a minute, then a count), acknowledged
  and dropped (never redelivered, so it cannot block the queue), with an
  error reply when a callback topic can be found and signatures are not
  required;
* with ``require_signature``: unsigned or badly signed commands are dropped
  the same way and get **no reply at all**; a signed command runs at most
  once (:mod:`otpd.replays`): a replay is dropped, a copy of a command still
  running is handed back to the broker;
* a ``callback_topic`` that breaks :mod:`otpd.wire.reply_topics` (a store
  key, a command topic, wildcards...) gets the command dropped, unanswered;
* otherwise the service runs it; the message is acknowledged as soon as the
  command is durably stored (``on_stored``), or when the service answers for
  commands that store nothing. A *transient* answer (the store failed) is not
  acknowledged: after ``retry_delay`` the message is handed back to the
  broker for redelivery, where the broker can do that.

Several nodes on one queue (otpd.delivery.admission): with an ``intake``
(set by the daemon), a consumer takes a message only while the node has room
for the channel the queue mostly carries (``Intake.gate``: free sending
capacity within a horizon, minus its local backlog), through its broker's own
flow control (``_apply_flow``: AMQP consume/cancel with a prefetch sized to
the room, Redis ``XREADGROUP COUNT``); a parsed send command of a channel this
node cannot send soon (no sender, failing, or its backlog would make it late)
is handed back unacknowledged where the broker can give it to another node
(``Inbound.shared``), after ``retry_delay`` so two nodes do not bounce it in a
hot loop. The acknowledgement stays where it was: after the durable store.

Replies go to ``callback_topic`` (and the broker's own reply address, e.g.
AMQP ``reply_to``) after ``callback_delay`` ms, from tasks of their own (at
most ``MAX_PENDING_REPLIES``): a command's prefetch slot is free as soon as it
has run. With a ``signing_key``, every reply is signed and bound to the
request's signature (:func:`otpd.wire.signing.sign_reply`). A command that
wants a reply waits up to ``reply_wait`` (default ``delivery.wait``) for the
send result; one that does not want a reply answers 1111 at once: nobody
would read more.

Status events (opt-in ``status_topic``): :meth:`Consumer.publish_event` takes
one event (a final SMS delivery state, built by the daemon), signs it in the
event domain (:func:`otpd.wire.signing.sign_event`) when the table has a
``signing_key``, and queues it for a task of its own: it never blocks the
caller. At most ``MAX_PENDING_EVENTS`` wait (while the broker is down); beyond
that the oldest are dropped, counted (``events_dropped`` in the status) and
logged at most once a minute. An event the broker refuses while connected is
dropped the same way; one whose publish fails because the connection went
down is kept for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from otpd.aio import backoff_delay, cancel_and_wait, within
from otpd.replays import CLAIM_TTL, Claim, ReplayGuard
from otpd.transports.settings import Common
from otpd.wire.codes import Code
from otpd.wire.protocol import (
    MAX_CALLBACK_DELAY_MS,
    ProtocolError,
    Response,
    error_response,
    parse_request,
)
from otpd.wire.reply_topics import ReplyTopicRules
from otpd.wire.signing import (
    SIGNATURE_FIELD,
    TIMESTAMP_FIELD,
    SignatureError,
    replay_key,
    sign,
    sign_event,
    sign_reply,
    verify,
)

if TYPE_CHECKING:
    from otpd.service import Service

log = logging.getLogger("otpd.transports")

STOP_GRACE = 5.0  # s in-flight commands may take to finish on stop
STABLE_AFTER = 10.0  # s a connection must last before the backoff starts over
# Replies waiting out their callback_delay or being sent; beyond this, replies
# are dropped (logged) rather than piling up tasks for a flood of requests.
MAX_PENDING_REPLIES = 256
REFUSAL_LOG_BURST = 10  # refusal lines logged per interval; the rest are counted
REFUSAL_LOG_INTERVAL = 60.0  # s
# Status events waiting for the broker; beyond this the oldest are dropped (counted).
MAX_PENDING_EVENTS = 1000
EVENT_LOG_INTERVAL = 60.0  # s between two "events dropped" warnings
EVENT_PUBLISH_TIMEOUT = 30.0  # s one event may take to publish


async def _nothing() -> None:
    return None


class GateView(Protocol):
    @property
    def taking(self) -> bool: ...
    @property
    def target(self) -> int: ...
    @property
    def room(self) -> int: ...
    @property
    def reason(self) -> str: ...


class Intake(Protocol):
    """The node's budget for work from shared queues (otpd.delivery.intake)."""

    def gate(self) -> GateView:
        """Room for the channel the queues mostly carry."""
        ...

    def refusal(self, channel: str, expires_at: float | None) -> str | None:
        """Why a parsed message of ``channel`` is better left to other nodes."""
        ...

    def hold(self) -> None: ...

    def release(self) -> None: ...

    def watch(self, callback: Callable[[], None]) -> None: ...


def channel_of(name: str, command: object) -> str | None:
    """The channel a send command goes out on (None: it stores no message)."""
    if name == "send-sms":
        return "sms"
    if name in ("send-email", "send-mail"):
        return "email"
    if name in ("send-message", "request-otp"):
        receiver = getattr(command, "receiver", "")
        return "email" if isinstance(receiver, str) and "@" in receiver else "sms"
    return None


@dataclass
class Inbound:
    """One message as a broker delivered it."""

    body: bytes
    # Acknowledge: the broker may forget the message.
    ack: Callable[[], Awaitable[None]] = _nothing
    # Hand it back for redelivery; returns False where the broker cannot redeliver.
    redeliver: Callable[[], Awaitable[bool]] | None = None
    # The broker's own reply address (AMQP reply_to, MQTT 5 response topic).
    reply_to: str | None = None
    correlation: bytes | str | None = None
    # Give it, unacknowledged, to another node of the queue now (AMQP: requeue;
    # Redis stream: re-added and acknowledged in one transaction). None where the
    # broker cannot (MQTT redelivers to this same session only).
    pass_on: Callable[[], Awaitable[bool]] | None = None


def loose_callback(body: bytes) -> tuple[str | None, int]:
    """Best-effort ``callback_topic`` and delay of a message that did not parse."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None, 0
    if not isinstance(obj, dict):
        return None, 0
    topic = obj.get("callback_topic")
    if not isinstance(topic, str) or not topic or len(topic) > 512:
        return None, 0
    delay = obj.get("callback_delay", 0)
    try:
        delay_ms = int(delay) if not isinstance(delay, bool) else 0
    except (TypeError, ValueError):
        delay_ms = 0
    return topic, min(max(delay_ms, 0), MAX_CALLBACK_DELAY_MS)


class Consumer(ABC):
    """A broker consumer: ``start()`` returns at once and connects in the background."""

    # Reads from a queue shared with other nodes (pub/sub and WS hand every
    # node every message: nothing to share, nothing to hold back).
    shares_work = True

    def __init__(self, name: str, common: Common, service: Service, default_wait: float,
                 secrets: Iterable[str] = ()) -> None:
        self.name = name
        self.common = common
        self.service = service
        self.reply_wait = default_wait if common.reply_wait is None else common.reply_wait
        self._secrets = tuple(s for s in secrets if s)
        # Floor under callback_delay, for brokers that keep nothing for late subscribers.
        self.min_reply_delay_ms = 0
        self._slots = asyncio.Semaphore(common.prefetch)
        self._inflight: set[asyncio.Task[None]] = set()
        self._replies: set[asyncio.Task[None]] = set()
        # Set by the registry from every consumer's topic and the store's key prefix.
        self.reply_rules = ReplyTopicRules.build([common.topic], [])
        self.replays = ReplayGuard(service.store)
        self._refusal_window = time.monotonic()
        self._refusals_logged = 0
        self._refusals_unlogged = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._connected_at = 0.0
        self._since: float | None = None
        self._received = 0
        self._errors = 0
        self._last_error: str | None = None
        self.intake: Intake | None = None
        self._room = asyncio.Event()  # the intake's room may have changed
        self._taking = True
        self._not_taking = ""
        self._handed_back = 0
        self._holding: set[int] = set()  # ids of messages counted in the intake
        # Status events (status_topic): bodies waiting for the broker, and counts.
        self._events: deque[bytes] = deque()
        self._event_waiting = asyncio.Event()
        self._up = asyncio.Event()  # connected: pending events may go
        self._event_task: asyncio.Task[None] | None = None
        self._events_published = 0
        self._events_dropped = 0
        self._events_dropped_logged = 0
        self._event_log_at = -EVENT_LOG_INTERVAL

    def attach(self, intake: Intake) -> None:
        """Take work in proportion to the node's capacity (several nodes, one queue)."""
        if self.shares_work:
            self.intake = intake
            intake.watch(self._room.set)

    @property
    def _gated(self) -> Intake | None:
        return self.intake if self.shares_work else None

    # -- broker-specific -------------------------------------------------------
    @abstractmethod
    async def _session(self) -> None:
        """Connect, call ``_set_connected(True, ...)``, feed ``admit`` until the
        connection ends (return or raise). Cancelled on stop: close in ``finally``."""

    @abstractmethod
    async def publish_reply(self, topic: str, body: bytes, correlation: bytes | str | None,
                            callback: bool) -> None:
        """Send one reply. ``callback``: to a ``callback_topic`` (else to the
        broker's own reply address)."""

    async def _stop_intake(self) -> None:
        """Stop receiving new messages (in-flight ones still finish)."""
        return None  # pull-based sessions check ``stopping`` themselves

    async def _apply_flow(self, taking: bool, window: int) -> None:
        """Push brokers: start (with a window of ``window`` messages) or stop
        the broker's deliveries. Pull brokers ask ``room()`` before reading."""
        return None

    # -- taking work in proportion to capacity ------------------------------------
    def room(self, *, full_only: bool = False) -> int:
        """How many messages this consumer may read now (prefetch without an intake).
        ``full_only``: room is short only while the backlog is full; a node that
        cannot send at all lets a delivered message through, to be passed on."""
        intake = self._gated
        if intake is None:
            return self.common.prefetch
        g = intake.gate()
        self._taking, self._not_taking = g.taking, g.reason
        if full_only and g.target <= 0:
            return 1
        return min(self.common.prefetch, g.room)

    async def wait_room(self, timeout: float | None = None, *, full_only: bool = False) -> int:
        """Wait until the node has room (at most ``timeout`` s); the room then."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while (n := self.room(full_only=full_only)) <= 0 and not self.stopping:
                    self._room.clear()
                    async with asyncio.timeout(1.0):  # also re-read on a timer
                        with contextlib.suppress(TimeoutError):
                            await self._room.wait()
                return n
        return 0

    async def _follow(self) -> None:
        """Push brokers: keep the broker's flow in step with the node's room
        (stop at no room, start again once a quarter of the target is free)."""
        intake = self._gated
        if intake is None:
            return
        applied: tuple[bool, int] | None = None
        while True:
            g = intake.gate()
            taking = g.room > 0
            if applied is not None and not applied[0] and taking:
                taking = g.room >= max(1, g.target // 4)
            window = max(1, min(self.common.prefetch, g.room))
            self._taking, self._not_taking = g.taking, g.reason
            if applied is None or applied[0] != taking:
                await self._apply_flow(taking, window)
                applied = (taking, window)
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._room.wait()

    @property
    def can_hand_back(self) -> bool:
        """Can this broker take a command back onto the queue other nodes read?"""
        return False

    async def publish_command(self, body: bytes) -> None:
        """Put a command on this consumer's own queue (a hand-over to the other
        nodes); only called where :attr:`can_hand_back`."""
        raise RuntimeError(f"{self.name} cannot hand messages back")

    async def republish(self, envelope: dict[str, Any]) -> bool:
        """Hand a stored message back to the shared queue (signed when commands
        must be); False if it could not be published."""
        if not self.connected or not self.can_hand_back:
            return False
        if self.common.signing_key:
            envelope = sign(envelope, self.common.signing_key)
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            await self.publish_command(body)
        except Exception as exc:
            self._note_error(exc)
            log.warning("%s: hand-over not published: %s", self.name, self._describe(exc))
            return False
        return True

    # -- status events -------------------------------------------------------------
    def publish_event(self, event: dict[str, Any]) -> None:
        """Queue one status event for ``status_topic`` (no-op without one); never blocks."""
        topic = self.common.status_topic
        if not topic or self.reply_rules.refusal(topic) is not None:
            return  # the daemon refuses to start with such a topic; never written to
        if self.common.signing_key:
            event = sign_event(event, self.common.signing_key)
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        if len(self._events) >= MAX_PENDING_EVENTS:
            self._events.popleft()  # the oldest: the newest say more about now
            self._event_dropped("the broker is not taking them")
        self._events.append(body)
        self._event_waiting.set()

    def _event_dropped(self, why: str) -> None:
        self._events_dropped += 1
        now = time.monotonic()
        if now - self._event_log_at >= EVENT_LOG_INTERVAL:
            log.warning("%s: status events dropped (%d in all, %d since the last warning): %s",
                        self.name, self._events_dropped,
                        self._events_dropped - self._events_dropped_logged, why)
            self._event_log_at = now
            self._events_dropped_logged = self._events_dropped

    async def _publish_events(self) -> None:
        topic = self.common.status_topic
        while True:
            while not self._events:
                self._event_waiting.clear()
                await self._event_waiting.wait()
            await self._up.wait()
            body = self._events[0]
            try:
                # Bounded: a broker that hangs must not hold every later event.
                await within(EVENT_PUBLISH_TIMEOUT, self.publish_reply(topic, body, None, True))
            except Exception as exc:
                if not self._connected:
                    continue  # kept for the next connection (the session noted why)
                self._events.popleft()
                self._note_error(exc)
                self._event_dropped(self._describe(exc))
                continue
            self._events.popleft()
            self._events_published += 1

    # -- life cycle ------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._since = time.time()
            self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")
            if self.common.status_topic:
                self._event_task = asyncio.create_task(self._publish_events(),
                                                       name=f"{self.name}-events")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop consuming, let in-flight commands finish (up to ``grace`` s), disconnect."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await within(2.0, self._stop_intake())
        except Exception as exc:
            log.debug("%s: stopping intake: %s", self.name, self._describe(exc))
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
        await cancel_and_wait(list(self._inflight), f"{self.name} commands", log)
        if self._replies:
            # Answers of commands that ran go out if they can within the grace.
            await asyncio.wait(set(self._replies), timeout=min(grace, 2.0))
        await cancel_and_wait(list(self._replies), f"{self.name} replies", log)
        if self._event_task is not None:
            await cancel_and_wait([self._event_task], f"{self.name} status events", log)
            self._event_task = None
            if self._events:
                log.info("%s: %d status event(s) not published at stop", self.name,
                         len(self._events))
        await cancel_and_wait([self._task], self.name, log)
        self._task = None
        log.info("%s: stopped", self.name)

    def status(self) -> dict[str, Any]:
        gated = self._gated is not None
        if gated:
            self.room()  # fresh
        return {
            "name": self.name,
            "connected": self._connected,
            "since": self._since,
            "received": self._received,
            "errors": self._errors,
            "last_error": self._last_error,
            # Several nodes on one queue: does this consumer take work now, and why not.
            "taking": self._connected and (self._taking or not gated),
            "not_taking": ("not connected" if not self._connected
                           else "" if self._taking or not gated else self._not_taking),
            "handed_back": self._handed_back,
            "status_topic": self.common.status_topic,
            "events_published": self._events_published,
            "events_pending": len(self._events),
            "events_dropped": self._events_dropped,
        }

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._session()
                if not self._stopping.is_set():
                    raise ConnectionError("connection closed")
            except asyncio.CancelledError:
                self._set_connected(False)
                raise
            except Exception as exc:
                if not self._stopping.is_set():
                    self._note_error(exc)
            was_up = self._connected
            lasted = time.monotonic() - self._connected_at if was_up else 0.0
            self._set_connected(False)
            if self._stopping.is_set():
                break
            if was_up and lasted >= STABLE_AFTER:
                attempt = 0
            delay = backoff_delay(attempt, self.common.reconnect_min, self.common.reconnect_max)
            attempt += 1
            log.warning("%s: reconnecting in %.1f s (%s)", self.name, delay, self._last_error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see otpd/delivery/engine.py
                    await self._stopping.wait()

    def _set_connected(self, up: bool, detail: str = "") -> None:
        if up == self._connected:
            return
        self._connected = up
        self._since = time.time()
        if up:
            self._up.set()
        else:
            self._up.clear()
        if up:
            self._connected_at = time.monotonic()
            log.info("%s: connected%s", self.name, f" ({detail})" if detail else "")
        elif self._stopping.is_set():
            log.info("%s: disconnected (stopping)", self.name)
        else:
            log.warning("%s: disconnected", self.name)

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}"[:300]

    def _note_error(self, exc: BaseException | str) -> None:
        self._errors += 1
        self._last_error = exc if isinstance(exc, str) else self._describe(exc)

    # -- messages ----------------------------------------------------------------
    async def admit(self, msg: Inbound) -> asyncio.Task[None]:
        """Take a message once a slot is free (pull-based brokers: backpressure)."""
        await self._slots.acquire()
        try:
            await self.wait_room(full_only=True)  # the caller read only what room allowed
        except BaseException:
            self._slots.release()
            raise
        return self._spawn(msg, holding=True)

    def admit_nowait(self, msg: Inbound) -> asyncio.Task[None]:
        """Take a message now; it waits for a slot in its own task (push-based brokers,
        whose prefetch or receive window already bounds the backlog)."""
        return self._spawn(msg, holding=False)

    async def handle(self, msg: Inbound) -> None:
        """Take a message in the current task (push-based libraries that already
        run each delivery in a task of its own: no second task per message)."""
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)  # stop() waits for it, then cancels it
        try:
            await self._guarded(msg, holding=False)
        finally:
            if task is not None:
                self._inflight.discard(task)

    def _spawn(self, msg: Inbound, *, holding: bool) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(msg, holding))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def _guarded(self, msg: Inbound, holding: bool) -> None:
        if not holding:
            await self._slots.acquire()
        try:
            intake = self._gated
            if intake is not None:
                if not holding:  # delivered already: wait only while the backlog is full
                    await self.wait_room(full_only=True)
                intake.hold()  # counted until stored: every consumer shares the room
                self._holding.add(id(msg))
            await self.process(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not kill the consumer
            log.exception("%s: unexpected error handling a message", self.name)
            self._note_error(exc)
        finally:
            self._slots.release()
            self._release_hold(msg)

    def _release_hold(self, msg: Inbound) -> None:
        """Stored (now in the outbox's count) or done: no longer counted here."""
        if id(msg) in self._holding:
            self._holding.discard(id(msg))
            if self._gated is not None:
                self._gated.release()

    async def process(self, msg: Inbound) -> None:
        self._received += 1
        acked = False

        async def ack_once() -> None:
            # Never raises: the service awaits this between storing and sending.
            nonlocal acked
            if acked:
                return
            acked = True
            try:
                await msg.ack()
            except Exception as exc:
                self._note_error(exc)
                log.warning("%s: acknowledge failed (the broker will redeliver; the"
                            " duplicate is suppressed by id): %s", self.name, self._describe(exc))

        # Refusals are acknowledged at once and answered (where allowed) from a
        # task of their own: a flood of them never holds a prefetch slot.
        if len(msg.body) > self.common.max_message:
            await ack_once()
            self._refused(f"dropped a {len(msg.body)}-byte message"
                          f" (max_message = {self.common.max_message})")
            if not self.common.require_signature:
                refusal = Response("unknown", Code.INVALID_REQUEST, {},
                                   f"message larger than {self.common.max_message} bytes")
                self._schedule_reply(None, 0, msg, refusal, "")
            return
        try:
            env = parse_request(msg.body)
        except ProtocolError as exc:
            await ack_once()
            self._refused(f"dropped a malformed message: {exc.message}")
            if not self.common.require_signature:
                # Unauthenticated senders get no answer where signatures are required.
                topic, delay = loose_callback(msg.body)
                self._schedule_reply(topic, delay, msg, error_response(exc), "")
            return
        signature = env.raw.get(SIGNATURE_FIELD)
        request_signature = signature if isinstance(signature, str) else ""
        guard_key: str | None = None
        if self.common.require_signature:
            try:
                verify(env.raw, self.common.signing_key)
            except SignatureError as exc:
                await ack_once()
                self._refused(f"dropped {env.name}: {exc}")  # and no reply at all
                return
            guard_key = replay_key(env.raw)
        topic = env.callback_topic
        if topic is not None:
            why = self.reply_rules.refusal(topic)
            if why is not None:
                await ack_once()
                self._refused(f"dropped {env.name}: callback_topic {why}")
                return
        if msg.reply_to is not None and msg.reply_to in self.reply_rules.command_topics:
            await ack_once()
            self._refused(f"dropped {env.name}: its reply address is a command topic")
            return
        # Before the replay claim: the node the command is passed on to must find
        # it unclaimed (and it is that node that refuses a replay).
        if await self._leave_to_others(msg, env.name, env.command):
            return
        if guard_key is not None:
            claim = await self._claim_replay(guard_key, env.name)
            if claim is not Claim.NEW:
                if claim is Claim.SEEN or not await self._hand_back(msg):
                    await ack_once()
                return
        stamp = env.raw.get(TIMESTAMP_FIELD)
        settled = guard_key is None

        async def on_stored() -> None:
            # Durable: from now on any copy is a replay, then the broker may forget it.
            nonlocal settled
            if not settled and guard_key is not None:
                settled = True
                try:
                    await self.replays.settle(guard_key, _stamp(stamp), time.time())
                except Exception as exc:
                    self._note_error(exc)
                    log.warning("%s: %s ran but its signature could not be remembered: %s",
                                self.name, env.name, self._describe(exc))
            self._release_hold(msg)
            await ack_once()

        wants_reply = bool(topic or msg.reply_to)
        try:
            response = await self.service.execute(
                env, wait=self.reply_wait if wants_reply else 0.0, on_stored=on_stored,
                transport=self.name, grants=self.common.grants,
            )
        except Exception as exc:
            # A bug, not a broker problem: drop the message rather than have it
            # redelivered into the same bug forever.
            log.exception("%s: %s failed unexpectedly; dropped", self.name, env.name)
            self._note_error(exc)
            response = Response(env.name, Code.FAILED, {}, "internal error")
        if response.transient and not acked and msg.redeliver is not None:
            if not settled and guard_key is not None:
                await self._release(guard_key)
            if await self._hand_back(msg):
                log.warning("%s: %s not stored; left to the broker to redeliver", self.name,
                            env.name)
                return
        await on_stored()
        if wants_reply:
            self._schedule_reply(topic, env.callback_delay_ms, msg, response, request_signature)

    async def _leave_to_others(self, msg: Inbound, name: str, command: object) -> bool:
        """Hand a send command back, unacknowledged, when this node cannot send it
        soon and the broker can give it to another node."""
        intake = self._gated
        channel = channel_of(name, command)
        if intake is None or channel is None or msg.pass_on is None:
            return False
        expiration = getattr(command, "expiration", None)
        why = intake.refusal(channel, None if expiration is None else float(expiration))
        if why is None:
            return False
        # Not at once: with every node in the same state it would bounce between them.
        await asyncio.sleep(self.common.retry_delay)
        if not await msg.pass_on():
            return False
        self._handed_back += 1
        log.info("%s: %s left to the other nodes: %s", self.name, name, why)
        return True

    # -- refusals, replays ---------------------------------------------------------
    def _refused(self, why: str) -> None:
        self._note_error(why)
        now = time.monotonic()
        if now - self._refusal_window >= REFUSAL_LOG_INTERVAL:
            if self._refusals_unlogged:
                log.warning("%s: %d more messages dropped in the last %.0f s (not logged)",
                            self.name, self._refusals_unlogged, now - self._refusal_window)
            self._refusal_window, self._refusals_logged, self._refusals_unlogged = now, 0, 0
        if self._refusals_logged < REFUSAL_LOG_BURST:
            self._refusals_logged += 1
            log.warning("%s: %s", self.name, why)
        else:
            self._refusals_unlogged += 1

    async def _claim_replay(self, key: str, name: str) -> Claim:
        try:
            claim = await self.replays.claim(key, time.time())
        except Exception as exc:
            # The store cannot say whether this is a replay: like a store failure,
            # the command waits for redelivery (or is lost with a lossy broker).
            self._note_error(exc)
            log.warning("%s: %s: the replay check failed: %s", self.name, name,
                        self._describe(exc))
            return Claim.BUSY
        if claim is Claim.SEEN:
            self._refused(f"dropped {name}: a replay of a command already run")
        elif claim is Claim.BUSY:
            log.info("%s: %s: a copy is still being run; handed back", self.name, name)
        return claim

    async def _release(self, key: str) -> None:
        try:
            await self.replays.release(key)
        except Exception as exc:
            self._note_error(exc)
            log.warning("%s: could not release a replay claim (it expires in %.0f s): %s",
                        self.name, CLAIM_TTL, self._describe(exc))

    async def _hand_back(self, msg: Inbound) -> bool:
        """Give the message back to the broker for redelivery after ``retry_delay``
        (so a broken store is not hammered); False where the broker cannot."""
        if msg.redeliver is None:
            return False
        await asyncio.sleep(self.common.retry_delay)
        return await msg.redeliver()

    # -- replies -------------------------------------------------------------------
    def _schedule_reply(self, topic: str | None, delay_ms: int, msg: Inbound,
                        response: Response, request_signature: str) -> None:
        """Answer from a task of its own (bounded), so that waiting out
        ``callback_delay`` never holds the slot the next command needs."""
        if topic is not None and self.reply_rules.refusal(topic) is not None:
            topic = None  # a malformed message's best-effort topic: never a handle on state
        if not topic and not msg.reply_to:
            return
        if len(self._replies) >= MAX_PENDING_REPLIES:
            self._refused(f"reply ({response.command} {response.code.value}) not sent:"
                          f" {MAX_PENDING_REPLIES} replies already waiting")
            return
        body = self._reply_body(response, request_signature)
        task = asyncio.create_task(self._reply(topic, delay_ms, msg, response, body),
                                   name=f"{self.name}-reply")
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    def _reply_body(self, response: Response, request_signature: str) -> bytes:
        obj = response.to_json()
        if self.common.signing_key:
            # Bound to the request: a reply to another command never verifies.
            obj = sign_reply(obj, request_signature, self.common.signing_key)
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    async def _reply(self, topic: str | None, delay_ms: int, msg: Inbound,
                     response: Response, body: bytes) -> None:
        targets: list[tuple[str, bool]] = []
        if topic:
            targets.append((topic, True))
        if msg.reply_to and msg.reply_to != topic:
            targets.append((msg.reply_to, False))
        delay_ms = max(delay_ms, self.min_reply_delay_ms)
        if delay_ms > 0:
            # The PHP client subscribes to the reply topic just after publishing.
            await asyncio.sleep(delay_ms / 1000)
        for target, callback in targets:
            try:
                await self.publish_reply(target, body, msg.correlation, callback)
            except Exception as exc:
                self._note_error(exc)
                log.warning("%s: reply (%s %s) not sent: %s", self.name, response.command,
                            response.code.value, self._describe(exc))


def _stamp(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return time.time()
