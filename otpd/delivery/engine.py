"""The delivery engine: drains the durable outbox into channels.

Every message is in the store before it gets here. The engine keeps the
pending ones in memory per channel, hands them to the channel's senders
(oldest due first), records every outcome durably, retries with the delay the
channel asks for, and drops what reaches its expiration unsent. Nothing is
ever handed to a channel after its expiration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from otpd.aio import cancel_and_wait
from otpd.delivery import admission
from otpd.delivery.admission import AdmissionSettings, Gate, Observed
from otpd.delivery.channel import Capacity, Channel, Delivered, Failed, Job, Outcome, Retry
from otpd.delivery.handover import dedupe_key
from otpd.delivery.jobqueue import JobQueue, Pending
from otpd.metrics import Metrics
from otpd.msisdn import mask
from otpd.sealing import Sealer, SealError
from otpd.store import MessageRow, Store, StoreError
from otpd.wire.codes import Code

log = logging.getLogger("otpd.delivery.engine")

_MAX_SWEEP_SLEEP = 5.0
_HANDOVER_CHECK = 1.0  # s between two looks for held messages to hand back
_SEND_TIME_WEIGHT = 0.2  # weight of the newest send in the moving average

# Publishes a held message back to the shared queue; False if it could not.
Handover = Callable[[Job], Awaitable[bool]]


@dataclass(frozen=True)
class Result:
    """What finally happened to a message."""

    state: str  # sent | failed | expired
    code: Code
    reason: str = ""
    via: str = ""


class ChannelQueue:
    """The pending jobs of one channel; the channel's WorkSource."""

    def __init__(self, engine: DeliveryEngine, channel: Channel) -> None:
        self.engine = engine
        self.channel = channel
        self.jobs = JobQueue()
        self.changed = asyncio.Condition()
        self.sweep_now = asyncio.Event()
        self.sweep_at = 0.0  # when the sweeper looks next (wall clock)
        # Measured sends, for the intake (otpd.delivery.admission).
        self.observed = Observed()
        self.started: dict[int, float] = {}  # job id -> monotonic time it was taken
        self.closed_since: float | None = None  # monotonic: since when it cannot send
        self.handed_over = 0

    def capacity(self) -> Capacity:
        cap = getattr(self.channel, "capacity", None)
        if cap is None:  # a channel without the method (older test doubles)
            usable = self.channel.usable()
            return Capacity(ready=int(usable), senders=1, reason="" if usable else "unusable")
        out: Capacity = cap()
        return out

    def gate(self, extra: int = 0) -> Gate:
        """May the node take more of this channel (``extra``: commands being stored)?"""
        return admission.gate(self.capacity(), self.observed, len(self.jobs) + extra,
                              self.engine.monotonic(), self.engine.admission)

    def observe(self, job: Job, outcome: Outcome) -> None:
        started = self.started.pop(job.id, None)
        seen = self.observed
        if isinstance(outcome, Delivered):
            took = None if started is None else max(self.engine.monotonic() - started, 0.0)
            avg = seen.send_time
            if took is not None:
                avg = took if avg is None else avg + _SEND_TIME_WEIGHT * (took - avg)
            self.observed = Observed(avg, 0, seen.last_failure)
        elif isinstance(outcome, Retry):
            self.observed = Observed(seen.send_time, seen.failures + 1, self.engine.monotonic())

    # -- WorkSource ----------------------------------------------------------
    async def take(self, accept: Callable[[Job], bool] | None = None) -> Job:
        job = await self._reserve(accept)
        self.started[job.id] = self.engine.monotonic()
        await self.engine.mark_attempt(job)
        return job

    async def _reserve(self, accept: Callable[[Job], bool] | None) -> Job:
        async with self.changed:
            while True:
                now, mono = self.engine.clock(), self.engine.monotonic()
                p = self.jobs.reserve(now, accept, mono)
                if p is not None:
                    return p.job
                next_due = self.jobs.next_due()
                timeout = None if next_due is None else max(0.01, next_due - mono)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands with the wake-up, and stop() would hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self.changed.wait()

    async def finish(self, job: Job, outcome: Outcome) -> None:
        await self.engine.finish(self, job, outcome)

    def wake(self) -> None:
        asyncio.get_running_loop().create_task(self.notify())

    # -- engine side ---------------------------------------------------------
    async def notify(self) -> None:
        self.engine.changed()  # the intake's room or the channel's capacity moved
        async with self.changed:
            self.changed.notify_all()

    def expires(self, at: float) -> None:
        """A job expiring at ``at`` joined: wake the sweeper only if it would
        look too late (not on every submit: that is a hot path)."""
        if at < self.sweep_at:
            self.sweep_now.set()


