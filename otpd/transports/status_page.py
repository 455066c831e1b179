"""The operator's status page, rendered from a status snapshot (pure: no I/O).

One self-contained HTML document: its one stylesheet inline and allowed by its
hash in the Content-Security-Policy, the chart inline SVG, no script, no
external resource. Every value from the daemon (modem names, operators, error
texts, broker names...) goes through :func:`e` (``html.escape``), attributes
included. Receivers arrive masked (``otpd.msisdn.mask``); modem and SIM
identities (IMSI, IMEI, port) are never shown.

The snapshot is a dict (the transports layer never imports the store):
``now``, ``status`` (``Daemon.status()``), ``activity`` (the store's
``hourly_activity`` rows as dicts), ``failures`` (recent failed or expired
outbox rows, receivers masked), ``counts`` (the store's), ``sim_daily_max``
(parts per SIM per day, 0 = no cap) and ``error`` (the store could not be read).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from otpd.transports.status_chart import hours, render_chart

STATUS_PATH = "/status"
REFRESH_SECONDS = 10

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:middle}
th{background:#f0f0f0;font-weight:600}td.n{text-align:right}
.meta{color:#666}.ok{color:#1b7a3d}.bad{color:#b3261e}.warn{color:#8a5a00}
.notice{background:#e6f4ea;border:1px solid #1b7a3d;padding:.4em .8em;display:inline-block}
.error{background:#fce8e6;border:1px solid #b3261e;padding:.4em .8em;display:inline-block}
.legend span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:-.1em}
.legend .sent{background:#5b8def}.legend .delivered{background:#2e9e5b}
.legend .email{background:#b9a3e3}
form{display:inline-block;margin:0 2em .5em 0}input[type=text]{width:17em}
svg.bars{vertical-align:middle;margin-right:.4em}
""".strip()
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()

# The page loads nothing but itself; forms post only to it; no frame may hold it.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Referrer-Policy same-origin, not no-referrer: with no-referrer Chromium sends
# "Origin: null" on the page's own form posts, which would defeat the Origin
# check; same-origin still sends nothing at all to another site.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

# What the page says after a block or unblock (a fixed text per outcome: nothing
# from the request is reflected through the redirect's query string).
NOTICES: Mapping[str, str] = {
    "blocked": "Receiver blocked.",
    "unblocked": "Receiver unblocked.",
    "not-blocked": "That receiver was not blocked; nothing changed.",
}


def e(value: object) -> str:
    """Escaped for HTML text and quoted attributes."""
    return escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True)
class Viewer:
    """Who looks at the page and what they may do there."""

    user: str
    token: str  # CSRF token for this user's forms
    can_block: bool
    can_unblock: bool
    refresh: bool = True  # False: the operator paused the auto-refresh


def signal_bars(signal: Mapping[str, Any] | None) -> int:
    """0 to 4 bars from the modem's CSQ (99 or missing: unknown, 0 bars)."""
    csq = (signal or {}).get("csq")
    if not isinstance(csq, int) or isinstance(csq, bool) or csq < 0 or csq > 31:
        return 0
    return 1 if csq < 10 else 2 if csq < 15 else 3 if csq < 20 else 4


