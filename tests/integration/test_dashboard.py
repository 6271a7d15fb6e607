"""Every ClickHouse query of the Grafana dashboard, run on the local stack's ClickHouse 18.16.

There is no Grafana here, so the test does what the ClickHouse plugin does before it sends a
query: it expands the plugin's macros for a fixed time range (as in the plugin's
pkg/macros/macros.go: ``$__timeFilter(col)`` -> ``col >= toDateTime(from) AND col <=
toDateTime(to)`` and so on) and points ``borderflow.`` at an isolated, migrated database.
Known facts go in through the pipeline's own writer (sinks.clickhouse.ClickHouseWriter: the
same columns, pseudonyms and materialized-view rollups as a worker), so the panels have data
to show. Every query must parse and run, and every panel must return rows; the stat panels
are checked against the seeded numbers.

The Prometheus panels cannot run here (no Prometheus); tests/unit/test_compose.py checks
that they only name metrics the worker exports.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from infra.migrate import clickhouse_client, migrate
from schemas.config import Settings
from sinks.clickhouse import SOURCE_COLUMNS, TABLE_COLUMNS, ClickHouseWriter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "infra" / "grafana" / "dashboards" / "borderflow.json"
)
CLICKHOUSE_UID = "borderflow-clickhouse"
DATABASE = "borderflow"

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RANGE = (T0 - timedelta(hours=1), T0 + timedelta(days=3))
#: Grafana's interval for a panel ($__interval_s): below and above the minute rollups' grain.
INTERVALS_S = (20, 3600)

CLICKS = 240
PAYMENTS = 60
ALERTS = 12  # every fifth payment
RELABELLED = 15  # an alert first labelled legit, later fraud
PURCHASES = CLICKS // 4
ORDERS = 12
DELAY_ALERTS = {"predicted_late": 3, "customs_delay": 2}
REC_PREDICTIONS = 200


# -- the plugin's macros -------------------------------------------------------------------------


def expand(sql: str, start: datetime, end: datetime, interval_s: int, database: str) -> str:
    """``sql`` as the ClickHouse plugin sends it, for the range [start, end]."""

    def seconds(t: datetime) -> int:
        return int(t.timestamp())

    def day(t: datetime) -> str:
        return t.astimezone(UTC).strftime("%Y-%m-%d")

    def millis(t: datetime) -> int:
        return int(t.timestamp() * 1000)

    a, b = seconds(start), seconds(end)
    macros: list[tuple[str, Any]] = [
        (r"\$__timeFilter_ms\(\s*([^)]+?)\s*\)",
         lambda m: f"{m[1]} >= fromUnixTimestamp64Milli({millis(start)}) AND {m[1]} <= "
                   f"fromUnixTimestamp64Milli({millis(end)})"),
        (r"\$__timeFilter\(\s*([^)]+?)\s*\)",
         lambda m: f"{m[1]} >= toDateTime({a}) AND {m[1]} <= toDateTime({b})"),
        (r"\$__dateFilter\(\s*([^)]+?)\s*\)",
         lambda m: f"{m[1]} >= toDate('{day(start)}') AND {m[1]} <= toDate('{day(end)}')"),
        (r"\$__(?:dateTimeFilter|dt)\(\s*([^,]+?)\s*,\s*([^)]+?)\s*\)",
         lambda m: f"({m[1]} >= toDate('{day(start)}') AND {m[1]} <= toDate('{day(end)}')) AND "
                   f"({m[2]} >= toDateTime({a}) AND {m[2]} <= toDateTime({b}))"),
        (r"\$__timeInterval_ms\(\s*([^)]+?)\s*\)",
         lambda m: f"toStartOfInterval(toDateTime64({m[1]}, 3), INTERVAL "
                   f"{interval_s * 1000} millisecond)"),
        (r"\$__timeInterval\(\s*([^)]+?)\s*\)",
         lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)"),
        (r"\$__fromTime_ms\b", lambda m: f"fromUnixTimestamp64Milli({millis(start)})"),
        (r"\$__toTime_ms\b", lambda m: f"fromUnixTimestamp64Milli({millis(end)})"),
        (r"\$__fromTime\b", lambda m: f"toDateTime({a})"),
        (r"\$__toTime\b", lambda m: f"toDateTime({b})"),
        (r"\$__interval_s\b", lambda m: str(interval_s)),
    ]  # fmt: skip
    for pattern, replace in macros:
        sql = re.sub(pattern, replace, sql)
    assert "$" not in sql, f"unexpanded macro or template variable in:\n{sql}"
    return re.sub(rf"\b{DATABASE}\.", f"{database}.", sql)


def test_expand_mirrors_the_plugin() -> None:
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, 6, tzinfo=UTC)
    sql = (
        "SELECT x FROM borderflow.t WHERE $__timeFilter(ts) AND $__dateFilter( day ) "
        "AND y > $__fromTime AND $__interval_s > 0"
    )
    assert expand(sql, start, end, 60, "bf_x") == (
        "SELECT x FROM bf_x.t WHERE ts >= toDateTime(1767225600) AND ts <= toDateTime(1767333600)"
        " AND day >= toDate('2026-01-01') AND day <= toDate('2026-01-02') "
        "AND y > toDateTime(1767225600) AND 60 > 0"
    )


# -- seeded facts --------------------------------------------------------------------------------


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def row(table: str, offset: int, **values: Any) -> tuple[Any, ...]:
    """A row in the writer's column order; fact tables get a made-up Kafka source position."""
    columns = TABLE_COLUMNS[table]
    if SOURCE_COLUMNS[0] in columns:
        values.setdefault("src_partition", 0)
        values.setdefault("src_next_offset", offset + 1)
    assert set(values) == set(columns), f"{table}: {set(values) ^ set(columns)}"
    return tuple(values[c] for c in columns)


