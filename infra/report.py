"""``borderflow report``: one self-contained HTML file with charts, for a stack without Grafana.

The report reads the ClickHouse database (``BORDERFLOW_CLICKHOUSE_*``) and draws every chart as
inline SVG generated here: no JavaScript, no stylesheet, font or image from the network, so the
file opens anywhere, also offline, and can be mailed or archived as it is.

Sections: throughput (events per minute per topic), fraud (payments, alerts, alert rate, labels,
alert precision), logistics (on-time rate and transit days per route and carrier, customs hours,
delivery-time prediction error), recommendations (hit rate@5/@20 and MRR@20 over time),
segments (revenue per RFM segment) and models (the latest ``borderflow eval fraud`` run per day).

Each chart is an ``<svg class="chart" data-chart="ID" data-points="N" data-colours="...">``; a
chart whose query returns nothing is drawn as a "no data yet" placeholder (``class="chart
empty"``, ``data-points="0"``). The SQL runs on ClickHouse 18.16 and 24+ (no window functions,
no ``WITH`` subqueries, no DateTime64).

Time series are bucketed so that a chart has at most a few hundred points: per minute for an
hour of data, per hour for days, per day for weeks. Without ``--hours``/``--from``/``--to`` the
report covers everything in the database; ``--hours N`` means the last N hours of *event time*
up to the newest event (event time is simulated or replayed, so it is not the wall clock).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from schemas.config import Settings
from schemas.errors import BorderflowError

#: ``query(name, sql)`` -> rows. ``name`` identifies the chart (unit tests fake it by name).
Query = Callable[[str, str], list[tuple[Any, ...]]]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
EMPTY_FILL = "#f3f4f6"
GRID = "#e5e7eb"
AXIS = "#6b7280"
TEXT = "#111827"

WIDTH = 640
LINE_HEIGHT = 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 36, 58, 48
MAX_BARS = 12
MINUTE, HOUR, DAY = 60, 3600, 86400
BUCKETS = (MINUTE, 5 * MINUTE, 15 * MINUTE, HOUR, 6 * HOUR, DAY, 7 * DAY)
TICK_STEPS = (
    MINUTE, 5 * MINUTE, 15 * MINUTE, 30 * MINUTE, HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR,
    DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY, 91 * DAY, 365 * DAY,
)  # fmt: skip

Format = Callable[[float], str]


# ------------------------------------------------------------------------------------------
# Chart builders (pure: data in, SVG text out)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (x, y); x is epoch seconds on a time axis."""

    name: str
    points: Sequence[tuple[float, float]]
    colour: str


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt_number(value: float) -> str:
    """Compact tick/value label: 1.2k, 3.4M, 0.25, 12."""
    magnitude = abs(value)
    if magnitude >= 1e9:
        return f"{value / 1e9:.3g}G"
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.3g}k"
    if magnitude == 0 or magnitude >= 1:
        return f"{value:,.4g}" if magnitude < 1000 else f"{value:,.0f}"
    return f"{value:.2g}"


def fmt_percent(value: float) -> str:
    return f"{value * 100:.3g}%"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) covering [low, high]; the last one >= high."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("ticks need finite bounds")
    if high < low:
        low, high = high, low
    if high == low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    start = math.floor(low / step + 1e-9) * step
    ticks = []
    value = start
    while value < high - step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    ticks.append(round(value, 12))
    return ticks


def time_ticks(start: float, end: float, max_ticks: int = 6) -> tuple[list[float], str]:
    """Tick positions (epoch s, aligned to the step) in [start, end] and their strftime format."""
    span = max(end - start, 1.0)
    step = next((s for s in TICK_STEPS if span / s <= max_ticks), TICK_STEPS[-1])
    fmt = "%Y-%m-%d" if step >= DAY else "%m-%d %H:%M"
    first = math.ceil(start / step) * step
    ticks = [float(t) for t in range(int(first), int(end) + 1, step)]
    return ticks or [start], fmt


def _scale(d0: float, d1: float, r0: float, r1: float) -> Callable[[float], float]:
    """Linear map from the domain [d0, d1] onto the range [r0, r1]."""
    if d1 == d0:
        return lambda _v: (r0 + r1) / 2
    factor = (r1 - r0) / (d1 - d0)
    return lambda v: r0 + (v - d0) * factor


