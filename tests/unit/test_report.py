"""`borderflow report` without ClickHouse: chart builders, scales and the page, on fake rows."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner

from infra import report
from infra.report import (
    PALETTE,
    Series,
    Window,
    bar_chart,
    build_report,
    empty_chart,
    line_chart,
    nice_ticks,
    pick_bucket,
    time_ticks,
)
from schemas.config import Settings

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ElementTree.Element:
    return ElementTree.fromstring(svg)


# -- scales ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0, 10, [0, 2, 4, 6, 8, 10]),
        (0, 9.3, [0, 2, 4, 6, 8, 10]),
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0, 0, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0, 1234, [0, 250, 500, 750, 1000, 1250]),
        (-3, 7, [-4, -2, 0, 2, 4, 6, 8]),
    ],
)
def test_nice_ticks(low: float, high: float, expected: list[float]) -> None:
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_time_ticks_are_aligned_and_formatted_by_span() -> None:
    ticks, fmt = time_ticks(T0 + 30, T0 + 6 * 3600)
    assert fmt == "%m-%d %H:%M"
    assert all(t % 3600 == 0 for t in ticks)
    assert T0 + 30 <= ticks[0] and ticks[-1] <= T0 + 6 * 3600 and len(ticks) <= 7
    ticks, fmt = time_ticks(T0, T0 + 20 * 86400)
    assert fmt == "%Y-%m-%d" and all(t % 86400 == 0 for t in ticks) and len(ticks) <= 7


def test_pick_bucket_keeps_points_bounded() -> None:
    assert pick_bucket(3600) == 60
    assert pick_bucket(10 * 86400) == 3600
    assert pick_bucket(10 * 86400, 30, 3600) == 86400
    assert pick_bucket(3600, 30, 3600) == 3600
    assert pick_bucket(10 * 365 * 86400) == 7 * 86400


def test_line_chart_maps_data_onto_the_plot_area() -> None:
    svg = line_chart(
        "demo",
        "Demo",
        [Series("a", [(T0, 0.0), (T0 + 3600, 10.0), (T0 + 7200, 5.0)], "#123456")],
        x_label="time",
        y_label="count",
    )
    root = parse(svg)
    assert root.get("class") == "chart" and root.get("data-chart") == "demo"
    assert root.get("data-points") == "3" and root.get("data-colours") == "#123456"
    line = root.find(f"{SVG}polyline")
    assert line is not None and line.get("stroke") == "#123456"
    points = [tuple(map(float, p.split(","))) for p in line.get("points", "").split()]
    left, right = report.MARGIN_LEFT, report.WIDTH - report.MARGIN_RIGHT
    bottom, top = report.LINE_HEIGHT - report.MARGIN_BOTTOM, report.MARGIN_TOP
    assert points[0] == pytest.approx((left, bottom), abs=0.1)  # (first x, y = 0)
    assert points[1] == pytest.approx((left + (right - left) / 2, top), abs=0.1)  # y max = 10
    assert points[2] == pytest.approx((right, (top + bottom) / 2), abs=0.1)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "Demo" in texts and "time" in texts and "count" in texts
    assert {"0", "10"} <= set(texts)
    assert "01-01 01:00" in texts


def test_line_chart_with_one_point_and_percent_axis() -> None:
    svg = line_chart(
        "one",
        "One",
        [Series("rate", [(T0, 0.25)], PALETTE[1])],
        x_label="t",
        y_label="rate",
        y_format=report.fmt_percent,
        y_max=1.0,
    )
    root = parse(svg)
    assert root.get("data-points") == "1"
    assert len(root.findall(f"{SVG}circle")) == 1
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert {"0%", "100%"} <= texts


def test_bar_chart_scales_bars_to_their_values() -> None:
    svg = bar_chart("bars", "Bars", [("a", 10.0), ("b", 5.0), ("c", 0.0)], x_label="v", y_label="k")
    root = parse(svg)
    assert root.get("data-points") == "3"
    widths = [float(r.get("width", 0)) for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert widths[0] == pytest.approx(2 * widths[1], rel=0.01)
    assert widths[2] == 1.0  # a zero still shows a sliver
    values = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "value"]
    assert values == ["10", "5", "0"]


def test_bar_chart_keeps_at_most_max_bars_and_truncates_long_labels() -> None:
    bars = [(f"category-{i}-" + "x" * 40, float(i)) for i in range(20)]
    root = parse(bar_chart("many", "Many", bars, x_label="v", y_label="k"))
    assert root.get("data-points") == str(report.MAX_BARS)
    labels = [t.text or "" for t in root.iter(f"{SVG}text") if t.get("class") == "tick"]
    assert any(label.endswith("\u2026") and len(label) == 30 for label in labels)


@pytest.mark.parametrize(
    "svg",
    [
        line_chart("e1", "Empty line", [], x_label="x", y_label="y"),
        line_chart("e2", "Empty series", [Series("s", [], "#000000")], x_label="x", y_label="y"),
        bar_chart("e3", "Empty bars", [], x_label="x", y_label="y"),
        empty_chart("e4", "Direct"),
    ],
)
def test_empty_data_draws_the_placeholder(svg: str) -> None:
    root = parse(svg)
    assert root.get("class") == "chart empty" and root.get("data-points") == "0"
    assert root.find(f"{SVG}polyline") is None
    placeholder = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "placeholder"]
    assert placeholder and placeholder[0].get("fill") == report.EMPTY_FILL
    assert "no data yet" in [t.text for t in root.iter(f"{SVG}text")]


def test_labels_are_escaped() -> None:
    nasty = '<script>alert("x")</script> & <b>'
    svgs = [
        line_chart(nasty, nasty, [Series(nasty, [(T0, 1.0)], "#000000")], x_label=nasty,
                   y_label=nasty),
        bar_chart(nasty, nasty, [(nasty, 1.0)], x_label=nasty, y_label=nasty),
        empty_chart(nasty, nasty, nasty),
    ]  # fmt: skip
    for svg in svgs:
        assert "<script" not in svg and "<b>" not in svg
        assert "&lt;script&gt;" in svg and "&amp;" in svg
        root = parse(svg)  # well-formed XML
        assert root.get("data-chart") == nasty
        assert any(nasty in (t.text or "") or (t.text or "").startswith("<script>") for t in
                   root.iter(f"{SVG}text"))  # fmt: skip


# -- the page, on fake query results -----------------------------------------------------------


def fake_rows(empty: bool = False) -> dict[str, list[tuple[Any, ...]]]:
    if empty:
        return {}
    hours = [T0 + h * 3600 for h in range(48)]
    return {
        "bounds:events_per_minute": [(T0, T0 + 47 * 3600, 100)],
        "throughput": [
            (t, topic, 5.0 + i) for i, topic in enumerate(["clicks", "payments"]) for t in hours
        ],  # fmt: skip
        "fraud_payments": [(T0, 20, 2, 0.1), (T0 + 86400, 30, 3, 0.1)],
        "fraud_labels": [(T0, "fraud", 2), (T0, "legit", 10), (T0 + 86400, "fraud", 1)],
        "fraud_precision": [(T0, 0.5, 2), (T0 + 86400, 1.0, 1)],
        "logistics_routes": [
            ("DE", "PL", "dhl <&> co", 10, 0.8, 3.5, 9),
            ("CN", "US", "sf", 5, 0.4, 8.0, 5),
        ],  # fmt: skip
        "logistics_customs": [("CN", "US", 4, 30.0)],
        "logistics_prediction_error": [("created", 10, 20.0), ("arrived_hub", 8, 5.0)],
        "recs_quality": [(t, 0.1, 0.3, 0.15) for t in hours],
        "segments_revenue": [("high-value", 1000.0, 10), ("growth", 400.0, 7)],
        "model_metrics": [(T0, 0.9, 0.6, 1, 1), (T0 + 86400, 0.85, 0.5, 1, 1)],
    }


def make_query(rows: dict[str, list[tuple[Any, ...]]], seen: list[tuple[str, str]]) -> Any:
    def query(name: str, sql: str) -> list[tuple[Any, ...]]:
        seen.append((name, sql))
        return rows.get(name, [])

    return query


CHARTS = {
    "throughput", "fraud_payments", "fraud_alert_rate", "fraud_labels", "fraud_precision",
    "logistics_on_time", "logistics_transit", "logistics_customs", "logistics_prediction_error",
    "recs_quality", "segments_revenue", "model_metrics",
}  # fmt: skip


def charts_in(page: str) -> dict[str, int]:
    return {
        chart: int(points)
        for chart, points in re.findall(r'data-chart="([^"]+)" data-points="(\d+)"', page)
    }


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(", page, re.I)
    # the only URL is the SVG namespace, which is an identifier, never fetched
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}


def test_page_has_every_chart_with_data_and_is_self_contained() -> None:
    seen: list[tuple[str, str]] = []
    generated = datetime(2026, 1, 3, tzinfo=UTC)
    page = build_report(
        make_query(fake_rows(), seen), database="bf_x", window=Window(), generated_at=generated
    )
    assert page.startswith("<!DOCTYPE html>")
    points = charts_in(page)
    assert set(points) == CHARTS
    assert all(n > 0 for n in points.values()), points
    assert points["throughput"] == 96 and points["recs_quality"] == 144
    assert "12 of 12 charts with data" in page
    assert_self_contained(page)
    assert "dhl &lt;&amp;&gt; co" in page and "<&>" not in page
    # 48 hours of data: throughput per minute -> 15-minute buckets, fraud per 6 hours
    sql = dict(seen)
    assert "intDiv(toUInt32(minute), 900) * 900" in sql["throughput"]
    assert "intDiv(toUInt32(ts), 21600) * 21600" in sql["fraud_payments"]
    for name in ("fraud_payments", "fraud_labels", "logistics_routes", "recs_quality"):
        assert "WITH" not in sql[name].upper().split("FROM")[0]
        assert "OVER (" not in sql[name].upper()


def test_empty_database_gives_placeholders_only() -> None:
    page = build_report(make_query({}, []), database="bf_x", window=Window())
    points = charts_in(page)
    assert set(points) == CHARTS and set(points.values()) == {0}
    assert page.count('class="chart empty"') == len(CHARTS)
    assert page.count("no data yet") == len(CHARTS) - 1
    assert "no eval run yet" in page
    assert_self_contained(page)


def test_missing_tables_are_named_in_the_placeholder() -> None:
    def query(name: str, sql: str) -> list[tuple[Any, ...]]:
        raise report._MissingTable(name)

    page = build_report(query, database="bf_x", window=Window())
    assert page.count("table missing: run borderflow migrate") == len(CHARTS)


def test_windows_reach_the_sql() -> None:
    seen: list[tuple[str, str]] = []
    build_report(make_query(fake_rows(), seen), database="d", window=Window(), hours=6)
    sql = dict(seen)
    end = T0 + 47 * 3600 + 60
    assert f"minute >= toDateTime({end - 6 * 3600})" in sql["throughput"]
    assert f"minute < toDateTime({end})" in sql["throughput"]
    assert "intDiv(toUInt32(minute), 300) * 300" in sql["throughput"]  # 6 h -> 5 minutes
    assert "intDiv(toUInt32(ts), 3600) * 3600" in sql["fraud_payments"]  # and per hour

    window = Window(T0, T0 + 86400)
    assert window.where("ts") == f"ts >= toDateTime({T0}) AND ts < toDateTime({T0 + 86400})"
    assert window.where_day("day") == (
        f"day >= toDate(toDateTime({T0})) AND day <= toDate(toDateTime({T0 + 86399}))"
    )
    assert Window().where("ts") == "1"


def test_cli_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from infra.cli import cli

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(
        report, "clickhouse_query", lambda _s: (make_query(fake_rows(), seen), lambda: None)
    )
    out = tmp_path / "sub" / "r.html"
    result = CliRunner().invoke(
        cli,
        ["report", "--out", str(out), "--from", "2026-01-01", "--to", "2026-01-01"],
        obj=Settings(),
    )
    assert result.exit_code == 0, result.output
    assert "12 of 12 charts with data" in result.output and out.exists()
    assert f"ts < toDateTime({T0 + 86400})" in dict(seen)["fraud_payments"]

    bad = CliRunner().invoke(
        cli, ["report", "--hours", "2", "--from", "2026-01-01"], obj=Settings()
    )
    assert bad.exit_code != 0 and "either --hours or --from/--to" in bad.output
    bad = CliRunner().invoke(cli, ["report", "--from", "yesterday"], obj=Settings())
    assert bad.exit_code != 0 and "YYYY-MM-DD" in bad.output
    bad = CliRunner().invoke(
        cli, ["report", "--from", "2026-01-02", "--to", "2026-01-01"], obj=Settings()
    )
    assert bad.exit_code != 0 and "not before" in bad.output