def seed_rows() -> dict[str, list[tuple[Any, ...]]]:
    rows: dict[str, list[tuple[Any, ...]]] = {}
    kinds = ("view", "add_to_cart", "view", "purchase")
    rows["click_events"] = [
        row("click_events", i, event_id=f"c{i}", ts=ts, ts_ms=ms(ts), user_id=f"u{i % 30}",
            session_id=f"s{i % 50}", click_type=kinds[i % 4], item_id=f"i{i % 17}",
            category="shoes", country=("DE", "FR", "US")[i % 3],
            amount_usd=25.0 if kinds[i % 4] == "purchase" else 0.0,
            segment=("new", "growth")[i % 2], ingested_at=ts + timedelta(seconds=2),
            origin_country="CN" if kinds[i % 4] == "purchase" else "")
        for i in range(CLICKS)
        for ts in [T0 + timedelta(minutes=11 * i)]
    ]  # fmt: skip
    rows["fraud_scores"] = [
        row("fraud_scores", i, txn_id=f"t{i}", user_id=f"u{i % 30}", card_id=f"card{i % 40}",
            merchant_id=f"m{i % 5}", ts=ts, ts_ms=ms(ts), amount=20.0 + i, currency="EUR",
            amount_usd=22.0 + i, score=0.95 if i % 5 == 0 else 0.05 + i / 1000,
            is_alert=int(i % 5 == 0), threshold=0.8, reasons=["velocity", "new_card"],
            model_version="lr@1", billing_country="DE", shipping_country=("DE", "FR")[i % 2],
            ip_country="DE" if i < 40 else "RU", scored_at=ts + timedelta(seconds=1),
            origin_country=("CN", "US")[i % 2])
        for i in range(PAYMENTS)
        for ts in [T0 + timedelta(minutes=47 * i)]
    ]  # fmt: skip
    # A label for every alert (two of three fraud) and for a few legitimate payments.
    labelled = [i for i in range(PAYMENTS) if i % 5 == 0 or i % 7 == 0]
    rows["fraud_label_events"] = [
        row("fraud_label_events", n, event_id=f"l{i}", txn_id=f"t{i}", user_id=f"u{i % 30}",
            label="fraud" if i % 5 == 0 and i % 3 != 0 else "legit", ts=ts, ts_ms=ms(ts),
            source="chargeback", ingested_at=ts + timedelta(seconds=3))
        for n, i in enumerate(labelled)
        for ts in [T0 + timedelta(minutes=47 * i, hours=6)]
    ]  # fmt: skip
    # RELABELLED (settled as legit above) is charged back a day later, and that label was
    # ingested first (a backfill): the latest label by label time is fraud.
    relabel_ts = T0 + timedelta(minutes=47 * RELABELLED, hours=30)
    rows["fraud_label_events"].append(
        row("fraud_label_events", len(labelled), event_id=f"l{RELABELLED}-chargeback",
            txn_id=f"t{RELABELLED}", user_id=f"u{RELABELLED % 30}", label="fraud",
            ts=relabel_ts, ts_ms=ms(relabel_ts), source="chargeback", ingested_at=T0)
    )  # fmt: skip
    scans: list[tuple[Any, ...]] = []
    shipments: list[tuple[Any, ...]] = []
    for i in range(ORDERS):
        carrier = ("dhl", "ups", "fedex")[i % 3]
        dest = "DE" if i < 8 else "US"
        created = T0 + timedelta(hours=2 * i)
        delivered = created + timedelta(days=1, hours=i)
        promised = created + timedelta(days=1, hours=6)
        held = i % 3 == 0
        statuses = [("created", created)]
        if held:
            statuses.append(("customs_hold", created + timedelta(hours=8)))
        statuses.append(("delivered", delivered))
        for status, ts in statuses:
            scans.append(
                row("shipment_events", len(scans), event_id=f"e{i}-{status}", order_id=f"o{i}",
                    user_id=f"u{i}", carrier=carrier, origin_country="CN", dest_country=dest,
                    status=status, ts=ts, ts_ms=ms(ts), promised_ts_ms=ms(promised),
                    location="hub", ingested_at=ts + timedelta(seconds=2))
            )  # fmt: skip
        shipments.append(
            row("shipments", i, order_id=f"o{i}", user_id=f"u{i}", carrier=carrier,
                origin_country="CN", dest_country=dest, created_ts=created,
                completed_ts=delivered, outcome="delivered",
                transit_days=(delivered - created) / timedelta(days=1), has_promise=1,
                on_time=int(delivered <= promised), customs_hours=8.0 + i if held else 0.0,
                failed_attempts=0, returned=0, invalid_transitions=0, version=ms(delivered),
                ingested_at=delivered + timedelta(seconds=2))
        )  # fmt: skip
    rows["shipment_events"] = scans
    rows["shipments"] = shipments
    alerts = [(kind, i) for kind, n in DELAY_ALERTS.items() for i in range(n)]
    rows["logistics_alerts"] = [
        row("logistics_alerts", n, alert_id=f"o{i}:{kind}", kind=kind, order_id=f"o{i}",
            user_id=f"u{i}", ts=ts, ts_ms=ms(ts), carrier=("dhl", "ups", "fedex")[i % 3],
            origin_country="CN", dest_country="DE", predicted_delivery_ts_ms=ms(ts) + 86_400_000,
            promised_ts_ms=ms(ts), reason=f"{kind} on o{i}", ingested_at=ts + timedelta(seconds=2))
        for n, (kind, i) in enumerate(alerts)
        for ts in [T0 + timedelta(hours=2 * i + 9)]
    ]  # fmt: skip
    rows["rec_predictions"] = [
        row("rec_predictions", i, event_id=f"c{i}", ts=ts, ts_ms=ms(ts), user_id=f"u{i % 30}",
            country=("DE", "FR", "US")[i % 3], click_type=("view", "purchase")[i % 2],
            hit_rank=(0, 1, 3, 7, 12, 25)[i % 6], recs_size=20, personalised=int(i % 4 != 0),
            recs_age_ms=1000 * (i % 9), ingested_at=ts + timedelta(seconds=2))
        for i in range(REC_PREDICTIONS)
        for ts in [T0 + timedelta(minutes=13 * i)]
    ]  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def seeded(stack: Settings) -> Iterator[tuple[Settings, dict[str, list[tuple[Any, ...]]]]]:
    """A migrated, isolated database holding the seeded facts (and their rollups)."""
    settings = stack.model_copy(update={"clickhouse_database": f"bf_dash_{uuid.uuid4().hex[:8]}"})
    migrate(settings)
    rows = seed_rows()
    try:
        writer = ClickHouseWriter(settings)
        try:
            for table, table_rows in rows.items():
                writer.add(table, table_rows)
            assert writer.flush(timeout=60), "ClickHouse writer did not flush"
        finally:
            writer.close()
        assert writer.failures == 0, writer.last_error
        assert writer.rows_written == sum(map(len, rows.values()))
        yield settings, rows
    finally:
        client = clickhouse_client(settings)
        try:
            client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        finally:
            client.disconnect()


