"""Prometheus metrics (prometheus-client) for one daemon.

Event counters are incremented where things happen (REST, service); the
state of modems, consumers and the outbox is read at scrape time by a
collector, so nothing polls in the background.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from otpd.settings_reader import Section


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool
    require_auth: bool  # /metrics behind the REST users file (healthz/readyz never are)


def parse_metrics_settings(s: Section) -> MetricsSettings:
    out = MetricsSettings(enabled=s.bool("enabled", True),
                          require_auth=s.bool("require_auth", True))
    s.finish()
    return out

# "filtered": up but out of rotation (the network seems to filter its SIM);
# "flagged": looks filtered but keeps sending (no other SIM can take over).
_MODEM_STATES = ("starting", "ready", "busy", "down", "failed", "disabled", "filtered",
                 "flagged")
_SIM_HEALTH = ("ok", "flagged", "filtered", "probing")


class StateCollector(Collector):
    """Modems, consumers and the outbox, read from the running daemon."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        depth = GaugeMetricFamily("otpd_outbox_pending", "Messages waiting to be sent",
                                  labels=["channel"])
        for channel, n in st.get("pending_by_channel", {}).items():
            depth.add_metric([channel], n)
        yield depth
        yield GaugeMetricFamily("otpd_outbox_oldest_pending_seconds",
                                "Age of the oldest pending message",
                                value=st.get("oldest_pending_age", 0.0))
        modems = st.get("channels", {}).get("sms", {}).get("modems", [])
        up = GaugeMetricFamily("otpd_modem_up", "1 if the modem can send now", labels=["modem"])
        state = GaugeMetricFamily("otpd_modem_state", "Modem state (1 for the current one)",
                                  labels=["modem", "state"])
        signal = GaugeMetricFamily("otpd_modem_signal_dbm", "Received signal strength",
                                   labels=["modem"])
        sent = GaugeMetricFamily("otpd_modem_sent", "SMS sent by the modem since start",
                                 labels=["modem"])
        failed = GaugeMetricFamily("otpd_modem_failed", "SMS failures on the modem since start",
                                   labels=["modem"])
        for m in modems:
            name = str(m.get("name", "?"))
            current = m.get("state", "")
            up.add_metric([name], 1.0 if current in ("ready", "busy", "flagged") else 0.0)
            for s in _MODEM_STATES:
                state.add_metric([name, s], 1.0 if s == current else 0.0)
            dbm = (m.get("signal") or {}).get("rssi_dbm")
            if isinstance(dbm, int | float):
                signal.add_metric([name], float(dbm))
            sent.add_metric([name], float(m.get("sent", 0)))
            failed.add_metric([name], float(m.get("failed", 0)))
        yield from (up, state, signal, sent, failed)
        yield from _delivery_metrics(st.get("channels", {}).get("sms", {}))
        yield from _smtp_metrics(st.get("channels", {}).get("email", {}).get("accounts", []))
        connected = GaugeMetricFamily("otpd_consumer_connected", "1 if connected to its broker",
                                      labels=["consumer"])
        received = GaugeMetricFamily("otpd_consumer_received", "Commands received since start",
                                     labels=["consumer"])
        taking = GaugeMetricFamily("otpd_consumer_taking",
                                   "1 if the consumer takes work now (see otpd status: why not)",
                                   labels=["consumer"])
        for c in st.get("brokers", []):
            connected.add_metric([c["name"]], 1.0 if c.get("connected") else 0.0)
            received.add_metric([c["name"]], float(c.get("received", 0)))
            taking.add_metric([c["name"]], 1.0 if c.get("taking") else 0.0)
        yield from (connected, received, taking)
        yield from _intake_metrics((st.get("intake") or {}).get("channels", {}))