def _open_svg(chart_id: str, title: str, height: int, points: int, colours: Sequence[str]) -> str:
    classes = "chart" if points else "chart empty"
    return (
        f'<svg class="{classes}" data-chart="{_esc(chart_id)}" data-points="{points}" '
        f'data-colours="{_esc(" ".join(colours))}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
        f'<rect class="bg" x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>'
        f'<text class="title" x="12" y="22">{_esc(title)}</text>'
    )


def empty_chart(chart_id: str, title: str, message: str = "no data yet") -> str:
    """The placeholder drawn instead of a chart whose query returned nothing."""
    height = 160
    return (
        _open_svg(chart_id, title, height, 0, ())
        + f'<rect class="placeholder" x="12" y="36" width="{WIDTH - 24}" height="{height - 48}" '
        f'rx="6" fill="{EMPTY_FILL}" stroke="#9ca3af" stroke-dasharray="6 4"/>'
        f'<text class="placeholder-text" x="{WIDTH / 2}" y="{36 + (height - 48) / 2 + 5}" '
        f'text-anchor="middle">{_esc(message)}</text></svg>'
    )


def _legend(series: Sequence[Series], y: float) -> str:
    parts, x = [], float(MARGIN_LEFT)
    for item in series:
        parts.append(
            f'<rect x="{x:.1f}" y="{y - 9}" width="12" height="12" fill="{_esc(item.colour)}"/>'
            f'<text class="legend" x="{x + 16:.1f}" y="{y + 1}">{_esc(item.name)}</text>'
        )
        x += 16 + 7 * len(item.name) + 18
    return "".join(parts)


def line_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    y_format: Format = fmt_number,
    y_max: float | None = None,
    empty_message: str = "no data yet",
) -> str:
    """Lines over a time axis (x = epoch seconds, UTC), y from 0; one colour per series."""
    series = [s for s in series if s.points]
    points = sum(len(s.points) for s in series)
    if not points:
        return empty_chart(chart_id, title, empty_message)
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - HOUR / 2, x1 + HOUR / 2
    y_hi = max(max(ys, default=0.0), 0.0)
    if y_max is not None:
        y_hi = max(y_hi, y_max)
    y_ticks = nice_ticks(min(0.0, min(ys, default=0.0)), y_hi or 1.0)
    plot_l, plot_r = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    plot_t, plot_b = MARGIN_TOP, LINE_HEIGHT - MARGIN_BOTTOM
    sx = _scale(x0, x1, plot_l, plot_r)
    sy = _scale(y_ticks[0], y_ticks[-1], plot_b, plot_t)

    out = [_open_svg(chart_id, title, LINE_HEIGHT, points, [s.colour for s in series])]
    out.append(_legend(series, 42))
    for tick in y_ticks:
        y = sy(tick)
        out.append(
            f'<line class="grid" x1="{plot_l}" x2="{plot_r}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID}"/><text class="tick" x="{plot_l - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{_esc(y_format(tick))}</text>'
        )
    ticks, fmt = time_ticks(x0, x1)
    for tick in ticks:
        x = sx(tick)
        label = datetime.fromtimestamp(tick, UTC).strftime(fmt)
        out.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{plot_b}" y2="{plot_b + 4}" '
            f'stroke="{AXIS}"/><text class="tick" x="{x:.1f}" y="{plot_b + 17}" '
            f'text-anchor="middle">{_esc(label)}</text>'
        )
    out.append(
        f'<line class="axis" x1="{plot_l}" x2="{plot_r}" y1="{plot_b}" y2="{plot_b}" '
        f'stroke="{AXIS}"/><line class="axis" x1="{plot_l}" x2="{plot_l}" y1="{plot_t}" '
        f'y2="{plot_b}" stroke="{AXIS}"/>'
        f'<text class="axis-label" x="{(plot_l + plot_r) / 2}" y="{LINE_HEIGHT - 8}" '
        f'text-anchor="middle">{_esc(x_label)}</text>'
        f'<text class="axis-label" x="14" y="{(plot_t + plot_b) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(plot_t + plot_b) / 2})">{_esc(y_label)}</text>'
    )
    for item in series:
        coords = [
            (sx(x), sy(y)) for x, y in sorted(item.points) if math.isfinite(y) and math.isfinite(x)
        ]
        colour = _esc(item.colour)
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        out.append(
            f'<polyline class="series" data-series="{_esc(item.name)}" points="{path}" '
            f'fill="none" stroke="{colour}" stroke-width="2.5" stroke-linejoin="round"/>'
        )
        if len(coords) <= 60:
            out.extend(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>' for x, y in coords
            )
    out.append("</svg>")
    return "".join(out)


