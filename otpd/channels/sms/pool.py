"""The SMS channel: a pool of modems, one worker each, with routing and failover.

Each modem has two tasks. The supervisor opens and initialises it, watches
its health, sweeps stored copies of sent messages while the modem is idle,
takes it out of rotation when it fails and probes it back with backoff. The
worker takes the next job the moment the modem is free; the ``accept`` filter
it gives the engine does the routing (receiver prefixes, modems that already
failed a job go last). The worker records an outcome while it already waits
for (and sends) the next job, so the modem never idles on the store's commit.

Delivery reports: the parts of a message sent with a report request are
recorded (``reports``, a ReportStore the daemon builds over the store) before
the worker takes the next job; each modem's reports are applied in order by
its own task, after the send in progress is recorded, so a quick report never
misses its part. Outcomes feed ``DeliveryStats`` (per-SIM recent window,
shown in ``status()``); messages without a final report after
``report_timeout`` become "unknown". Each final state goes to ``on_delivery``
(the daemon publishes it on the brokers' status topics).

SIMs the network filters (``sim_health.HealthPolicy``, the ``[sms] filter_*``
keys): after each final outcome the SIM is judged against the other SIMs in
rotation; a filtered SIM takes no work (and does not count in ``capacity()``)
except one probe message at a time when its probe is due, and it still sends
when no SIM in rotation can (never the only SIM stopped for good). A SIM that
looks filtered with no other SIM to take over keeps sending, flagged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from otpd.aio import cancel_and_wait, raise_if_cancel_requested
from otpd.channels.sms.delivery_stats import Delivery, DeliveryStats
from otpd.channels.sms.modem import (
    AtTimeout,
    Modem,
    ModemError,
    PinError,
    PortError,
    SendError,
    Timing,
    decode_ussd,
)
from otpd.channels.sms.pdu import MessageTooLong, StatusReport
from otpd.channels.sms.quota import QuotaError, SimQuota
from otpd.channels.sms.replies import signal_report
from otpd.channels.sms.reports import (
    DeliveryEvent,
    PartReport,
    ReportStore,
    ReportStoreError,
    SentPart,
)
from otpd.channels.sms.settings import ModemSettings, SmsSettings
from otpd.channels.sms.sim_health import Change, Counts, Health, HealthPolicy
from otpd.delivery.channel import (
    Capacity,
    Delivered,
    Failed,
    Job,
    Outcome,
    Retry,
    WorkSource,
)
from otpd.msisdn import InvalidReceiver, canonical_msisdn, mask
from otpd.wire.codes import Code

log = logging.getLogger(__name__)

_MAX_REMEMBERED_JOBS = 10_000


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DOWN = "down"  # out of rotation, being probed
    FAILED = "failed"  # given up for good (SIM PIN problem)
    DISABLED = "disabled"


_USABLE = (State.READY, State.BUSY)


@dataclass(frozen=True)
class IncomingSms:
    modem: str
    sender: str
    text: str
    time: float


class _Slot:
    """Runtime state of one configured modem."""

    def __init__(self, settings: ModemSettings, timing: Timing) -> None:
        self.settings = settings
        self.name = settings.name
        self.state = State.STARTING if settings.enabled else State.DISABLED
        self.modem = Modem(settings, timing=timing, on_trouble=self.report_trouble)
        self.trouble = asyncio.Event()
        self.trouble_reason = ""
        self.sent = 0
        self.failed = 0
        self.consecutive_failures = 0
        self.last_error = ""
        # When (monotonic) the SIM's daily/monthly cap lets it send again: a duration
        # from the quota, so a wall-clock step does not stretch or cut the rest.
        self.quota_until = 0.0
        # Status reports (and their wall-clock arrival), applied in order by one task;
        # cleared while a send is on its way until its parts are recorded.
        self.report_queue: asyncio.Queue[tuple[StatusReport, float]] = asyncio.Queue()
        self.parts_recorded = asyncio.Event()
        self.parts_recorded.set()
        self.probe_job: int | None = None  # the job taken as this SIM's probe
        self.probe_tracked = False  # its parts were recorded: its report can come

    @property
    def sim(self) -> str:
        """The SIM's quota key: its IMSI when known (it follows a SIM moved to
        another modem), else the modem's name."""
        return self.modem.info.imsi or f"modem:{self.name}"

    def report_trouble(self, reason: str) -> None:
        if self.state in _USABLE and not self.trouble.is_set():
            self.trouble_reason = reason
            self.trouble.set()

    def prefix_match(self, receiver: str) -> int:
        """Length of the longest configured prefix of ``receiver`` (0: none)."""
        return max((len(p) for p in self.settings.prefixes if receiver.startswith(p)), default=0)