def clickhouse_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        panel
        for panel in dashboard["panels"]
        if any(t["datasource"]["uid"] == CLICKHOUSE_UID for t in panel.get("targets", []))
    ]


def run_panels(
    settings: Settings, interval_s: int
) -> dict[str, tuple[list[tuple[Any, ...]], list[tuple[str, str]]]]:
    """Panel title -> (rows, column types) of its query."""
    client = clickhouse_client(settings, settings.clickhouse_database)
    results = {}
    failures = []
    try:
        for panel in clickhouse_panels():
            (target,) = panel["targets"]
            sql = expand(target["rawSql"], *RANGE, interval_s, settings.clickhouse_database)
            try:
                results[panel["title"]] = client.execute(sql, with_column_types=True)
            except Exception as exc:  # clickhouse_driver's errors carry the server's message
                failures.append(f"{panel['title']}: {' '.join(str(exc).splitlines()[:2])}")
    finally:
        client.disconnect()
    assert not failures, "queries that ClickHouse 18.16 rejects:\n" + "\n".join(failures)
    return results


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval_s", INTERVALS_S)
def test_every_clickhouse_panel_runs_and_shows_data(
    seeded: tuple[Settings, dict[str, list[tuple[Any, ...]]]], interval_s: int
) -> None:
    settings, _ = seeded
    panels = clickhouse_panels()
    assert len(panels) >= 30
    results = run_panels(settings, interval_s)
    empty = [title for title, (rows, _) in results.items() if not rows]
    assert not empty, f"panels without rows on the seeded data: {empty}"
    for panel in panels:
        rows, columns = results[panel["title"]]
        if panel["type"] == "timeseries":
            # The plugin's time series format needs a DateTime column named time, ascending.
            names = [name for name, _ in columns]
            assert names[0] == "time" and columns[0][1].startswith("DateTime"), panel["title"]
            times = [r[0] for r in rows]
            assert times == sorted(times), f"{panel['title']}: not ordered by time"
            assert any(isinstance(v, int | float) for v in rows[0][1:]), panel["title"]
        if panel["type"] == "stat":
            ((value,),) = rows
            assert isinstance(value, int | float) and math.isfinite(value), (
                f"{panel['title']}: {value!r}"
            )