def _truncate(label: str, limit: int = 30) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def bar_chart(
    chart_id: str,
    title: str,
    bars: Sequence[tuple[str, float]],
    *,
    x_label: str,
    y_label: str,
    colour: str = PALETTE[0],
    value_format: Format = fmt_number,
    x_max: float | None = None,
    empty_message: str = "no data yet",
) -> str:
    """Horizontal bars (one per category, in the given order) with their values at the end.

    ``x_label`` names the value axis (bottom), ``y_label`` the categories (left).
    """
    bars = [(label, value) for label, value in bars if math.isfinite(value)][:MAX_BARS]
    if not bars:
        return empty_chart(chart_id, title, empty_message)
    labels = [_truncate(str(label)) for label, _ in bars]
    plot_l = min(230, max(90, 12 + int(6.6 * max(len(label) for label in labels)) + 8))
    plot_r = WIDTH - MARGIN_RIGHT - 48
    plot_t, band = 46, 24
    plot_b = plot_t + band * len(bars)
    height = plot_b + 44
    hi = max(max(value for _, value in bars), x_max or 0.0)
    ticks = nice_ticks(min(0.0, min(value for _, value in bars)), hi or 1.0, 4)
    sx = _scale(ticks[0], ticks[-1], plot_l, plot_r)

    out = [_open_svg(chart_id, title, height, len(bars), [colour])]
    for tick in ticks:
        x = sx(tick)
        out.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{plot_t}" y2="{plot_b}" '
            f'stroke="{GRID}"/><text class="tick" x="{x:.1f}" y="{plot_b + 15}" '
            f'text-anchor="middle">{_esc(value_format(tick))}</text>'
        )
    zero = sx(0.0)
    for index, ((_, value), label) in enumerate(zip(bars, labels, strict=True)):
        y = plot_t + index * band + 4
        left, right = sorted((zero, sx(value)))
        out.append(
            f'<text class="tick" x="{plot_l - 6}" y="{y + band / 2 + 1}" '
            f'text-anchor="end">{_esc(label)}</text>'
            f'<rect class="bar" x="{left:.1f}" y="{y}" width="{max(right - left, 1.0):.1f}" '
            f'height="{band - 8}" fill="{_esc(colour)}"/>'
            f'<text class="value" x="{right + 4:.1f}" y="{y + band / 2 + 1}">'
            f"{_esc(value_format(value))}</text>"
        )
    out.append(
        f'<line class="axis" x1="{zero:.1f}" x2="{zero:.1f}" y1="{plot_t}" y2="{plot_b}" '
        f'stroke="{AXIS}"/>'
        f'<text class="axis-label" x="{(plot_l + plot_r) / 2}" y="{height - 8}" '
        f'text-anchor="middle">{_esc(x_label)}</text>'
        f'<text class="axis-label" x="12" y="{plot_t - 8}">{_esc(y_label)}</text></svg>'
    )
    return "".join(out)