class ModemPool:
    """The ``sms`` channel (see otpd.delivery.channel.Channel)."""

    name = "sms"

    def __init__(
        self,
        settings: SmsSettings,
        *,
        country_code: str = "",
        clock: Callable[[], float] = time.time,
        on_incoming: Callable[[IncomingSms], None] | None = None,
        quota: SimQuota | None = None,
        reports: ReportStore | None = None,
        on_delivery: Callable[[DeliveryEvent], None] | None = None,
    ) -> None:
        self.quota = quota
        self.reports = reports
        self.delivery = DeliveryStats(settings.delivery_window)
        self.health = HealthPolicy(settings.health)
        # Called (synchronously; it must not block) for every final delivery state.
        self.on_delivery = on_delivery
        self.settings = settings
        self.country_code = country_code
        self.clock = clock
        self.on_incoming = on_incoming
        timing = Timing(not_ready=settings.not_ready_timeout, cpin_grace=settings.cpin_grace)
        self._slots = [_Slot(m, timing) for m in settings.modems]
        for slot in self._slots:
            slot.modem.on_report = functools.partial(self._on_report, slot)
        self._source: WorkSource | None = None
        # job id -> modems that failed it: another modem gets it first.
        self._failed_by: OrderedDict[int, set[str]] = OrderedDict()
        self._recording: set[asyncio.Task[None]] = set()  # outcomes being written

    # --- Channel protocol ----------------------------------------------------------

    def configured(self) -> bool:
        return any(s.settings.enabled for s in self._slots)

    def usable(self) -> bool:
        return any(self._can_send(s) for s in self._slots)

    async def run(self, source: WorkSource) -> None:
        self._source = source
        tasks: list[asyncio.Task[None]] = []
        for slot in self._slots:
            if slot.settings.enabled:
                tasks.append(asyncio.create_task(self._supervise(slot), name=f"sms-{slot.name}"))
                tasks.append(asyncio.create_task(self._work(slot), name=f"sms-work-{slot.name}"))
                tasks.append(asyncio.create_task(self._apply_reports(slot),
                                                 name=f"sms-reports-{slot.name}"))
        if tasks and self.reports is not None:
            tasks.append(asyncio.create_task(self._expire_reports(), name="sms-reports-expiry"))
        try:
            if tasks:  # they end only by a bug (raised here) or a cancellation
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            else:
                await asyncio.Event().wait()  # nothing to drive; stay until cancelled
        finally:
            await cancel_and_wait(tasks, "the modem workers", log)
            # Never cancelled: an outcome not recorded means a delivered message is
            # sent again after a restart.
            await asyncio.gather(*self._recording, return_exceptions=True)
            for slot in self._slots:
                await slot.modem.close()

    def status(self) -> dict[str, Any]:
        modems = []
        for slot in self._slots:
            info = slot.modem.info
            health = self.health.get(slot.sim) if slot.state in _USABLE else None
            modems.append({
                "name": slot.name,
                "port": slot.settings.port,
                "state": self._shown_state(slot),
                # Why it is out of rotation (or flagged), with the numbers it was judged on.
                "state_reason": health.reason if health is not None and
                health.state is not Health.OK else "",
                "health": health.as_dict() if health is not None else None,
                "manufacturer": info.manufacturer,
                "model": info.model,
                "imei": info.imei,
                "imsi": info.imsi,
                "operator": info.operator,
                "signal": signal_report(info.csq),
                "registered": info.registered,
                "prefixes": list(slot.settings.prefixes),
                "sent": slot.sent,
                "failed": slot.failed,
                "last_error": slot.last_error,
                "delivery_reports": slot.modem.reports or "off",
                "sim": slot.sim,
                "delivery": self.delivery.recent(slot.sim, self.clock()),
            })
        return {"modems": modems, "sim_health": self.health.snapshot(),
                **self._delivery_status()}

    def _shown_state(self, slot: _Slot) -> str:
        """The modem's state; ``filtered`` while it is up but out of rotation
        (``flagged``: it looks filtered and keeps sending, no other SIM can)."""
        if slot.state in _USABLE:
            health = self.health.state(slot.sim)
            if health.out and not self._in_rotation(slot):
                return "filtered"
            if health is Health.FLAGGED or health.out:  # out, but sending: nothing else can
                return "flagged"
        return str(slot.state)

    def _delivery_status(self) -> dict[str, Any]:
        """Per-SIM recent outcomes, and the running totals /metrics exports."""
        stats = self.delivery
        return {
            "sims": stats.snapshot(self.clock()),
            "delivery_window": stats.window,
            "reports": [{"modem": m, "sim": s, "status": st, "count": n}
                        for (m, s, st), n in sorted(stats.reports.items())],
            "reports_unmatched": stats.unmatched,
            "deliveries": [{"modem": m, "sim": s, "delivery": d, "count": n}
                           for (m, s, d), n in sorted(stats.messages.items())],
            "time_to_deliver": [
                {"modem": m, "sim": s, "buckets": h.cumulative(), "sum": h.total,
                 "count": h.count}
                for (m, s), h in sorted(stats.time_to_deliver.items())],
        }

    def capacity(self) -> Capacity:
        """Modems that can send (up and under their SIM cap), and why none can."""
        enabled = [s for s in self._slots if s.settings.enabled]
        ready = [s for s in enabled if self._can_send(s)]
        busy = sum(1 for s in ready if s.state is State.BUSY)
        reason = ""
        if not enabled:
            reason = "no modem enabled"
        elif not ready:
            now = time.monotonic()
            if any(s.state in _USABLE and s.quota_until > now for s in enabled):
                reason = "every usable SIM is at its SMS cap"
            elif any(s.state in _USABLE for s in enabled):
                reason = "every usable SIM is filtered by the network (probing)"
            elif all(s.state is State.STARTING for s in enabled):
                reason = "modems starting"
            else:
                errors = sorted({s.last_error for s in enabled if s.last_error})
                reason = "no modem ready" + (f" ({errors[0]})" if errors else "")
        return Capacity(ready=len(ready), senders=len(enabled), busy=busy, reason=reason)

    def summary(self) -> str:
        """For the one-line service status, e.g. ``2/3 modems ready`` ("" = no modem)."""
        if not self._slots:
            return ""
        ready = sum(1 for s in self._slots if s.state in _USABLE and self._in_rotation(s))
        noun = "modem" if len(self._slots) == 1 else "modems"
        filtered = sum(1 for s in self._slots if s.state in _USABLE and not self._in_rotation(s))
        flagged = sum(1 for s in self._slots if s.state in _USABLE and self._in_rotation(s)
                      and self.health.state(s.sim) is not Health.OK)
        return (f"{ready}/{len(self._slots)} {noun} ready"
                + (f", {filtered} filtered" if filtered else "")
                + (f", {flagged} flagged" if flagged else ""))

    async def ussd(self, modem_id: str, ussd_code: str) -> dict[str, Any]:
        """Run a USSD code on the named modem (OTP-Pi's request-ussd)."""
        slot = next((s for s in self._slots if s.name == modem_id), None)
        if slot is None:
            raise LookupError(f"no modem named {modem_id!r}")
        if slot.state not in _USABLE:
            raise LookupError(f"modem {modem_id} is {slot.state}")
        try:
            raw = await slot.modem.ussd(ussd_code)
        except AtTimeout as exc:
            raise TimeoutError(str(exc)) from None
        except ModemError as exc:
            raise OSError(str(exc)) from None
        text, replyable = decode_ussd(raw)
        return {"ussd_content": text, "ussd_content_raw": f"+CUSD: {raw}", "replyable": replyable}

    # --- routing -------------------------------------------------------------------

    def _receiver(self, job: Job) -> str:
        if job.receiver.startswith("+") or not self.country_code:
            return job.receiver
        try:
            return canonical_msisdn(job.receiver, self.country_code)
        except InvalidReceiver:
            return job.receiver

    @staticmethod
    def _up(slot: _Slot) -> bool:
        """Up and under its SIM cap, whatever its delivery record."""
        return slot.state in _USABLE and slot.quota_until <= time.monotonic()

    def _in_rotation(self, slot: _Slot) -> bool:
        """Not filtered, or filtered but no SIM in rotation can send (a Pi whose
        other modems are down still sends through the one it has)."""
        if not self.health.state(slot.sim).out:
            return True
        return not any(s is not slot and self._up(s) and not self.health.state(s.sim).out
                       for s in self._slots)

    def _can_send(self, slot: _Slot) -> bool:
        return self._up(slot) and self._in_rotation(slot)

    def _accept(self, slot: _Slot, job: Job) -> bool:
        if slot.state is not State.READY or slot.quota_until > time.monotonic():
            return False
        if not self._in_rotation(slot):
            return self._accept_probe(slot, job)
        usable = [s for s in self._slots if self._can_send(s)]
        tried = self._failed_by.get(job.id, set())
        untried = [s for s in usable if s.name not in tried]
        if slot.name in tried and untried:
            return False  # let a modem that has not failed this job try first
        candidates = untried or usable
        receiver = self._receiver(job)
        best = max((s.prefix_match(receiver) for s in candidates), default=0)
        return best == 0 or slot.prefix_match(receiver) == best

    def _accept_probe(self, slot: _Slot, job: Job) -> bool:
        """A filtered SIM takes one message when its probe is due: one its
        prefixes suit as well as any SIM's in rotation, not one it failed."""
        if slot.probe_job is not None or not self.health.probe_due(slot.sim, self.clock()):
            return False
        if slot.name in self._failed_by.get(job.id, set()):
            return False
        receiver = self._receiver(job)
        best = max((s.prefix_match(receiver) for s in self._slots if self._can_send(s)),
                   default=0)
        if slot.prefix_match(receiver) < best:
            return False
        slot.probe_job = job.id
        slot.probe_tracked = False
        self._health_changed(slot, self.health.probe_started(slot.sim, self.clock()))
        return True

    def _wake(self) -> None:
        if self._source is not None:
            self._source.wake()

    def _set_state(self, slot: _Slot, state: State) -> None:
        was_usable = slot.state in _USABLE
        slot.state = state
        if was_usable != (state in _USABLE):
            self._wake()  # the accept filters of every worker changed

    def _remember_failure(self, slot: _Slot, job: Job) -> None:
        self._failed_by.setdefault(job.id, set()).add(slot.name)
        self._failed_by.move_to_end(job.id)
        while len(self._failed_by) > _MAX_REMEMBERED_JOBS:
            self._failed_by.popitem(last=False)

    # --- supervisor ----------------------------------------------------------------

    async def _supervise(self, slot: _Slot) -> None:
        attempt = 0
        while True:
            try:
                await slot.modem.open()
            except PinError as exc:
                slot.last_error = str(exc)
                self._set_state(slot, State.FAILED)
                log.error("modem %s: %s; not retrying", slot.name, exc)
                return
            except Exception as exc:  # any failure: out of rotation, probe again later
                if not isinstance(exc, ModemError | OSError):
                    log.exception("modem %s: unexpected error while starting", slot.name)
                slot.last_error = str(exc)
                self._set_state(slot, State.DOWN)
                attempt += 1
                delay = min(self.settings.max_probe_interval,
                            self.settings.probe_interval * 2 ** min(attempt - 1, 20))
                log.warning("modem %s: not usable (%s); next probe in %.1f s",
                            slot.name, exc, delay)
                await asyncio.sleep(delay)
                continue
            attempt = 0
            slot.consecutive_failures = 0
            slot.trouble.clear()
            info = slot.modem.info
            log.info("modem %s ready: %s %s, operator %r, csq %s", slot.name,
                     info.manufacturer, info.model, info.operator, info.csq)
            await self._check_quota(slot)
            self._set_state(slot, State.READY)
            self._judge(slot, self.clock())  # its SIM is known now (a restart reloaded its record)
            reason = await self._watch(slot)
            slot.last_error = reason
            log.warning("modem %s taken out of rotation: %s", slot.name, reason)
            self._set_state(slot, State.DOWN)
            await self._reset(slot)
            attempt = 1
            await asyncio.sleep(self.settings.probe_interval)

    async def _watch(self, slot: _Slot) -> str:
        """Return (with a reason) when the modem must be taken out and reset."""
        modem = slot.modem
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.settings.refresh_interval
        sweep_hold = 0.0  # after a sweep that timed out: not before the next refresh
        while True:
            wake_at = next_refresh
            sweep_at = modem.idle_sweep_at(self.settings.idle_sweep_delay)
            if sweep_at is not None:
                wake_at = min(wake_at, max(sweep_at, sweep_hold))
            trouble = asyncio.ensure_future(slot.trouble.wait())
            incoming = asyncio.ensure_future(modem.incoming_waiting.wait())
            sweep = asyncio.ensure_future(modem.sweep_wanted.wait())
            stored = asyncio.ensure_future(modem.reports_waiting.wait())
            waiters = {trouble, sweep, stored}
            if slot.settings.read_inbox:
                waiters.add(incoming)
            try:
                await asyncio.wait(waiters, timeout=max(wake_at - loop.time(), 0.0),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (trouble, incoming, sweep, stored):
                    waiter.cancel()
            if slot.trouble.is_set():
                return slot.trouble_reason
            modem.sweep_wanted.clear()  # seen: the sweep time is recomputed above
            try:
                now = loop.time()
                if now >= next_refresh:
                    next_refresh = now + self.settings.refresh_interval
                    await modem.refresh()
                    if slot.settings.read_inbox:
                        await self._read_inbox(slot)
                elif slot.settings.read_inbox and modem.incoming_waiting.is_set():
                    await self._read_inbox(slot)
                if modem.reports_waiting.is_set():
                    await modem.read_stored_reports()
                sweep_at = modem.idle_sweep_at(self.settings.idle_sweep_delay)
                if sweep_at is not None and loop.time() >= max(sweep_at, sweep_hold):
                    sweep_hold = next_refresh
                    await modem.cleanup_sent()
                    sweep_hold = 0.0
            except AtTimeout:
                if not await modem.ping():
                    return "stopped answering"
            except ModemError as exc:
                return str(exc)
            except Exception as exc:  # a bug must not stop supervising the modem
                log.exception("modem %s: unexpected error while checking it", slot.name)
                return f"internal error {exc!r}"

    async def _read_inbox(self, slot: _Slot) -> None:
        for item in await slot.modem.read_incoming():
            msg = item.message
            log.info("modem %s: incoming SMS from %s", slot.name, mask(msg.sender))
            if self.on_incoming is not None:
                self.on_incoming(IncomingSms(slot.name, msg.sender, msg.text, self.clock()))

    async def _reset(self, slot: _Slot) -> None:
        modem = slot.modem
        if modem.is_open:
            with contextlib.suppress(ModemError):
                await modem.exchange("ATZ", slot.settings.command_timeout)
        await modem.close()

    # --- SIM quotas -----------------------------------------------------------------

    async def _check_quota(self, slot: _Slot) -> None:
        if self.quota is None:
            return
        try:
            wait = await self.quota.wait(slot.sim, self.clock())
        except QuotaError as exc:
            log.error("modem %s: cannot read the SIM quota: %s", slot.name, exc)
            return
        self._quota_reached(slot, wait)

    async def _count_parts(self, slot: _Slot, parts: int) -> None:
        if self.quota is None:
            return
        try:
            wait = await self.quota.record(slot.sim, parts, self.clock())
        except QuotaError as exc:
            log.error("modem %s: cannot record the SIM quota: %s", slot.name, exc)
            return
        self._quota_reached(slot, wait)

    def _quota_reached(self, slot: _Slot, wait: float) -> None:
        if wait <= 0:
            return
        slot.quota_until = time.monotonic() + wait
        log.warning("modem %s: the SIM reached its SMS cap (limits.sim_daily_max /"
                    " sim_monthly_max); it sends again in %.0f s, other modems take its work",
                    slot.name, wait)
        self._wake()  # other workers' filters change now, and again when it lifts
        asyncio.get_running_loop().call_later(wait + 0.01, self._wake)

    # --- delivery reports -------------------------------------------------------------

    def _on_report(self, slot: _Slot, report: StatusReport) -> None:
        slot.report_queue.put_nowait((report, self.clock()))

    async def _record_parts(self, slot: _Slot, job: Job, receiver: str, refs: list[int]
                            ) -> bool:
        """Keep what a report will be matched with (not when the modem gave no MR);
        True when recorded."""
        if self.reports is None or not slot.modem.reports or not refs or min(refs) < 0:
            return False
        now = self.clock()
        parts = [SentPart(job.id, i, len(refs), slot.name, slot.sim, mr, receiver, now)
                 for i, mr in enumerate(refs, start=1)]
        try:
            await self.reports.sent(parts)
        except ReportStoreError as exc:
            log.error("modem %s: cannot record the parts of message %d for delivery"
                      " reports: %s", slot.name, job.id, exc)
            return False
        return True

    async def _apply_reports(self, slot: _Slot) -> None:
        while True:
            report, at = await slot.report_queue.get()
            await slot.parts_recorded.wait()
            try:
                await self._apply_report(slot, report, at)
            except Exception:  # a bug must not stop the reports of this modem
                log.exception("modem %s: applying a status report failed", slot.name)

    async def _apply_report(self, slot: _Slot, report: StatusReport, at: float) -> None:
        outcome = report.outcome
        self.delivery.report(slot.name, slot.sim, str(outcome))
        if self.reports is None:
            return
        try:
            match = await self.reports.report(PartReport(
                slot.name, slot.sim, report.reference, report.recipient, str(outcome),
                report.status, at, report.discharged.timestamp()))
        except ReportStoreError as exc:
            log.error("modem %s: cannot record a status report: %s", slot.name, exc)
            return
        if match is None:
            self.delivery.report_unmatched()
            log.info("modem %s: status report for mr %d to %s matches no sent part",
                     slot.name, report.reference, mask(report.recipient))
            return
        if match.became_final:
            delivered = match.delivery is Delivery.DELIVERED
            self._final(DeliveryEvent(
                match.message_id, match.modem, match.sim, match.delivery, match.first_sent_at,
                at, report.discharged.timestamp() if delivered else None))
            log.info("message %d %s (%s, TP-ST 0x%02X: %s)", match.message_id, match.delivery,
                     slot.name, report.status, report.meaning)

    async def _expire_reports(self) -> None:
        """Reload the recent outcomes, then turn overdue messages "unknown" now and then."""
        assert self.reports is not None
        timeout = self.settings.report_timeout
        try:
            recent = await self.reports.recent(self.clock() - self.delivery.window)
            self.delivery.load((o.modem, o.sim, o.delivery, o.at) for o in recent)
        except ReportStoreError as exc:
            log.error("cannot read recent delivery outcomes: %s", exc)
        while True:
            now = self.clock()
            try:
                for item in await self.reports.expire(now - timeout, now):
                    self._final(DeliveryEvent(item.message_id, item.modem, item.sim,
                                              Delivery.UNKNOWN, item.sent_at, now))
            except ReportStoreError as exc:
                log.error("cannot mark unreported messages: %s", exc)
            await asyncio.sleep(min(60.0, max(timeout / 4, 0.05)))

    def _final(self, event: DeliveryEvent) -> None:
        """A message became final: statistics, the SIM's standing, the status event."""
        seconds = (event.at - event.sent_at if event.delivery is Delivery.DELIVERED else None)
        self.delivery.outcome(event.modem, event.sim, event.delivery, event.at, seconds)
        slot = self._slot_of(event.sim)
        change = self.health.outcome(event.sim, event.message_id,
                                     event.delivery is Delivery.DELIVERED, event.at)
        self._health_changed(slot, change)
        if slot is not None:
            self._judge(slot, event.at)
        if self.on_delivery is not None:
            try:
                self.on_delivery(event)
            except Exception:  # a bug there must not stop this modem's reports
                log.exception("message %d: the delivery event failed", event.message_id)

    # --- SIMs the network filters -------------------------------------------------------

    def _slot_of(self, sim: str) -> _Slot | None:
        return next((s for s in self._slots if s.sim == sim), None)

    def _counts(self, slot: _Slot, now: float) -> Counts:
        since = self.health.get(slot.sim).since
        return Counts(*self.delivery.counts_since(slot.sim, since, now))

    def _judge(self, slot: _Slot, now: float) -> None:
        if not slot.settings.enabled or slot.state not in _USABLE:
            return
        in_rotation = [s for s in self._slots if s is not slot and s.settings.enabled
                       and s.state in _USABLE and not self.health.state(s.sim).out]
        others = sum((self._counts(s, now) for s in in_rotation), Counts())
        can_leave = any(self._up(s) for s in in_rotation)
        change = self.health.judge(slot.sim, self._counts(slot, now), others,
                                   can_leave=can_leave, now=now)
        self._health_changed(slot, change)

    def _health_changed(self, slot: _Slot | None, change: Change | None) -> None:
        if change is None:
            return
        name = slot.name if slot is not None else "?"
        if change.after is Health.FLAGGED:
            # The one alert a one-SIM Pi gets: its only SIM keeps sending.
            log.error("modem %s: SIM %s %s", name, change.sim, change.reason)
        elif change.after is Health.FILTERED and change.before is not Health.PROBING:
            log.warning("modem %s: SIM %s taken out of rotation, %s", name, change.sim,
                        change.reason)
        elif change.after is Health.OK:
            log.warning("modem %s: SIM %s %s", name, change.sim, change.reason)
        else:
            log.info("modem %s: SIM %s %s", name, change.sim, change.reason)
        self._wake()  # the accept filters changed
        probe_at = self.health.next_probe(change.sim)
        if probe_at is not None:
            # Wake the workers when the probe is due (the filters read the clock).
            asyncio.get_running_loop().call_later(max(probe_at - self.clock(), 0.0) + 0.01,
                                                  self._wake)

    # --- worker --------------------------------------------------------------------

    async def _work(self, slot: _Slot) -> None:
        assert self._source is not None
        source = self._source
        accept = functools.partial(self._accept, slot)
        recording: asyncio.Task[None] | None = None
        while True:
            job = await source.take(accept=accept)
            slot.parts_recorded.clear()  # reports wait until this send's parts are known
            try:
                outcome = await self._deliver(slot, job)
                if slot.probe_job == job.id:
                    self._probe_done(slot, job, outcome)
            finally:
                slot.parts_recorded.set()
            if isinstance(outcome, Delivered | Failed):
                self._failed_by.pop(job.id, None)
            if recording is not None:
                await asyncio.shield(recording)  # at most one outcome in flight per modem
            # Recorded while this worker already takes the next job: the store's
            # commit (an fsync) overlaps the next send. run() waits for it on stop.
            recording = asyncio.create_task(self._record(slot, source, job, outcome),
                                            name=f"sms-finish-{slot.name}")
            self._recording.add(recording)
            recording.add_done_callback(self._recording.discard)
            raise_if_cancel_requested()  # a stop request a library call swallowed

    def _probe_done(self, slot: _Slot, job: Job, outcome: Outcome) -> None:
        """Before its report can be applied: the probe's outcome is awaited, or
        (not sent, or no report can come) it is due again."""
        slot.probe_job = None
        if isinstance(outcome, Delivered) and slot.probe_tracked:
            self.health.probe_sent(slot.sim, job.id)
            log.info("modem %s: probe message %d sent; back in rotation once delivered",
                     slot.name, job.id)
        else:
            self._health_changed(slot, self.health.probe_aborted(slot.sim, self.clock()))

    @staticmethod
    async def _record(slot: _Slot, source: WorkSource, job: Job, outcome: Outcome) -> None:
        try:
            await source.finish(job, outcome)
        except Exception:
            log.exception("modem %s: recording the outcome of message %d failed",
                          slot.name, job.id)

    async def _deliver(self, slot: _Slot, job: Job) -> Outcome:
        if slot.state is not State.READY:
            return Retry(f"modem {slot.name} is {slot.state}", 0.0)
        now = self.clock()
        if job.expires_at <= now:
            return Failed("expired before it could be sent", Code.EXPIRED)
        receiver = self._receiver(job)
        slot.state = State.BUSY
        try:
            refs = await slot.modem.send_sms(receiver, job.text, validity=job.expires_at - now)
        except MessageTooLong as exc:
            return Failed(str(exc))
        except ValueError as exc:  # receiver the PDU codec cannot address
            return Failed(f"invalid receiver: {exc}")
        except SendError as exc:
            if exc.permanent:
                slot.failed += 1
                slot.last_error = str(exc)
                log.warning("message %d to %s refused by %s: %s", job.id, mask(receiver),
                            slot.name, exc)
                return Failed(str(exc))
            return await self._failure(slot, job, str(exc))
        except AtTimeout as exc:
            outcome = await self._failure(slot, job, f"modem {slot.name}: {exc}")
            if slot.modem.is_open and not await slot.modem.ping():
                slot.report_trouble("stopped answering")
            return outcome
        except PortError as exc:
            return await self._failure(slot, job, f"modem {slot.name}: {exc}")
        except ModemError as exc:
            return await self._failure(slot, job, f"modem {slot.name}: {exc}")
        except Exception as exc:  # a bug must cost one attempt, not the worker
            log.exception("modem %s: unexpected error sending message %d", slot.name, job.id)
            return await self._failure(slot, job, f"modem {slot.name}: internal error {exc!r}")
        finally:
            if slot.state is State.BUSY:
                slot.state = State.READY
        slot.sent += 1
        slot.consecutive_failures = 0
        tracked = await self._record_parts(slot, job, receiver, refs)
        if slot.probe_job == job.id:
            slot.probe_tracked = tracked
        await self._count_parts(slot, len(refs))
        return Delivered(via=slot.name, detail="mr=" + ",".join(map(str, refs)))

    async def _failure(self, slot: _Slot, job: Job, reason: str) -> Retry:
        slot.failed += 1
        slot.consecutive_failures += 1
        slot.last_error = reason
        self._remember_failure(slot, job)
        log.warning("message %d to %s failed on %s: %s", job.id, mask(job.receiver),
                    slot.name, reason)
        if slot.consecutive_failures >= self.settings.max_failures_before_reset:
            slot.report_trouble(f"{slot.consecutive_failures} consecutive failures")
        tried = self._failed_by.get(job.id, set())
        others = any(s.state in _USABLE and s.name not in tried for s in self._slots)
        return Retry(reason, 0.0 if others else self.settings.retry_delay)