class DeliveryEngine:
    def __init__(
        self,
        store: Store,
        channels: dict[str, Channel],
        sealer: Sealer,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        admission: AdmissionSettings | None = None,
    ) -> None:
        # ``clock`` (wall time) is for expirations, which are absolute unix
        # seconds; ``monotonic`` times retry delays, so that a wall-clock jump
        # neither stalls retries (clock set back) nor hurries them.
        self.monotonic = monotonic
        self.metrics = metrics
        self.store = store
        self.channels = channels
        self.sealer = sealer
        self.clock = clock
        self.queues = {name: ChannelQueue(self, ch) for name, ch in channels.items()}
        self._futures: dict[int, asyncio.Future[Result | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.healthy = True
        self.uncertain_resends = 0
        self.closing = False
        self.admission = admission or AdmissionSettings()
        # Set by the daemon when a broker can take messages back (several nodes).
        self.handover: Handover | None = None
        # Rows whose hand-over id this node holds (claimed at the start).
        self._held_ids: set[int] = set()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, callback: Callable[[], None]) -> None:
        """``callback`` runs (synchronously) whenever a channel's backlog or
        capacity may have changed."""
        self._listeners.append(callback)

    def changed(self) -> None:
        for callback in self._listeners:
            callback()

    async def start(self) -> None:
        """Resume what was pending at the last stop, then start the channels."""
        resumed = 0
        for row in await self.store.pending_messages():
            job = await self._job_from_row(row)
            if job is not None and row.attempt_started is not None:
                # Killed while a channel had it: the modem or SMTP server may
                # have taken it before the result was recorded.
                self.uncertain_resends += 1
                log.warning("message %d to %s was being sent when otpd stopped; it may have"
                            " gone out already: sending it again", row.id, mask(row.receiver))
            if job is not None and await self._handed_over_before(job):
                continue
            if job is not None:
                # Not at row.next_attempt_at: that is wall-clock time, which may
                # have gone back while otpd was down. A restart tries at once.
                self._add(job, delay=0.0)
                resumed += 1
        if resumed:
            log.info("resumed %d pending message(s) from the outbox", resumed)
        for name, queue in self.queues.items():
            self._tasks.append(
                asyncio.create_task(self._run_channel(queue), name=f"channel-{name}")
            )
            self._tasks.append(asyncio.create_task(self._sweep(queue), name=f"expiry-{name}"))
            self._tasks.append(asyncio.create_task(self._hand_back(queue),
                                                   name=f"handover-{name}"))

    def release_waiters(self) -> None:
        """Shutting down: whoever waits for a result hears "still pending" (1111)
        now, and later submissions do not wait. The messages stay in the outbox."""
        self.closing = True
        for fut in self._futures.values():
            if not fut.done():
                fut.set_result(None)
        self._futures.clear()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks, "the delivery channels", log)
        self._tasks.clear()
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()

    def alive(self) -> bool:
        """Every channel and expiry task is still running (for the watchdog)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def pending_count(self) -> int:
        return sum(len(q.jobs) for q in self.queues.values())

    def oldest_pending_age(self) -> float:
        created = [p.job.created_at for q in self.queues.values() for p in q.jobs]
        return self.clock() - min(created) if created else 0.0

    async def submit(self, job: Job) -> asyncio.Future[Result | None]:
        """Queue a stored message; the future resolves with its final result
        (None if otpd shuts down first: the message stays pending)."""
        fut: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        if self.closing:
            fut.set_result(None)
        else:
            self._futures[job.id] = fut
        self._add(job, delay=0.0)
        await self.queues[job.channel].notify()
        return fut

    def _add(self, job: Job, delay: float) -> None:
        mono = self.monotonic()
        queue = self.queues[job.channel]
        queue.jobs.add(job, mono + delay, mono)
        queue.expires(job.expires_at)

    async def _job_from_row(self, row: MessageRow) -> Job | None:
        if row.channel not in self.queues or row.sealed is None:
            await self._record_final(row.id, Result("failed", Code.FAILED, "channel unavailable"),
                                     row.attempts)
            return None
        try:
            text = self.sealer.open(row.sealed, row.receiver)
        except SealError as exc:
            log.error("outbox message %d: %s", row.id, exc)
            await self._record_final(row.id, Result("failed", Code.FAILED, str(exc)), row.attempts)
            return None
        return Job(
            id=row.id,
            channel=row.channel,
            receiver=row.receiver,
            subject=row.subject,
            text=text,
            expires_at=row.expires_at,
            attempts=row.attempts,
            created_at=row.created_at,
        )

    async def mark_attempt(self, job: Job) -> None:
        try:
            await self.store.mark_attempt(job.id, self.clock())
        except StoreError as exc:
            log.error("message %d: could not record the send attempt: %s", job.id, exc)

    async def finish(self, queue: ChannelQueue, job: Job, outcome: Outcome) -> None:
        pending = queue.jobs.pending.get(job.id)
        if pending is None:
            return
        queue.observe(job, outcome)
        attempts = job.attempts + 1
        if isinstance(outcome, Retry):
            now, mono = self.clock(), self.monotonic()
            delay = max(outcome.delay, 0.0)
            due = now + delay  # on record, for the operator's outbox view
            pending.job = _with_attempts(job, attempts)
            pending.last_error = outcome.reason
            queue.jobs.release(pending, mono + delay, mono)
            queue.expires(job.expires_at)
            log.info("message %d to %s: retry in %.1fs (%s)", job.id, mask(job.receiver),
                     max(outcome.delay, 0.0), outcome.reason)
            try:
                await self.store.record_retry(job.id, attempts, due, outcome.reason)
            except StoreError as exc:
                log.error("message %d: could not record retry: %s", job.id, exc)
            await queue.notify()
            return
        queue.jobs.remove(job.id)
        if isinstance(outcome, Delivered):
            result = Result("sent", Code.SUCCESS, outcome.detail, outcome.via)
            if self.metrics is not None:
                self.metrics.delivery.labels(job.channel).observe(self.clock() - job.created_at)
            log.info("message %d to %s: sent via %s", job.id, mask(job.receiver), outcome.via)
        elif isinstance(outcome, Failed):
            # A channel that finds the job expired as it takes it (the modem pool
            # checks) reports Failed(code=EXPIRED): on record it is an expiry.
            state = "expired" if outcome.code is Code.EXPIRED else "failed"
            result = Result(state, outcome.code, outcome.reason)
            log.warning("message %d to %s: failed: %s", job.id, mask(job.receiver), outcome.reason)
        else:  # pragma: no cover - Outcome is a closed union
            raise TypeError(outcome)
        await self._resolve(job.id, result, attempts)
        await queue.notify()

    async def _sweep(self, queue: ChannelQueue) -> None:
        """Drop what expired unsent, as soon as it expires."""
        while True:
            now = self.clock()
            for p in queue.jobs.pop_expired(now):
                result = self._expiry_result(queue.channel, p)
                log.warning("message %d to %s: dropped at expiration (%s)", p.job.id,
                            mask(p.job.receiver), result.reason)
                await self._resolve(p.job.id, result, p.job.attempts)
            nxt = queue.jobs.next_expiry()
            sleep = _MAX_SWEEP_SLEEP if nxt is None else min(max(nxt - now, 0.01), _MAX_SWEEP_SLEEP)
            queue.sweep_now.clear()
            queue.sweep_at = now + sleep
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await queue.sweep_now.wait()

    # -- handing held messages back to the shared queue ---------------------------
    async def _handed_over_before(self, job: Job) -> bool:
        """On resume: killed after publishing a hand-over but before recording it?
        The shared store knows once another node accepted the copy. Otherwise the
        copy may still be in the queue: its id is held now, so whoever reads it
        refuses it as a duplicate, and this node sends the message itself."""
        if self.handover is None:
            return False
        try:
            dup = await self.store.claim_id(dedupe_key(job))
        except StoreError as exc:
            log.warning("message %d: cannot tell whether it was handed over: %s", job.id, exc)
            return False
        if dup is None:
            self._held_ids.add(job.id)
            return False
        await self._record_final(job.id, _HANDED_OVER, job.attempts)
        log.info("message %d to %s: already handed over to another node", job.id,
                 mask(job.receiver))
        return True

    def _to_hand_back(self, queue: ChannelQueue) -> list[Pending]:
        """Held messages this node would not send before they expire: all of them
        once the channel cannot send for ``handover_after`` s, else those the
        backlog ahead makes late."""
        s = self.admission
        cap, seen, mono, now = queue.capacity(), queue.observed, self.monotonic(), self.clock()
        cannot = cap.ready <= 0 or admission.failing(cap, seen, s)
        if not cannot:
            queue.closed_since = None
        elif queue.closed_since is None:
            queue.closed_since = mono
        out: list[Pending] = []
        for position, p in enumerate(queue.jobs):
            left = p.job.expires_at - now
            if p.reserved or left <= 0.5:
                continue  # being sent, or too late for anyone
            if cannot:
                assert queue.closed_since is not None
                if mono - queue.closed_since >= s.handover_after:
                    out.append(p)
            elif admission.late(cap, seen, position, left, s):
                out.append(p)
        return out

    async def _hand_back(self, queue: ChannelQueue) -> None:
        while True:
            await asyncio.sleep(_HANDOVER_CHECK)
            if self.handover is None or self.closing:
                continue
            for p in self._to_hand_back(queue):
                if queue.jobs.pending.get(p.job.id) is not p or p.reserved:
                    continue  # taken meanwhile
                queue.jobs.remove(p.job.id)  # no sender takes it while it is published
                try:
                    if p.job.id in self._held_ids:
                        # Held since the restart: let the copy be accepted again.
                        await self.store.release_id(dedupe_key(p.job))
                        self._held_ids.discard(p.job.id)
                    published = await self.handover(p.job)
                except Exception as exc:
                    log.warning("message %d: hand-over failed: %s", p.job.id, exc)
                    published = False
                if not published:
                    mono = self.monotonic()
                    queue.jobs.add(p.job, mono, mono)  # kept; tried again later
                    queue.expires(p.job.expires_at)
                    await queue.notify()
                    break
                queue.handed_over += 1
                log.warning("message %d to %s: this node cannot send it in time; handed back"
                            " to the shared queue", p.job.id, mask(p.job.receiver))
                await self._resolve(p.job.id, _HANDED_OVER, p.job.attempts)
                await queue.notify()

    @staticmethod
    def _expiry_result(channel: Channel, p: Pending) -> Result:
        if channel.name == "sms" and not channel.usable():
            return Result("expired", Code.NO_DEVICE_CONNECTED,
                          "no modem could take the message before it expired")
        if p.last_error:
            return Result("expired", Code.FAILED,
                          f"not delivered before expiration: {p.last_error}")
        return Result("expired", Code.EXPIRED, "expired before it could be sent")

    async def _resolve(self, job_id: int, result: Result, attempts: int) -> None:
        await self._record_final(job_id, result, attempts)
        fut = self._futures.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    async def _record_final(self, job_id: int, result: Result, attempts: int) -> None:
        try:
            await self.store.finish_message(
                job_id, state=result.state, code=result.code.value, reason=result.reason,
                via=result.via, attempts=attempts, now=self.clock(),
            )
        except StoreError as exc:
            # The row stays pending on disk: after a restart it is tried again
            # (or expires). Better a rare duplicate than a lost message.
            self.healthy = False
            log.error("message %d: could not record final state: %s", job_id, exc)
        else:
            self.healthy = True

    async def _run_channel(self, queue: ChannelQueue) -> None:
        """Keep the channel running; a crash in it is logged and it is restarted."""
        delay = 1.0
        while True:
            try:
                await queue.channel.run(queue)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("channel %s crashed; restarting in %.0fs", queue.channel.name, delay)
                mono = self.monotonic()
                for p in [p for p in queue.jobs if p.reserved]:
                    queue.jobs.release(p, mono, mono)
                    queue.expires(p.job.expires_at)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)


# On record as "sent" via "handover": this node's part is done (and an OTP's
# record must stay, which a failed state would drop); 1111: still pending.
_HANDED_OVER = Result("sent", Code.PENDING, "handed back to the shared queue (another node"
                      " sends it)", "handover")


def _with_attempts(job: Job, attempts: int) -> Job:
    return Job(job.id, job.channel, job.receiver, job.subject, job.text, job.expires_at,
               attempts, job.created_at)