# ------------------------------------------------------------------------------------------
# Time window and bucketing
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Event-time window ``[start, end)`` in epoch seconds; None = unbounded."""

    start: int | None = None
    end: int | None = None

    def where(self, column: str) -> str:
        """SQL condition on a DateTime column (``1`` when unbounded)."""
        parts = []
        if self.start is not None:
            parts.append(f"{column} >= toDateTime({int(self.start)})")
        if self.end is not None:
            parts.append(f"{column} < toDateTime({int(self.end)})")
        return " AND ".join(parts) or "1"

    def where_day(self, column: str) -> str:
        """SQL condition on a Date column: the days the window touches."""
        parts = []
        if self.start is not None:
            parts.append(f"{column} >= toDate(toDateTime({int(self.start)}))")
        if self.end is not None:
            parts.append(f"{column} <= toDate(toDateTime({int(self.end) - 1}))")
        return " AND ".join(parts) or "1"

    def describe(self) -> str:
        def show(ts: int | None) -> str:
            return "…" if ts is None else _iso(ts)

        if self.start is None and self.end is None:
            return "all data"
        return f"{show(self.start)} to {show(self.end)} (UTC, end excluded)"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def pick_bucket(span_s: float, max_points: int = 240, minimum: int = MINUTE) -> int:
    """The smallest bucket (seconds) of BUCKETS, >= ``minimum``, giving <= max_points buckets."""
    for bucket in BUCKETS:
        if bucket >= minimum and span_s / bucket <= max_points:
            return bucket
    return BUCKETS[-1]


def bucket_name(bucket: int) -> str:
    names = {MINUTE: "minute", HOUR: "hour", DAY: "day", 7 * DAY: "week"}
    if bucket in names:
        return names[bucket]
    return f"{bucket // HOUR} hours" if bucket % HOUR == 0 else f"{bucket // MINUTE} minutes"


# Tables and the event-time column that bounds their data (for the default window).
_BOUND_COLUMNS = (
    ("events_per_minute", "minute"),
    ("fraud_scores", "ts"),
    ("shipments", "completed_ts"),
    ("rec_predictions", "ts"),
    ("segment_mix_per_hour", "hour"),
)


def data_bounds(query: Query) -> tuple[int, int] | None:
    """(first, last) event time in epoch seconds over the main tables; None when all empty."""
    lows, highs = [], []
    for table, column in _BOUND_COLUMNS:
        rows = _safe(
            query,
            f"bounds:{table}",
            f"SELECT toUInt32(min({column})), toUInt32(max({column})), count() FROM {table}",
        )
        if rows and rows[0][2]:
            lows.append(int(rows[0][0]))
            highs.append(int(rows[0][1]))
    if not lows:
        return None
    return min(lows), max(highs)


class _MissingTable(Exception):
    pass


def _safe(query: Query, name: str, sql: str) -> list[tuple[Any, ...]] | None:
    """Rows, or None when the table is missing (an older or partial schema)."""
    try:
        return query(name, sql)
    except _MissingTable:
        return None


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


@dataclass
class Section:
    key: str
    title: str
    intro: str
    charts: list[str] = field(default_factory=list)


def _rows(query: Query, name: str, sql: str) -> tuple[list[tuple[Any, ...]], str]:
    rows = _safe(query, name, sql)
    if rows is None:
        return [], "table missing: run borderflow migrate"
    return rows, "no data yet"


def _grouped_series(
    rows: Sequence[tuple[Any, ...]], names: Sequence[str] | None = None
) -> list[Series]:
    """Rows of (t, group, value) -> one Series per group (in ``names`` order when given)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for name in names or ():
        groups[name] = []
    for t, group, value in rows:
        groups.setdefault(str(group), []).append((float(t), float(value)))
    return [
        Series(name, points, PALETTE[index % len(PALETTE)])
        for index, (name, points) in enumerate(groups.items())
    ]


def _columns_series(
    rows: Sequence[tuple[Any, ...]], names: Sequence[str], colours: Sequence[str] = PALETTE
) -> list[Series]:
    """Rows of (t, v1, v2, ...) -> one Series per value column."""
    return [
        Series(
            name,
            [(float(row[0]), float(row[i + 1])) for row in rows if row[i + 1] is not None],
            colours[i],
        )
        for i, name in enumerate(names)
    ]


def _span(window: Window, bounds: tuple[int, int] | None) -> float:
    start = window.start if window.start is not None else (bounds[0] if bounds else 0)
    end = window.end if window.end is not None else (bounds[1] + MINUTE if bounds else 0)
    return max(float(end - start), 0.0)