def _smtp_metrics(accounts: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per SMTP account: its sessions, sends against the daily cap, rests."""
    sessions = GaugeMetricFamily("otpd_smtp_sessions", "SMTP sessions open, by state",
                                 labels=["account", "state"])
    max_sessions = GaugeMetricFamily("otpd_smtp_sessions_max", "SMTP sessions allowed at once",
                                     labels=["account"])
    resting = GaugeMetricFamily("otpd_smtp_resting_seconds",
                                "Seconds the account still rests (0: it sends)",
                                labels=["account"])
    rests = CounterMetricFamily("otpd_smtp_rests", "Times the account was put to rest",
                                labels=["account"])
    sent = CounterMetricFamily("otpd_smtp_sent", "Messages handed off since start",
                               labels=["account"])
    connections = CounterMetricFamily("otpd_smtp_connections", "SMTP sessions opened",
                                      labels=["account"])
    sent_day = GaugeMetricFamily("otpd_smtp_sent_day",
                                 "Messages in the last 24 h, every node (with a daily cap)",
                                 labels=["account"])
    cap_day = GaugeMetricFamily("otpd_smtp_max_per_day", "The account's daily cap (0: none)",
                                labels=["account"])
    for a in accounts:
        name = str(a.get("name", "?"))
        s = a.get("sessions") or {}
        sessions.add_metric([name, "busy"], float(s.get("busy", 0)))
        sessions.add_metric([name, "idle"], float(s.get("idle", 0)))
        max_sessions.add_metric([name], float(s.get("max", 0)))
        resting.add_metric([name], float(a.get("rest_left", 0.0)))
        rests.add_metric([name], float(a.get("rests", 0)))
        sent.add_metric([name], float(a.get("sent", 0)))
        connections.add_metric([name], float(a.get("connections", 0)))
        if a.get("sent_day") is not None:
            sent_day.add_metric([name], float(a["sent_day"]))
        cap_day.add_metric([name], float(a.get("max_per_day", 0)))
    yield from (sessions, max_sessions, resting, rests, sent, connections, sent_day, cap_day)


def _intake_metrics(channels: dict[str, Any]) -> Iterator[Metric]:
    """Several nodes on one queue: this node's free capacity and local backlog."""
    families = {
        "free": GaugeMetricFamily("otpd_intake_free_senders",
                                  "Senders ready and idle now", labels=["channel"]),
        "ready": GaugeMetricFamily("otpd_intake_ready_senders",
                                   "Senders that can send (modems up, under cap)",
                                   labels=["channel"]),
        "backlog": GaugeMetricFamily("otpd_intake_backlog",
                                     "Messages this node holds to send", labels=["channel"]),
        "target": GaugeMetricFamily("otpd_intake_target",
                                    "Messages this node may hold (its sending horizon)",
                                    labels=["channel"]),
        "room": GaugeMetricFamily("otpd_intake_room",
                                  "Messages this node may take now", labels=["channel"]),
        "handed_over": GaugeMetricFamily("otpd_intake_handed_over",
                                         "Held messages handed back to the shared queue",
                                         labels=["channel"]),
    }
    for name, c in channels.items():
        for key, family in families.items():
            family.add_metric([name], float(c.get(key, 0)))
    yield from families.values()


def _delivery_metrics(sms: dict[str, Any]) -> Iterator[Metric]:
    """SMS delivery reports, from the pool's running totals and per-SIM window."""
    reports = CounterMetricFamily("otpd_sms_reports", "SMS status reports by TP-ST class"
                                  " (delivered, trying, failed, gave_up)",
                                  labels=["modem", "sim", "status"])
    for r in sms.get("reports", []):
        reports.add_metric([r["modem"], r["sim"], r["status"]], float(r["count"]))
    deliveries = CounterMetricFamily(
        "otpd_sms_deliveries", "Sent SMS by final delivery state (delivered, undeliverable,"
        " unknown = no report in time)", labels=["modem", "sim", "delivery"])
    for d in sms.get("deliveries", []):
        deliveries.add_metric([d["modem"], d["sim"], d["delivery"]], float(d["count"]))
    unmatched = CounterMetricFamily("otpd_sms_reports_unmatched",
                                    "Status reports that matched no sent part",
                                    value=float(sms.get("reports_unmatched", 0)))
    seconds = HistogramMetricFamily(
        "otpd_sms_time_to_deliver_seconds", "From hand-off to the last part's delivery report",
        labels=["modem", "sim"])
    for h in sms.get("time_to_deliver", []):
        seconds.add_metric([h["modem"], h["sim"]], [(le, float(n)) for le, n in h["buckets"]],
                           float(h["sum"]))
    ratio = GaugeMetricFamily("otpd_sim_delivered_ratio", "Delivered share of the SIM's"
                              " messages that became final in the recent window",
                              labels=["sim"])
    recent = GaugeMetricFamily("otpd_sim_recent_deliveries", "Messages of the SIM that became"
                               " final in the recent window, by state", labels=["sim", "delivery"])
    for sim, counts in sms.get("sims", {}).items():
        if counts.get("delivered_ratio") is not None:
            ratio.add_metric([sim], float(counts["delivered_ratio"]))
        for state in ("delivered", "undeliverable", "unknown"):
            recent.add_metric([sim, state], float(counts.get(state, 0)))
    yield from (reports, deliveries, unmatched, seconds, ratio, recent)
    health = GaugeMetricFamily("otpd_sim_health", "The SIM's standing by its delivery record"
                               " (1 for the current one: ok, flagged, filtered, probing)",
                               labels=["sim", "state"])
    filtered = CounterMetricFamily("otpd_sim_filtered", "Times the SIM was taken out of"
                                   " rotation or flagged as filtered, since start",
                                   labels=["sim"])
    for sim, h in sms.get("sim_health", {}).items():
        for state in _SIM_HEALTH:
            health.add_metric([sim, state], 1.0 if h.get("state") == state else 0.0)
        filtered.add_metric([sim], float(h.get("filtered_count", 0)))
    yield from (health, filtered)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("otpd_rest_requests", "REST requests by HTTP status and code",
                                ["status", "code"], registry=self.registry)
        self.latency = Histogram(
            "otpd_rest_request_seconds", "REST request latency", ["command"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
        self.commands = Counter("otpd_commands", "Commands by transport, command and code",
                                ["transport", "command", "code"], registry=self.registry)
        self.otp = Counter("otpd_otp_events", "OTPs created, verified, failed, burned, expired",
                           ["event"], registry=self.registry)
        self.delivery = Histogram(
            "otpd_delivery_seconds", "Time from acceptance to hand-off, by channel",
            ["channel"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry)

    def watch(self, status: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(StateCollector(status))