def test_panels_count_the_seeded_facts(
    seeded: tuple[Settings, dict[str, list[tuple[Any, ...]]]],
) -> None:
    settings, rows = seeded
    results = run_panels(settings, 300)

    def value(title: str) -> Any:
        ((single,),) = results[title][0]
        return single

    facts = sum(len(rows[t]) for t in ("click_events", "fraud_scores", "fraud_label_events"))
    assert value("Events (event time)") == facts + len(rows["shipment_events"])
    assert value("Scored payments") == PAYMENTS
    assert value("Fraud alerts") == ALERTS
    assert value("Alert rate") == pytest.approx(ALERTS / PAYMENTS)
    # Alerts t0, t5, ..., t55 are all labelled; fraud unless the index is a multiple of 3,
    # and RELABELLED's latest label is fraud (its first label, legit, does not count).
    fraud_alerts = sum(1 for i in range(0, PAYMENTS, 5) if i % 3 != 0 or i == RELABELLED)
    assert value("Alert precision (labelled)") == pytest.approx(fraud_alerts / ALERTS)
    # Of the payments whose latest label is fraud, all are alerts.
    assert value("Alert recall (labelled)") == pytest.approx(1.0)
    # Every label event is counted, the relabel too.
    per_hour = results["Fraud label events per hour"][0]
    assert sum(r[2] for r in per_hour) == len(rows["fraud_label_events"])
    assert value("Completed shipments") == ORDERS
    assert value("Predicted-late alerts") == DELAY_ALERTS["predicted_late"]
    assert value("Customs-delay alerts") == DELAY_ALERTS["customs_delay"]
    assert value("Scored clicks") == REC_PREDICTIONS
    ranks = [(0, 1, 3, 7, 12, 25)[i % 6] for i in range(REC_PREDICTIONS)]
    assert value("Hit rate@10") == pytest.approx(sum(1 <= r <= 10 for r in ranks) / len(ranks))
    assert value("MRR@20") == pytest.approx(sum(1 / r for r in ranks if 1 <= r <= 20) / len(ranks))
    assert value("Pipeline delay p95 (clicks)") == pytest.approx(2.0, abs=0.01)

    # Corridors: payments alternate CN -> DE and US -> FR; alerts are every fifth payment.
    corridors = {r[0]: r for r in results["Alerts by corridor"][0]}
    assert set(corridors) == {"CN -> DE", "US -> FR"}
    assert sum(r[2] for r in corridors.values()) == ALERTS
    delay_kinds = {r[1] for r in results["Delay alerts per hour by kind"][0]}
    assert delay_kinds == set(DELAY_ALERTS), "the fraud alerts must stay out of logistics"
    latest = results["Latest delay alerts"][0]
    assert len(latest) == sum(DELAY_ALERTS.values())
    carriers = {r[1] for r in results["On-time rate by carrier"][0]}
    assert carriers == {"dhl", "ups", "fedex"}
    routes = {r[0]: r for r in results["Customs delays by route"][0]}
    assert routes["CN -> DE"][5] == DELAY_ALERTS["customs_delay"]  # joined from the alerts view
    by_day = results["Alert precision by day"][0]
    assert {t.date() for t, *_ in by_day} <= {date(2026, 1, 1), date(2026, 1, 2)}
    assert sum(r[2] for r in by_day) == ALERTS  # one latest label per alert
    assert sum(r[1] * r[2] for r in by_day) == pytest.approx(fraud_alerts)