def build_sections(query: Query, window: Window, bounds: tuple[int, int] | None) -> list[Section]:
    """Run every chart's query and draw it."""
    span = _span(window, bounds)
    fine = pick_bucket(span, 240, MINUTE)
    coarse = pick_bucket(span, 30, HOUR)
    fine_name, coarse_name = bucket_name(fine), bucket_name(coarse)
    time_label = f"event time (UTC), per {fine_name}"
    coarse_label = f"event time (UTC), per {coarse_name}"

    def t(column: str, bucket: int) -> str:
        return f"intDiv(toUInt32({column}), {bucket}) * {bucket}"

    # -- throughput ------------------------------------------------------------------------
    throughput = Section(
        "throughput",
        "Throughput",
        "Events per minute per input topic (averaged over each bucket), from events_per_minute.",
    )
    rows, why = _rows(
        query,
        "throughput",
        f"SELECT {t('minute', fine)} AS t, topic, sum(events) / {fine // MINUTE} AS per_minute "
        f"FROM events_per_minute WHERE {window.where('minute')} "
        "GROUP BY t, topic ORDER BY topic, t",
    )
    throughput.charts.append(
        line_chart(
            "throughput",
            f"Events per minute per topic (per {fine_name})",
            _grouped_series(rows),
            x_label=time_label,
            y_label="events / minute",
            empty_message=why,
        )
    )

    # -- fraud -----------------------------------------------------------------------------
    fraud = Section(
        "fraud",
        "Fraud",
        "Scored payments (fraud_scores FINAL), alerts (score >= threshold), label events as "
        "they arrived (fraud_label_events, by label time) and the precision of the alerts that "
        "have a label (each payment's latest label, the fraud_labels view).",
    )
    rows, why = _rows(
        query,
        "fraud_payments",
        f"SELECT {t('ts', coarse)} AS t, count() AS payments, sum(is_alert) AS alerts, "
        "sum(is_alert) / count() AS alert_rate "
        f"FROM fraud_scores FINAL WHERE {window.where('ts')} GROUP BY t ORDER BY t",
    )
    fraud.charts.append(
        line_chart(
            "fraud_payments",
            f"Payments and fraud alerts per {coarse_name}",
            _columns_series(rows, ["payments", "alerts"]),
            x_label=coarse_label,
            y_label=f"payments / {coarse_name}",
            empty_message=why,
        )
    )
    fraud.charts.append(
        line_chart(
            "fraud_alert_rate",
            f"Alert rate per {coarse_name}",
            [Series("alerts / payments", [(r[0], r[3]) for r in rows], PALETTE[1])],
            x_label=coarse_label,
            y_label="alert rate",
            y_format=fmt_percent,
            empty_message=why,
        )
    )
    label_time = "if(ts_ms > 0, ts, ingested_at)"
    rows, why = _rows(
        query,
        "fraud_labels",
        f"SELECT {t(label_time, coarse)} AS t, label, count() AS labels "
        f"FROM fraud_label_events WHERE {window.where(label_time)} "
        "GROUP BY t, label ORDER BY label, t",
    )
    label_series = _grouped_series(rows, ["fraud", "legit"] if rows else None)
    label_series = [
        Series(s.name, s.points, PALETTE[1] if s.name == "fraud" else PALETTE[2 + i])
        for i, s in enumerate(label_series)
    ]
    fraud.charts.append(
        line_chart(
            "fraud_labels",
            f"Fraud label events per {coarse_name} (by label time)",
            label_series,
            x_label=coarse_label,
            y_label=f"labels / {coarse_name}",
            empty_message=why,
        )
    )
    rows, why = _rows(
        query,
        "fraud_precision",
        f"SELECT {t('ts', coarse)} AS t, countIf(label = 'fraud') / count() AS precision, "
        "count() AS labelled "
        f"FROM (SELECT txn_id, ts FROM fraud_scores FINAL WHERE is_alert = 1 "
        f"AND {window.where('ts')}) "
        "ALL INNER JOIN (SELECT txn_id, label FROM fraud_labels) USING txn_id "
        "GROUP BY t ORDER BY t",
    )
    fraud.charts.append(
        line_chart(
            "fraud_precision",
            f"Alert precision per {coarse_name} (alerts with a label)",
            [Series("fraud / labelled alerts", [(r[0], r[1]) for r in rows], PALETTE[4])],
            x_label=coarse_label,
            y_label="precision",
            y_format=fmt_percent,
            y_max=1.0,
            empty_message=why,
        )
    )

    # -- logistics -------------------------------------------------------------------------
    logistics = Section(
        "logistics",
        "Logistics",
        f"Completed shipments (shipments FINAL, by completion time; the {MAX_BARS} busiest "
        "routes and carriers). On-time rate counts delivered orders that had a promise; "
        "customs hours average the orders held in customs.",
    )
    rows, why = _rows(
        query,
        "logistics_routes",
        "SELECT origin_country, dest_country, carrier, count() AS shipments, "
        "sumIf(on_time, outcome = 'delivered' AND has_promise = 1) "
        "/ countIf(outcome = 'delivered' AND has_promise = 1) AS on_time_rate, "
        "avgIf(transit_days, outcome = 'delivered') AS mean_transit_days, "
        "countIf(outcome = 'delivered') AS delivered "
        f"FROM shipments FINAL WHERE {window.where('completed_ts')} "
        f"GROUP BY origin_country, dest_country, carrier ORDER BY shipments DESC, "
        f"origin_country, dest_country, carrier LIMIT {MAX_BARS}",
    )

    def route(r: tuple[Any, ...]) -> str:
        return f"{r[0] or '?'}\u2192{r[1] or '?'} {r[2]}"

    logistics.charts.append(
        bar_chart(
            "logistics_on_time",
            "On-time delivery rate per route and carrier",
            [(route(r), float(r[4])) for r in rows if _finite(r[4])],
            x_label="on-time rate (delivered with a promise)",
            y_label="route, carrier",
            colour=PALETTE[2],
            value_format=fmt_percent,
            x_max=1.0,
            empty_message=why,
        )
    )
    logistics.charts.append(
        bar_chart(
            "logistics_transit",
            "Mean transit days per route and carrier",
            [(route(r), float(r[5])) for r in rows if r[6] and _finite(r[5])],
            x_label="days from first scan to delivery",
            y_label="route, carrier",
            colour=PALETTE[0],
            empty_message=why,
        )
    )
    rows, why = _rows(
        query,
        "logistics_customs",
        "SELECT origin_country, dest_country, count() AS held, avg(customs_hours) AS hours "
        f"FROM shipments FINAL WHERE customs_hours > 0 AND {window.where('completed_ts')} "
        f"GROUP BY origin_country, dest_country ORDER BY held DESC, origin_country, "
        f"dest_country LIMIT {MAX_BARS}",
    )
    logistics.charts.append(
        bar_chart(
            "logistics_customs",
            "Mean customs hold per route (held orders)",
            [(f"{r[0] or '?'}\u2192{r[1] or '?'} ({r[2]})", float(r[3])) for r in rows],
            x_label="hours in customs",
            y_label="route (held orders)",
            colour=PALETTE[3],
            empty_message=why,
        )
    )
    rows, why = _rows(
        query,
        "logistics_prediction_error",
        "SELECT status, count() AS predictions, "
        "avg(abs(predicted_delivery_ts_ms / 1000 - toUInt64(completed_ts))) / 3600 AS mae_h "
        "FROM (SELECT order_id, status, predicted_delivery_ts_ms FROM shipment_predictions "
        f"FINAL WHERE {window.where('ts')}) "
        "ALL INNER JOIN (SELECT order_id, completed_ts FROM shipments FINAL "
        "WHERE outcome = 'delivered') USING order_id "
        f"GROUP BY status ORDER BY predictions DESC, status LIMIT {MAX_BARS}",
    )
    logistics.charts.append(
        bar_chart(
            "logistics_prediction_error",
            "Delivery-time prediction error by shipment status",
            [(f"{r[0]} ({r[1]})", float(r[2])) for r in rows],
            x_label="mean absolute error, hours",
            y_label="status when predicted (predictions)",
            colour=PALETTE[4],
            empty_message=why,
        )
    )

    # -- recommendations -------------------------------------------------------------------
    recs = Section(
        "recommendations",
        "Recommendations",
        "Online quality of the served lists (rec_quality): the share of views, carts and "
        "purchases whose item was in the top 5 / top 20, and the mean reciprocal rank@20.",
    )
    rows, why = _rows(
        query,
        "recs_quality",
        f"SELECT {t('minute', fine)} AS t, sum(hits_5) / sum(predictions) AS hit_rate_5, "
        "sum(hits_20) / sum(predictions) AS hit_rate_20, sum(rr_20) / sum(predictions) AS mrr_20 "
        f"FROM rec_quality WHERE {window.where('minute')} GROUP BY t ORDER BY t",
    )
    recs.charts.append(
        line_chart(
            "recs_quality",
            f"Hit rate@5, hit rate@20 and MRR@20 per {fine_name}",
            _columns_series(rows, ["hit rate@5", "hit rate@20", "MRR@20"]),
            x_label=time_label,
            y_label="rate",
            y_format=fmt_percent,
            empty_message=why,
        )
    )

    # -- segments --------------------------------------------------------------------------
    segments = Section(
        "segments",
        "Segments",
        "Purchase revenue per RFM segment of the buyer (segment_mix_per_hour), in USD.",
    )
    rows, why = _rows(
        query,
        "segments_revenue",
        "SELECT segment, sum(revenue_usd) AS revenue, sum(purchases) AS purchases "
        f"FROM segment_mix_per_hour WHERE {window.where('hour')} "
        f"GROUP BY segment ORDER BY revenue DESC, segment LIMIT {MAX_BARS}",
    )
    segments.charts.append(
        bar_chart(
            "segments_revenue",
            "Revenue by segment",
            [(f"{r[0] or '(none)'} ({r[2]})", float(r[1])) for r in rows],
            x_label="revenue, USD",
            y_label="segment (purchases)",
            colour=PALETTE[5],
            empty_message=why,
        )
    )

    # -- models ----------------------------------------------------------------------------
    models = Section(
        "models",
        "Models",
        "Fraud model quality per payment day from the latest `borderflow eval fraud` run "
        "(model_metrics, model 'all').",
    )
    rows, why = _rows(
        query,
        "model_metrics",
        "SELECT toUInt32(toDateTime(day)) AS t, "
        "maxIf(value, metric = 'auc_roc') AS auc, "
        "maxIf(value, metric = 'average_precision') AS ap, "
        "countIf(metric = 'auc_roc') AS has_auc, countIf(metric = 'average_precision') AS has_ap "
        "FROM model_metrics FINAL "
        "WHERE model = 'all' AND day > toDate('1970-01-01') "
        f"AND {window.where_day('day')} "
        "AND run_id IN (SELECT run_id FROM model_metrics ORDER BY computed_at DESC, run_id DESC "
        "LIMIT 1) GROUP BY t ORDER BY t",
    )
    models.charts.append(
        line_chart(
            "model_metrics",
            "Fraud model AUC ROC and average precision per day",
            [
                Series("AUC ROC", [(r[0], r[1]) for r in rows if r[3]], PALETTE[0]),
                Series("average precision", [(r[0], r[2]) for r in rows if r[4]], PALETTE[3]),
            ],
            x_label="payment day (UTC)",
            y_label="score",
            y_max=1.0,
            empty_message="no eval run yet" if why == "no data yet" else why,
        )
    )
    return [throughput, fraud, logistics, recs, segments, models]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


