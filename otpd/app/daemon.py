"""The daemon: wires the store, channels, delivery engine, service and transports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from otpd.aio import STOP_BOUND, bounded, cancel_and_wait, within
from otpd.app import sdnotify
from otpd.app.control import ControlServer
from otpd.app.ddns import DdnsUpdater
from otpd.app.ddns_settings import DdnsSettings
from otpd.app.delivery_events import DeliveryEvents
from otpd.app.settings import Settings, load_settings
from otpd.app.status_view import StatusView
from otpd.auth.htpasswd import SALTED_SCHEMES, HtpasswdError, HtpasswdFile
from otpd.channels.email import SmtpChannel
from otpd.channels.sms.delivery_stats import Delivery
from otpd.channels.sms.quota import QuotaError
from otpd.channels.sms.quota import SimQuota as PoolQuota
from otpd.channels.sms.reports import (
    DeliveryEvent,
    PartReport,
    RecentOutcome,
    ReportMatch,
    ReportStoreError,
    SentPart,
    Unreported,
)
from otpd.channels.smtp_quota import QuotaError as SmtpQuotaError
from otpd.delivery.channel import Capacity, Channel, Job, WorkSource
from otpd.delivery.engine import DeliveryEngine
from otpd.delivery.handover import handover_envelope
from otpd.delivery.intake import EngineIntake
from otpd.email_quota import EmailQuota
from otpd.errors import StartupError
from otpd.limits import Limiter, SimQuota
from otpd.metrics import Metrics
from otpd.otp import KeyFileError, load_or_create_key
from otpd.sealing import Sealer
from otpd.service import Service
from otpd.settings_reader import ConfigError
from otpd.store import SmsPart, SmsReport, SqliteStore, Store, StoreError
from otpd.store.migrations import SchemaTooNew
from otpd.store.settings import StoreSettings
from otpd.transports.consumer import STOP_GRACE, Consumer
from otpd.transports.registry import build_consumers
from otpd.transports.rest import RestApi

log = logging.getLogger("otpd")


class NoModems:
    """The SMS channel of an email-only install: every SMS is refused with 1000."""

    name = "sms"

    def configured(self) -> bool:
        return False

    def usable(self) -> bool:
        return False

    async def run(self, source: WorkSource) -> None:
        await asyncio.Event().wait()

    def status(self) -> dict[str, Any]:
        return {"modems": []}

    def capacity(self) -> Capacity:
        return Capacity(ready=0, senders=0, reason="no modem configured")

    def summary(self) -> str:
        return ""


@runtime_checkable
class ReportsDeliveries(Protocol):
    """A channel that says when a sent message reached a final delivery state."""

    on_delivery: Callable[[DeliveryEvent], None] | None


@runtime_checkable
class Summarised(Protocol):
    """A channel that says in a few words how it is (``2/3 modems ready``)."""

    def summary(self) -> str: ...


class StoreSimQuota:
    """The pool's SimQuota, kept in the store; a store failure is the pool's QuotaError."""

    def __init__(self, quota: PoolQuota) -> None:
        self._quota = quota  # otpd.limits.SimQuota: raises StoreError

    async def wait(self, sim: str, now: float) -> float:
        try:
            return await self._quota.wait(sim, now)
        except StoreError as exc:
            raise QuotaError(str(exc)) from exc

    async def record(self, sim: str, parts: int, now: float) -> float:
        try:
            return await self._quota.record(sim, parts, now)
        except StoreError as exc:
            raise QuotaError(str(exc)) from exc


class StoreEmailQuota:
    """The email channel's provider caps, kept in the store; a store failure is
    the channel's QuotaError."""

    def __init__(self, quota: EmailQuota) -> None:
        self._quota = quota  # raises StoreError

    async def reserve(self, account: str, per_minute: int, per_day: int, now: float) -> float:
        try:
            return await self._quota.reserve(account, per_minute, per_day, now)
        except StoreError as exc:
            raise SmtpQuotaError(str(exc)) from exc

    async def sent_day(self, account: str, now: float) -> int:
        try:
            return await self._quota.sent_day(account, now)
        except StoreError as exc:
            raise SmtpQuotaError(str(exc)) from exc


def build_sms_channel(settings: Settings, store: Store) -> Channel:
    if not settings.sms.modems:
        return NoModems()
    from otpd.channels.sms.pool import ModemPool

    return ModemPool(settings.sms, country_code=settings.otp.country_code,
                     quota=StoreSimQuota(SimQuota(settings.limits, store)),
                     reports=StoreReportStore(store))


