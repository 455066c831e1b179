"""The status page's chart: SMS sent and delivered, and email sent, per hour, as
inline SVG (pure: no I/O, no script, no external resource). Only SMS have
delivery reports, so only SMS are set against their deliveries.

Each hour is one ``<g class="hour">`` carrying its numbers in ``data-*``
attributes and a ``<title>`` (the browser's tooltip), so a test or a reader of
the page's source sees the same counts as the bars.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

HOUR = 3600
WIDTH, HEIGHT = 720, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 40, 10, 16, 28  # margins for the axis labels
SENT_COLOUR, DELIVERED_COLOUR, EMAIL_COLOUR = "#5b8def", "#2e9e5b", "#b9a3e3"


@dataclass(frozen=True)
class HourBar:
    hour: int  # epoch s of the hour's start
    sent: int  # SMS
    delivered: int  # SMS
    email: int = 0  # email sent


def hours(activity: Sequence[dict[str, object]], now: float, count: int = 24) -> list[HourBar]:
    """``count`` hours ending with the current one, from ``hourly_activity`` rows
    (``hour``, ``channel``, ``sent``, ``delivered``; rows of one hour are added up)."""
    last = int(now // HOUR) * HOUR
    first = last - (count - 1) * HOUR
    sent = dict.fromkeys(range(first, last + 1, HOUR), 0)
    delivered, email = dict(sent), dict(sent)
    for row in activity:
        hour = _int(row.get("hour"))
        if hour not in sent:
            continue
        if row.get("channel") == "sms":
            sent[hour] += _int(row.get("sent"))
            delivered[hour] += _int(row.get("delivered"))
        elif row.get("channel") == "email":
            email[hour] += _int(row.get("sent"))
    return [HourBar(h, sent[h], delivered[h], email[h]) for h in sent]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _label(hour: int) -> str:
    return time.strftime("%H:00", time.localtime(hour))


def _scale_top(peak: int) -> int:
    """A round number at or above ``peak`` for the y axis (at least 1)."""
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if peak <= step * 4:
            return step * 4
    return peak


def render_chart(bars: Sequence[HourBar]) -> str:
    """An ``<svg>`` element: per hour a sent bar and a delivered bar side by side."""
    top = _scale_top(max((max(b.sent, b.delivered, b.email) for b in bars), default=0))
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(bars), 1)
    bar_w = max(slot * 0.28, 1.0)
    total_sent = sum(b.sent for b in bars)
    total_delivered = sum(b.delivered for b in bars)
    total_email = sum(b.email for b in bars)
    summary = (f"Messages per hour over the last {len(bars)} hours: {total_sent} SMS sent,"
               f" {total_delivered} SMS delivered, {total_email} email sent")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img"'
           f' viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"'
           f' data-sent="{total_sent}" data-delivered="{total_delivered}"'
           f' data-email="{total_email}"'
           f' aria-label="{escape(summary)}">',
           f"<title>{escape(summary)}</title>"]
    # Horizontal grid lines with their values: 0, a quarter, ... the top.
    for i in range(5):
        value = top * i // 4
        y = _TOP + plot_h - plot_h * i / 4
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{WIDTH - _RIGHT}" y2="{y:.1f}"'
                   f' stroke="#ddd" stroke-width="1"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11"'
                   f' fill="#555">{value}</text>')
    for i, bar in enumerate(bars):
        x = _LEFT + i * slot + (slot - 3 * bar_w) / 2
        label = _label(bar.hour)
        out.append(f'<g class="hour" data-hour="{bar.hour}" data-sent="{bar.sent}"'
                   f' data-delivered="{bar.delivered}" data-email="{bar.email}">')
        out.append(f"<title>{escape(label)}: {bar.sent} SMS sent, {bar.delivered} delivered;"
                   f" {bar.email} email sent</title>")
        for offset, value, colour, kind in ((0.0, bar.sent, SENT_COLOUR, "sent"),
                                            (bar_w, bar.delivered, DELIVERED_COLOUR,
                                             "delivered"),
                                            (2 * bar_w, bar.email, EMAIL_COLOUR, "email")):
            h = plot_h * value / top
            out.append(f'<rect class="{kind}" x="{x + offset:.1f}" y="{_TOP + plot_h - h:.1f}"'
                       f' width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}"/>')
        out.append("</g>")
        if i % 3 == 0:
            out.append(f'<text x="{_LEFT + i * slot + slot / 2:.1f}" y="{HEIGHT - 10}"'
                       f' text-anchor="middle" font-size="11" fill="#555">'
                       f"{escape(label)}</text>")
    out.append("</svg>")
    return "".join(out)