CSS = """
:root { color-scheme: light; }
body { margin: 0; padding: 16px 24px 32px; background: #f9fafb; color: #111827;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #4b5563; font-size: 13px; }
section { margin-top: 20px; }
section h2 { margin: 0 0 2px; font-size: 18px; border-bottom: 1px solid #d1d5db; }
section p.intro { margin: 4px 0 10px; color: #4b5563; font-size: 13px; max-width: 1300px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
svg.chart { background: #fff; border: 1px solid #d1d5db; border-radius: 6px; }
svg.chart text { font-family: inherit; fill: #374151; font-size: 11px; }
svg.chart text.title { font-size: 14px; font-weight: 600; fill: #111827; }
svg.chart text.axis-label { font-size: 11px; fill: #6b7280; }
svg.chart text.placeholder-text { font-size: 15px; fill: #6b7280; }
footer { margin-top: 24px; color: #6b7280; font-size: 12px; }
"""


def render_html(
    sections: Sequence[Section], *, database: str, window: Window, generated_at: datetime
) -> str:
    """The whole page: inline CSS and SVG only (nothing is fetched when it is opened)."""
    charts = [chart for section in sections for chart in section.charts]
    with_data = sum(1 for chart in charts if 'class="chart"' in chart)
    body = []
    for section in sections:
        body.append(
            f'<section id="{_esc(section.key)}"><h2>{_esc(section.title)}</h2>'
            f'<p class="intro">{_esc(section.intro)}</p>'
            f'<div class="grid">{"".join(section.charts)}</div></section>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>borderflow report: {_esc(database)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>borderflow report</h1><p>ClickHouse database <b>{_esc(database)}</b>"
        f" &middot; window: {_esc(window.describe())} &middot; generated "
        f"{_esc(generated_at.strftime('%Y-%m-%d %H:%M:%S'))} UTC &middot; {with_data} of "
        f"{len(charts)} charts with data</p></header>"
        + "".join(body)
        + "<footer>Generated by <code>borderflow report</code>: inline SVG, no scripts, "
        "nothing loaded from the network.</footer></body></html>\n"
    )