def _bars_svg(count: int) -> str:
    rects = "".join(
        f'<rect x="{i * 5}" y="{12 - 3 * (i + 1)}" width="4" height="{3 * (i + 1)}"'
        f' fill="{"#1b7a3d" if i < count else "#ccc"}"/>' for i in range(4))
    return (f'<svg class="bars" xmlns="http://www.w3.org/2000/svg" width="20" height="12"'
            f' viewBox="0 0 20 12" role="img" aria-label="{count} of 4 bars"'
            f' data-bars="{count}">{rects}</svg>')


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _when(at: object) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _num(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _state_class(state: str) -> str:
    if state in ("ready", "busy"):
        return "ok"
    return "bad" if state in ("down", "failed") else "warn"


def _per_sender(activity: Sequence[Mapping[str, Any]], channel: str
                ) -> dict[str, tuple[int, int]]:
    """Sent and delivered in the snapshot's activity per sender of ``channel``."""
    out: dict[str, tuple[int, int]] = {}
    for row in activity:
        if row.get("channel") != channel:
            continue
        via = str(row.get("via") or "")
        sent, delivered = out.get(via, (0, 0))
        out[via] = (sent + _num(row.get("sent")), delivered + _num(row.get("delivered")))
    return out


def _modems(snapshot: Mapping[str, Any]) -> str:
    sms = snapshot.get("status", {}).get("channels", {}).get("sms", {})
    modems = sms.get("modems", [])
    if not modems:
        return "<p class=\"meta\">No modem configured.</p>"
    day = _per_sender(snapshot.get("activity", []), "sms")
    cap = _num(snapshot.get("sim_daily_max"))
    window = sms.get("delivery_window")
    window_h = window / 3600 if isinstance(window, int | float) and window > 0 else 0
    rows = []
    for m in modems:
        name = str(m.get("name", "?"))
        state = str(m.get("state", ""))
        signal = m.get("signal") or {}
        bars = signal_bars(signal)
        dbm = signal.get("rssi_dbm")
        signal_text = (f"{dbm} dBm" if isinstance(dbm, int | float) else "unknown")
        if signal.get("condition"):
            signal_text += f", {signal['condition']}"
        sent_day, delivered_day = day.get(name, (0, 0))
        cap_text = f" of {cap}" if cap else " (no cap)"
        delivery = m.get("delivery") or {}
        total = _num(delivery.get("total"))
        ratio = delivery.get("delivered_ratio")
        recent = (f"{_num(delivery.get('delivered'))} of {total}"
                  + (f" ({ratio * 100:.0f} %)" if isinstance(ratio, int | float) else "")
                  + (f", {_num(delivery.get('undeliverable'))} undeliverable,"
                     f" {_num(delivery.get('unknown'))} unknown" if total else ""))
        rows.append(
            f'<tr class="modem" data-name="{e(name)}" data-state="{e(state)}"'
            f' data-sent-day="{sent_day}" data-delivered-day="{delivered_day}">'
            f"<td>{e(name)}</td>"
            f'<td class="state {_state_class(state)}">{e(state)}</td>'
            f'<td class="signal">{_bars_svg(bars)}{e(signal_text)}</td>'
            f'<td class="operator">{e(m.get("operator") or "-")}</td>'
            f'<td class="n sent-day">{sent_day}{e(cap_text)}</td>'
            f'<td class="n delivered-day">{delivered_day}</td>'
            f'<td class="n recent">{e(recent)}</td>'
            f'<td class="n sent">{_num(m.get("sent"))}</td>'
            f'<td class="n failed">{_num(m.get("failed"))}</td>'
            f'<td class="last-error">{e(m.get("last_error") or "-")}</td>'
            "</tr>")
    span = f"last {window_h:g} h" if window_h else "recent"
    return ('<table id="modems"><thead><tr><th>Modem</th><th>State</th><th>Signal</th>'
            "<th>Operator</th><th>Sent 24 h (SIM cap, parts)</th><th>Delivered 24 h</th>"
            f"<th>Delivered ({e(span)})</th><th>Sent since start</th>"
            "<th>Failed since start</th><th>Last error</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _email(snapshot: Mapping[str, Any]) -> str:
    accounts = (snapshot.get("status", {}).get("channels", {}).get("email", {})
                .get("accounts", []))
    if not accounts:
        return ""
    rows = []
    day_sent = _per_sender(snapshot.get("activity", []), "email")
    for a in accounts:
        healthy = bool(a.get("healthy"))
        state = "ok" if healthy else f"resting: {a.get('rest_reason') or '?'}"
        limit = a.get("max_per_day")
        # The provider cap's own count when it keeps one, else this node's outbox.
        sent_day = a.get("sent_day")
        if not isinstance(sent_day, int):
            sent_day = day_sent.get(str(a.get("name") or ""), (0, 0))[0]
        day = f"{sent_day}" + (f" of {_num(limit)}" if limit else "")
        rows.append(f'<tr class="account" data-name="{e(a.get("name"))}">'
                    f"<td>{e(a.get('name'))}</td>"
                    f'<td class="{"ok" if healthy else "warn"}">{e(state)}</td>'
                    f'<td class="n">{e(day)}</td>'
                    f"<td>{e(a.get('last_error') or '-')}</td></tr>")
    return ('<h2>Email accounts</h2><table id="email"><thead><tr><th>Account</th>'
            "<th>State</th><th>Sent 24 h</th><th>Last error</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _consumers(snapshot: Mapping[str, Any]) -> str:
    brokers = snapshot.get("status", {}).get("brokers", [])
    if not brokers:
        return '<p class="meta">No broker consumer configured.</p>'
    rows = []
    for b in brokers:
        connected = bool(b.get("connected"))
        taking = bool(b.get("taking"))
        why = "" if taking else f" ({b.get('not_taking') or 'no'})"
        rows.append(
            f'<tr class="consumer" data-name="{e(b.get("name"))}"'
            f' data-connected="{str(connected).lower()}" data-taking="{str(taking).lower()}">'
            f"<td>{e(b.get('name'))}</td>"
            f'<td class="{"ok" if connected else "bad"}">{"yes" if connected else "no"}</td>'
            f'<td class="{"ok" if taking else "warn"}">{"yes" if taking else "no"}{e(why)}</td>'
            f'<td class="n">{_num(b.get("received"))}</td>'
            f'<td class="n">{_num(b.get("errors"))}</td>'
            f"<td>{e(b.get('last_error') or '-')}</td></tr>")
    return ('<table id="consumers"><thead><tr><th>Consumer</th><th>Connected</th>'
            "<th>Taking work</th><th>Received</th><th>Errors</th><th>Last error</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>")


def _outbox(snapshot: Mapping[str, Any]) -> str:
    status = snapshot.get("status", {})
    by_channel = status.get("pending_by_channel", {}) or {}
    counts = snapshot.get("counts", {}) or {}
    channels = ", ".join(f"{e(k)} {_num(v)}" for k, v in sorted(by_channel.items()))
    summary = (f'<p id="outbox" data-pending="{_num(status.get("pending"))}">'
               f"Pending: <b>{_num(status.get('pending'))}</b>"
               + (f" ({channels})" if channels else "")
               + f"; oldest pending: {e(_age(status.get('oldest_pending_age')))}"
               + f"; kept in the outbox: {_num(counts.get('outbox_sent'))} sent,"
               f" {_num(counts.get('outbox_failed'))} failed,"
               f" {_num(counts.get('outbox_expired'))} expired;"
               f" {_num(counts.get('blocked'))} receiver(s) blocked.</p>")
    failures = snapshot.get("failures", [])
    if not failures:
        return summary + '<p class="meta">No recent failures.</p>'
    rows = []
    for f in failures:
        rows.append(
            f'<tr class="failure" data-id="{_num(f.get("id"))}">'
            f"<td>{_num(f.get('id'))}</td><td>{e(_when(f.get('created_at')))}</td>"
            f"<td>{e(f.get('channel'))}</td><td class=\"receiver\">{e(f.get('receiver'))}</td>"
            f"<td>{e(f.get('state'))}</td><td>{e(f.get('code') or '-')}</td>"
            f"<td>{e(f.get('reason') or '-')}</td><td>{e(f.get('via') or '-')}</td>"
            f'<td class="n">{_num(f.get("attempts"))}</td></tr>')
    return (summary + '<table id="failures"><thead><tr><th>Id</th><th>Created</th>'
            "<th>Channel</th><th>Receiver</th><th>State</th><th>Code</th><th>Reason</th>"
            "<th>Via</th><th>Attempts</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _forms(viewer: Viewer) -> str:
    if not (viewer.can_block or viewer.can_unblock):
        return ""
    out = ["<h2>Block list</h2>"]
    for action, allowed, label in (("block", viewer.can_block, "Block"),
                                   ("unblock", viewer.can_unblock, "Unblock")):
        if not allowed:
            continue
        out.append(
            f'<form method="post" action="{STATUS_PATH}" id="{action}-form">'
            f'<input type="hidden" name="csrf" value="{e(viewer.token)}">'
            # "op", not "action": an input named "action" would shadow form.action.
            f'<input type="hidden" name="op" value="{action}">'
            f'<label>{label} <input type="text" name="receiver" required maxlength="320"'
            f' autocomplete="off" placeholder="+62812... or name@example.org"></label> '
            f'<button type="submit">{label}</button></form>')
    return "".join(out)


def render_page(snapshot: Mapping[str, Any], viewer: Viewer, *, notice: str = "",
                error: str = "") -> str:
    """The whole HTML document."""
    now = snapshot.get("now")
    now_f = float(now) if isinstance(now, int | float) else time.time()
    refresh = (f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}; url={STATUS_PATH}">'
               if viewer.refresh else "")
    toggle = (f'<a href="{STATUS_PATH}?refresh=off">pause auto-refresh</a>' if viewer.refresh
              else f'<a href="{STATUS_PATH}">resume auto-refresh</a>')
    messages = ""
    if notice:
        messages += f'<p class="notice" id="notice">{e(notice)}</p>'
    if error:
        messages += f'<p class="error" id="error">{e(error)}</p>'
    if snapshot.get("error"):
        messages += f'<p class="error">Store: {e(snapshot["error"])}</p>'
    chart = render_chart(hours(snapshot.get("activity", []), now_f))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<title>otpd status</title><style>{STYLE}</style></head><body>"
        f"<h1>otpd status</h1>"
        f'<p class="meta">{e(_when(now_f))} &middot; signed in as {e(viewer.user)}'
        + (f" &middot; refreshes every {REFRESH_SECONDS} s" if viewer.refresh else "")
        + f" &middot; {toggle}</p>"
        + messages
        + "<h2>Modems</h2>" + _modems(snapshot)
        + _email(snapshot)
        + "<h2>Sent and delivered, last 24 hours</h2>"
        + '<p class="legend"><span class="sent"></span>SMS sent'
          '<span class="delivered"></span>SMS delivered (delivery reports)'
          '<span class="email"></span>email sent</p>'
        + chart
        + "<h2>Outbox</h2>" + _outbox(snapshot)
        + "<h2>Consumers</h2>" + _consumers(snapshot)
        + _forms(viewer)
        + "</body></html>\n"
    )


def render_refusal(title: str, detail: str) -> str:
    """A small page for 400/403 answers (same headers, no data)."""
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"
            f'<h1>{e(title)}</h1><p class="error">{e(detail)}</p>'
            f'<p><a href="{STATUS_PATH}">Back to the status page</a></p></body></html>\n')