class StoreReportStore:
    """The pool's ReportStore: sent parts and delivery states, kept with the
    outbox (the node's SQLite file with either backend); a store failure is the
    pool's ReportStoreError."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def sent(self, parts: Sequence[SentPart]) -> None:
        try:
            await self._store.record_sms_parts([
                SmsPart(p.message_id, p.part, p.parts, p.modem, p.sim, p.reference,
                        p.receiver, p.sent_at) for p in parts])
        except StoreError as exc:
            raise ReportStoreError(str(exc)) from exc

    async def report(self, report: PartReport) -> ReportMatch | None:
        try:
            match = await self._store.apply_sms_report(SmsReport(
                report.sim, report.reference, report.recipient, report.outcome,
                report.status, report.at, report.discharged))
        except StoreError as exc:
            raise ReportStoreError(str(exc)) from exc
        if match is None:
            return None
        return ReportMatch(match.message_id, match.modem, match.sim, Delivery(match.delivery),
                           match.became_final, match.first_sent_at)

    async def expire(self, sent_before: float, now: float) -> list[Unreported]:
        try:
            rows = await self._store.expire_sms_reports(sent_before, now)
        except StoreError as exc:
            raise ReportStoreError(str(exc)) from exc
        return [Unreported(r.message_id, r.modem, r.sim, r.sent_at) for r in rows]

    async def recent(self, since: float) -> list[RecentOutcome]:
        try:
            rows = await self._store.sms_outcomes(since)
        except StoreError as exc:
            raise ReportStoreError(str(exc)) from exc
        return [RecentOutcome(r.modem, r.sim, Delivery(r.delivery), r.at) for r in rows]


async def open_store(s: StoreSettings) -> Store:
    try:
        if s.backend == "redis":
            from otpd.store.redis_state import RedisSharedStore  # only where configured

            return await RedisSharedStore.open(s.path, s.redis_url, s.redis_prefix,
                                               s.expired_grace, s.retention)
        return await SqliteStore.open(s.path)
    except (StoreError, SchemaTooNew, OSError, sqlite3.Error) as exc:
        key = "store.redis_url" if "redis" in str(exc) else "store.path"
        raise StartupError(f"{key}: cannot open the store: {exc}") from exc


def store_key_prefixes(s: StoreSettings) -> tuple[str, ...]:
    """Key prefixes no broker reply may write to: the store's, or with an empty
    prefix each of its key families (the SQLite backend reserves them too, so
    that switching backends never opens a hole)."""
    if s.redis_prefix:
        return (s.redis_prefix,)
    return ("otp:", "id:", "blocklist:", "rate:", "health:", "seen:")


class Daemon:
    def __init__(self, settings: Settings, *, channels: dict[str, Channel] | None = None) -> None:
        self.settings = settings
        self._channels = channels
        self.store: Store | None = None
        self.engine: DeliveryEngine | None = None
        self.service: Service | None = None
        self.rest: RestApi | None = None
        self.users: HtpasswdFile | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.consumers: list[Consumer] = []
        self.metrics: Metrics | None = None
        self.control: ControlServer | None = None
        self.ddns: DdnsUpdater | None = None
        self.intake: EngineIntake | None = None
        self.started = asyncio.Event()

    @property
    def shares_work(self) -> bool:
        """Several nodes on one queue: take work by capacity, hand back what is late."""
        mode = self.settings.delivery.share_work
        return mode == "on" or (mode == "auto" and self.settings.store.backend == "redis")

    async def _hand_over(self, job: Job) -> bool:
        """Publish a held message to the first shared queue that takes it."""
        assert self.engine is not None
        envelope = handover_envelope(job, self.engine.sealer.seal_handover)
        for consumer in self.consumers:
            if consumer.intake is not None and await consumer.republish(envelope):
                return True
        return False

    async def start(self) -> None:
        s = self.settings
        try:
            key = load_or_create_key(s.otp.key_file)
        except (KeyFileError, OSError) as exc:
            raise StartupError(str(exc) if isinstance(exc, KeyFileError)
                               else f"otp.key_file: {s.otp.key_file}: {exc.strerror}") from exc
        self.store = await open_store(s.store)
        channels = self._channels or {
            "sms": build_sms_channel(s, self.store),
            "email": SmtpChannel(s.smtp, s.delivery.email_workers, s.delivery.retry_base,
                                 s.delivery.retry_max,
                                 quota=StoreEmailQuota(EmailQuota(self.store))),
        }
        sealer = Sealer(key)
        if s.metrics.enabled:
            self.metrics = Metrics()
            self.metrics.watch(self.status)
        self.engine = DeliveryEngine(self.store, channels, sealer, metrics=self.metrics,
                                     admission=s.delivery.admission)
        self.intake = EngineIntake(self.engine)
        if self.shares_work:
            self.engine.handover = self._hand_over  # before start: resumed rows are checked
        await self.engine.start()
        self.service = Service(s.otp, s.delivery, Limiter(s.limits, self.store), self.store,
                               self.engine, channels, key, sealer, metrics=self.metrics)
        if s.server.enabled:
            self.users = self._load_users()
            self.rest = RestApi(s.server, self.service, self.users, s.delivery.wait,
                                metrics=self.metrics, health=self,
                                metrics_auth=s.metrics.require_auth,
                                status_board=StatusView(
                                    self.status, self.store,
                                    s.limits.sim_daily_max if s.limits.enabled else 0,
                                    clock=self.service.clock))
            await self.rest.start()
        # Block and unblock go through the service: its rules, clock and logs.
        self.control = ControlServer(s.control.socket, self.service, self.store, self.status)
        await self.control.start()
        # Consumers connect in the background: a broker that is down must not
        # keep the daemon (and its REST API) from starting.
        self.consumers = build_consumers(s.brokers, self.service, s.delivery.wait,
                                         reserved_prefixes=store_key_prefixes(s.store))
        self._start_delivery_events(channels)
        for consumer in self.consumers:
            if self.shares_work:
                consumer.attach(self.intake)
            await consumer.start()
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="purge"))
        await self._apply_ddns(s.ddns)
        self.started.set()

    def _start_delivery_events(self, channels: dict[str, Channel]) -> None:
        """Status events for the brokers with a ``status_topic``: refused at start
        when the topic breaks the reply-topic rules (another broker's command topic,
        the store's key prefix), as a callback topic would be."""
        assert self.store is not None
        for consumer in self.consumers:
            topic = consumer.common.status_topic
            why = consumer.reply_rules.refusal(topic) if topic else None
            if why is not None:
                raise StartupError(f"{consumer.name}.status_topic: {topic!r} {why}")
        events = DeliveryEvents(self.store, self.consumers)
        sms = channels.get("sms")
        if events.wanted and isinstance(sms, ReportsDeliveries):
            sms.on_delivery = events
            self._tasks.append(asyncio.create_task(events.run(), name="delivery-events"))

    async def _apply_ddns(self, new: DdnsSettings | None) -> None:
        """Start, reconfigure (a reload also clears a badauth/nohost/abuse stop)
        or stop the DDNS updater."""
        if new is None or not new.enabled:
            if self.ddns is not None:
                await self.ddns.stop()
                self.ddns = None
        elif self.ddns is not None:
            await self.ddns.reconfigure(new)
        else:
            self.ddns = DdnsUpdater(new)
            await self.ddns.start()

    async def healthy(self) -> bool:
        """systemd watchdog check. Being awaited at all proves the event loop
        runs; then the store must take a write and the delivery engine's tasks
        must be alive (and it must have been able to record its last result)."""
        if self.store is None or self.engine is None:
            return False
        try:
            await within(5.0, self.store.check_writable(local_only=True))
        except (StoreError, TimeoutError):
            return False
        return self.engine.healthy and self.engine.alive()

    def _load_users(self) -> HtpasswdFile | None:
        path = self.settings.server.users_file
        if not path.exists():
            log.error("server.users_file: %s does not exist; every REST request will get 401"
                      " (create a user with: otpd passwd USER)", path)
            return None
        try:
            users = HtpasswdFile.load(path, accept=SALTED_SCHEMES)
        except HtpasswdError as exc:
            log.error("server.users_file: %s", exc)
            return None
        for user in users.weak_entries:
            log.warning("server.users_file: user %r has a plaintext or unsalted ({SHA}) hash and"
                        " is refused; reset it with: otpd passwd %s", user, user)
        return users

    async def stop(self) -> None:
        """Stop in a bounded time whatever the clocks did: each step is limited
        (``otpd.aio.bounded``) and logs what it still waits for after a second."""
        if self.ddns is not None:
            await bounded(self.ddns.stop(), "dynamic DNS", log)
        if self.engine is not None:
            self.engine.release_waiters()  # answer 1111 now instead of after delivery.wait
        # Consumers first: in-flight commands still need the service and store.
        # Each is bounded itself (STOP_GRACE for in-flight commands, then cancelled).
        await bounded(asyncio.gather(*(c.stop() for c in self.consumers),
                                     return_exceptions=True),
                      "the broker consumers", log, bound=STOP_GRACE + 3 * STOP_BOUND)
        self.consumers = []
        await cancel_and_wait(self._tasks, "background tasks", log)
        if self.control is not None:
            await bounded(self.control.stop(), "the control socket", log)
        if self.rest is not None:
            await bounded(self.rest.stop(), "the REST API", log)
        if self.engine is not None:
            await bounded(self.engine.stop(), "the delivery engine", log, bound=2 * STOP_BOUND)
        if self.store is not None:
            await bounded(self.store.close(), "the store", log)

    async def _purge_loop(self) -> None:
        assert self.store is not None
        s = self.settings.store
        while True:
            await asyncio.sleep(s.purge_interval)
            now = self.service.clock() if self.service is not None else time.time()
            try:
                otps, msgs = await self.store.purge(now - s.expired_grace, now - s.retention)
            except StoreError as exc:
                log.error("purge failed: %s", exc)
                continue
            if otps or msgs:
                log.info("purged %d expired OTP(s) and %d old message(s)", otps, msgs)

    def status(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return {
            "pending": self.engine.pending_count(),
            "pending_by_channel": {n: len(q.jobs) for n, q in self.engine.queues.items()},
            "oldest_pending_age": self.engine.oldest_pending_age(),
            "uncertain_resends": self.engine.uncertain_resends,
            "channels": {name: q.channel.status() for name, q in self.engine.queues.items()},
            "brokers": [c.status() for c in self.consumers],
            "intake": (self.intake.status() if self.intake is not None and self.shares_work
                       else None),
            "ddns": self.ddns.status() if self.ddns is not None else None,
        }

    def summary(self) -> list[str]:
        """The service status in a few parts (systemd's STATUS= line), e.g.
        ``2/3 modems ready``, ``smtp 1/1 ok``, ``amqp connected``, ``4 pending``.
        Each channel says how it is; nothing here knows a modem state."""
        if self.engine is None:
            return []
        parts: list[str] = []
        queues = self.engine.queues
        for name in sorted(queues, key=lambda n: (n != "sms", n != "email", n)):
            channel = queues[name].channel
            text = channel.summary() if isinstance(channel, Summarised) else ""
            if text:
                parts.append(text)
        for consumer in self.consumers:
            parts.append(f"{consumer.name} {'connected' if consumer.connected else 'down'}")
        ddns_state = self.ddns.status().get("state") if self.ddns is not None else None
        if ddns_state:
            parts.append(f"ddns {ddns_state}")
        parts.append(f"{self.engine.pending_count()} pending")
        return parts

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: the store takes writes and at least one channel can send."""
        assert self.store is not None and self.engine is not None
        try:
            await within(2.0, self.store.check_writable())
            store_ok = True
        except (StoreError, TimeoutError):
            store_ok = False
        usable = {n: q.channel.usable() for n, q in self.engine.queues.items()
                  if q.channel.configured()}
        ok = store_ok and any(usable.values())
        return ok, {"store_writable": store_ok, "channels_usable": usable}

    def reload(self) -> None:
        """SIGHUP: users file, TLS certificate and log level, without dropping work."""
        if self.users is not None:
            try:
                self.users.reload()
            except HtpasswdError as exc:
                log.error("reload: keeping the previous users: %s", exc)
        elif self.rest is not None:
            self.users = self._load_users()
            self.rest.users = self.users
        if self.rest is not None:
            try:
                self.rest.reload_tls()
            except (OSError, ssl.SSLError) as exc:
                log.error("reload: keeping the previous TLS certificate: %s", exc)
        source = self.settings.source
        if source is not None:
            try:
                fresh = load_settings(source)
            except ConfigError as exc:
                log.error("reload: %s is not valid, log level and ddns unchanged: %s",
                          source, exc)
            else:
                logging.getLogger().setLevel(fresh.log.level.upper())
                task = asyncio.get_running_loop().create_task(self._apply_ddns(fresh.ddns),
                                                              name="ddns-reload")
                self._tasks = [t for t in self._tasks if not t.done()] + [task]
        log.info("reloaded users, TLS certificate, log level and ddns")


async def run_until_signalled(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reporter = sdnotify.StatusReporter(lambda: sdnotify.status_line(daemon.summary()))
    watchdog = sdnotify.Watchdog(daemon.healthy)

    def on_hup() -> None:
        sdnotify.reloading()
        daemon.reload()
        sdnotify.ready()
        reporter.report()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        try:
            await daemon.start()
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            sdnotify.status(f"cannot start: {exc}")
            raise
        # Store open, listeners bound; modems and brokers come up in the background.
        sdnotify.ready()
        await reporter.start()  # STATUS= now, then on every change (checked every 10 s)
        await watchdog.start()
        log.info("otpd ready")
        await stop.wait()
        log.info("stopping")
        sdnotify.stopping()
    finally:
        await reporter.stop()
        await watchdog.stop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await daemon.stop()