def build_report(
    query: Query,
    *,
    database: str,
    window: Window,
    generated_at: datetime | None = None,
    hours: float | None = None,
) -> str:
    """Resolve the window (``hours`` = the last N hours up to the newest event), query, draw."""
    bounds = data_bounds(query)
    if hours is not None:
        end = (bounds[1] if bounds else int(datetime.now(UTC).timestamp())) + MINUTE
        window = Window(int(end - hours * HOUR), end)
    sections = build_sections(query, window, bounds)
    return render_html(
        sections,
        database=database,
        window=window,
        generated_at=generated_at or datetime.now(UTC).replace(microsecond=0),
    )


# ------------------------------------------------------------------------------------------
# ClickHouse and the command
# ------------------------------------------------------------------------------------------

_UNKNOWN_TABLE = 60
_UNKNOWN_DATABASE = 81


def clickhouse_query(settings: Settings) -> tuple[Query, Callable[[], None]]:
    """A Query on the configured database and a function that closes its connection."""
    from clickhouse_driver.errors import ServerException

    from infra.migrate import clickhouse_client

    client = clickhouse_client(settings, settings.clickhouse_database)

    def query(_name: str, sql: str) -> list[tuple[Any, ...]]:
        try:
            return list(client.execute(sql))
        except ServerException as exc:
            if exc.code == _UNKNOWN_TABLE:
                raise _MissingTable(str(exc)) from exc
            if exc.code == _UNKNOWN_DATABASE:
                raise BorderflowError(
                    f"ClickHouse database {settings.clickhouse_database!r} does not exist: "
                    "run `borderflow migrate` (and the worker) first"
                ) from exc
            raise

    return query, client.disconnect


def _parse_time(value: str | None, option: str, *, end: bool) -> int | None:
    """``YYYY-MM-DD`` (a whole UTC day; inclusive for --to) or ``YYYY-MM-DD[T ]HH:MM[:SS]``."""
    if value is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S",
                "%Y-%m-%d %H:%M"):  # fmt: skip
        try:
            parsed = datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if end and fmt == "%Y-%m-%d":
            parsed += timedelta(days=1)
        return int(parsed.timestamp())
    raise click.BadParameter(
        f"{value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC)", param_hint=option
    )


@click.command(name="report")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default="borderflow-report.html",
    show_default=True,
    help="The HTML file to write (parent folders are created).",
)
@click.option(
    "--hours",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Only the last N hours of event time, up to the newest event in the database.",
)
@click.option(
    "--from",
    "time_from",
    default=None,
    help="Start of the window, UTC: YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]. Default: the first event.",
)
@click.option(
    "--to",
    "time_to",
    default=None,
    help="End of the window, UTC: YYYY-MM-DD (that day included) or YYYY-MM-DDTHH:MM[:SS] "
    "(excluded). Default: the newest event.",
)
@click.pass_obj
def report_command(
    settings: Settings,
    out: str,
    hours: float | None,
    time_from: str | None,
    time_to: str | None,
) -> None:
    """Write one self-contained HTML report with charts of the ClickHouse data.

    Throughput, fraud, logistics, recommendations, segments and model quality, drawn as
    inline SVG (no scripts, nothing fetched from the network: open it anywhere). Without
    --hours/--from/--to it covers all data.
    """
    if hours is not None and (time_from or time_to):
        raise click.UsageError("use either --hours or --from/--to, not both")
    window = Window(
        _parse_time(time_from, "--from", end=False), _parse_time(time_to, "--to", end=True)
    )
    if window.start is not None and window.end is not None and window.start >= window.end:
        raise click.UsageError(f"--from {time_from} is not before --to {time_to}")
    query, close = clickhouse_query(settings)
    try:
        page = build_report(
            query, database=settings.clickhouse_database, window=window, hours=hours
        )
    finally:
        close()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    charts = page.count('<svg class="chart')
    empty = page.count('<svg class="chart empty"')
    click.echo(
        f"wrote {path} ({len(page.encode()) / 1024:.1f} KiB): {charts - empty} of {charts} "
        "charts with data"
    )
