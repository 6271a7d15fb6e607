"""Shipment tracking on the real local stack: Redis order pages, delay alerts, route KPIs.

One worker serves the module; each test uses its own order and user ids.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from infra.generator import GeneratorConfig, generate_to_list
from infra.migrate import clickhouse_client, migrate
from infra.processes import WorkerProcess, isolated, start_worker, wait_processed
from models.shipments import status_text
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import EventProducer, TopicReader, ensure_topics
from sinks.pseudonym import Pseudonymiser
from tests.integration.test_pipeline import query, redis_read, wait_until

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
DAY = 24 * HOUR


@pytest.fixture(scope="module")
def logistics(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = isolated(
        stack,
        "ship",
        clickhouse_database=f"bf_ship_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.2,
    )
    migrate(settings)
    ensure_topics(settings, list(ALL_TOPICS))
    worker: WorkerProcess = start_worker(settings, tmp_path_factory.mktemp("worker"), "worker")
    try:
        send(settings, scan(f"warm-{uuid.uuid4().hex[:6]}", "warm", "created", T0))
        wait_processed(settings, 1, worker, timeout_s=90)
        yield settings
    finally:
        worker.stop()
        client = clickhouse_client(settings)
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")


def send(settings: Settings, *values: dict[str, Any]) -> None:
    with EventProducer(settings) as producer:
        for value in values:
            producer.send(settings.topic("logistics"), str(value["user_id"]), orjson.dumps(value))
        producer.flush(30)


def scan(user: str, order: str, status: str, ts: int, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": f"{order}-{status}-{ts}",
        "ts": ts,
        "user_id": user,
        "order_id": order,
        "carrier": "dhl_express",
        "origin_country": "CN",
        "dest_country": "DE",
        "status": status,
        **fields,
    }


def shipment(settings: Settings, order_id: str) -> dict[str, str]:
    return redis_read(settings, "read_shipment", order_id)  # type: ignore[no-any-return]


def test_out_of_order_and_repeated_scans_end_in_the_right_order_page(logistics: Settings) -> None:
    user, order = f"u-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    promised = T0 + 6 * DAY
    steps = [
        ("created", 0, "Shenzhen, CN"),
        ("picked", 8, "Shenzhen, CN"),
        ("departed", 20, "Shenzhen, CN"),
        ("arrived_hub", 90, "Frankfurt, DE"),
        ("out_for_delivery", 100, "Madrid, ES"),
    ]
    journey = [
        scan(user, order, status, T0 + h * HOUR, promised_ts=promised, location=place)
        for status, h, place in steps
    ]
    # The pick-up scan comes last (out of order) and the departure scan twice.
    for value in [journey[0], journey[2], journey[3], journey[2], journey[4], journey[1]]:
        send(logistics, value)
    view = wait_until(
        lambda: (v := shipment(logistics, order)) and v.get("status") == "out_for_delivery" and v,
        what="order page",
    )
    # A new user with no profile: English. The last event-time scan wins.
    assert view["status_text"] == status_text("out_for_delivery", "en", "Madrid, ES")
    assert int(view["last_scan_ts"]) == journey[4]["ts"]
    assert (view["promised_ts"], view["invalid_transitions"]) == (str(promised), "0")
    time.sleep(1.0)  # the late pick-up scan is processed by now, and must not move it back
    view = shipment(logistics, order)
    assert view["status"] == "out_for_delivery" and view["location"] == "Madrid, ES"
    rows = query(logistics, f"SELECT count() FROM shipment_events FINAL WHERE order_id = '{order}'")
    assert rows == [(5,)]  # the repeated scan is one fact

    send(logistics, scan(user, order, "delivered", T0 + 104 * HOUR, promised_ts=promised))
    view = wait_until(
        lambda: (v := shipment(logistics, order)) and v.get("status") == "delivered" and v,
        what="delivered",
    )
    assert int(view["delivered_ts"]) == T0 + 104 * HOUR
    [row] = wait_until(
        lambda: query(
            logistics,
            "SELECT outcome, on_time, transit_days FROM shipments FINAL "
            f"WHERE order_id = '{order}'",
        ),
        what="completion row",
    )
    assert row[0] == "delivered" and row[1] == 1
    assert row[2] == pytest.approx(104 / 24, abs=1e-3)


def test_a_delayed_shipment_produces_exactly_one_alert(logistics: Settings) -> None:
    tag = uuid.uuid4().hex[:6]
    # Warm-up: 40 deliveries teach the route: CN -> DE by this carrier takes 8 days.
    history = []
    for k in range(40):
        start = T0 - 60 * DAY + k * HOUR
        user, order = f"h-{tag}-{k}", f"h-{tag}-{k}"
        history += [
            scan(user, order, "created", start),
            scan(user, order, "departed", start + DAY),
            scan(user, order, "arrived_hub", start + 6 * DAY),
            scan(user, order, "delivered", start + 8 * DAY),
        ]
    send(logistics, *history)
    user, order = f"u-{tag}", f"o-{tag}"
    promised = T0 + 3 * DAY  # but the route takes 8 days: late from the first scan on
    late = [
        scan(user, order, "created", T0, promised_ts=promised),
        scan(user, order, "departed", T0 + DAY, promised_ts=promised),
        scan(user, order, "arrived_hub", T0 + 6 * DAY, promised_ts=promised),
    ]
    send(logistics, *late)
    send(logistics, late[1])  # a repeat
    wait_until(
        lambda: shipment(logistics, order).get("status") == "arrived_hub", what="late shipment"
    )
    time.sleep(1.0)
    with TopicReader(logistics, logistics.topic("logistics-alerts")) as reader:
        alerts = [orjson.loads(m.value()) for m in reader.read_until_idle(idle_s=1.5)]
    mine = [a for a in alerts if a["order_id"] == order]
    assert [a["kind"] for a in mine] == ["predicted_late"]
    assert mine[0]["alert_id"] == f"{order}:predicted_late"
    assert mine[0]["predicted_delivery_ts"] > promised == mine[0]["promised_ts"]
    assert float(shipment(logistics, order)["delay_risk"]) > 0.5
    # Analysts see it once in ClickHouse (the repeat did not raise it again), pseudonymised.
    stored = wait_until(
        lambda: query(
            logistics,
            "SELECT alert_id, kind, user_id, carrier, origin_country, dest_country "
            f"FROM alerts WHERE ref_id = '{order}'",
        ),
        what="logistics alert in ClickHouse",
    )
    assert [row[:2] for row in stored] == [(f"{order}:predicted_late", "predicted_late")]
    assert stored[0][2] == Pseudonymiser.from_settings(logistics).pseudonym(user, "user")
    assert stored[0][3:] == (mine[0]["carrier"], mine[0]["origin_country"], mine[0]["dest_country"])


def test_route_kpis_match_the_generated_ground_truth(logistics: Settings) -> None:
    events = [
        e
        for e in generate_to_list(GeneratorConfig(users=300, days=20, seed=5))
        if e.topic == "logistics"
    ]
    tag = uuid.uuid4().hex[:6]
    values = []
    for event in events:
        value = dict(event.value)
        value["order_id"] = f"{tag}-{value['order_id']}"
        value["event_id"] = f"{tag}-{value['event_id']}"
        values.append(value)
    truth = _route_truth(values)
    send(logistics, *values)

    def kpis() -> dict[tuple[str, str, str], tuple[Any, ...]] | None:
        rows = query(
            logistics,
            "SELECT origin_country, dest_country, carrier, count(), "
            "countIf(outcome = 'delivered'), sumIf(on_time, outcome = 'delivered'), "
            "avgIf(transit_days, outcome = 'delivered'), sum(failed_attempts), sum(returned) "
            f"FROM shipments FINAL WHERE order_id LIKE '{tag}-%' "
            "GROUP BY origin_country, dest_country, carrier",
        )
        found = {tuple(r[:3]): tuple(r[3:]) for r in rows}
        done = sum(v[0] for v in found.values())
        return found if done == sum(t[0] for t in truth.values()) else None

    found = wait_until(kpis, timeout_s=120, what="every completed shipment in ClickHouse")
    assert set(found) == set(truth)
    for route, expected in truth.items():
        count, delivered, on_time, mean_days, failed, returns = found[route]
        assert (count, delivered, on_time, failed, returns) == (
            expected[0],
            expected[1],
            expected[2],
            expected[4],
            expected[5],
        ), route
        if delivered:
            assert mean_days == pytest.approx(expected[3], abs=1e-3), route
    # The analysts' view agrees with the table it summarises.
    [(shipments, on_time_rate)] = query(
        logistics,
        "SELECT sum(shipments), sum(on_time) / sum(delivered_with_promise) "
        "FROM route_kpis_daily WHERE (origin_country, dest_country, carrier) IN (SELECT "
        f"origin_country, dest_country, carrier FROM shipments WHERE order_id LIKE '{tag}-%')",
    )
    assert shipments >= sum(t[0] for t in truth.values())
    assert 0.0 <= on_time_rate <= 1.0


def _route_truth(values: list[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[Any, ...]]:
    """Per route: completed orders, delivered, on time, mean transit days, failed attempts,
    returns — computed from the generated scans themselves."""
    orders: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for value in values:
        orders[value["order_id"]].append(value)
    per_route: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, 0, 0, [], 0, 0])
    for scans in orders.values():
        scans.sort(key=lambda v: v["ts"])
        statuses = [v["status"] for v in scans]
        if "delivered" not in statuses and "returned" not in statuses:
            continue  # still in flight at the end of the simulation
        first = scans[0]
        stats = per_route[(first["origin_country"], first["dest_country"], first["carrier"])]
        stats[0] += 1
        stats[4] += statuses.count("failed_attempt")
        stats[5] += int("returned" in statuses)
        if "delivered" in statuses:
            delivered_ts = next(v["ts"] for v in scans if v["status"] == "delivered")
            stats[1] += 1
            promised = first.get("promised_ts")
            stats[2] += int(bool(promised) and delivered_ts <= promised)
            stats[3].append((delivered_ts - first["ts"]) / DAY)
    return {
        route: (s[0], s[1], s[2], sum(s[3]) / len(s[3]) if s[3] else 0.0, s[4], s[5])
        for route, s in per_route.items()
    }


ANALYTICS = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"


def test_every_analytics_query_runs_on_worker_written_tables(logistics: Settings) -> None:
    """The analytics cookbook's SQL runs as written on the tables the worker wrote (its answers
    are checked against known data in test_analytics.py); the all-time shipment queries (no
    window literal) find this module's shipments."""
    queries = re.findall(r"```sql\n(.*?)```", ANALYTICS.read_text(), flags=re.S)
    assert len(queries) >= 12
    for sql in queries:
        rows = query(logistics, sql)
        if "shipment" in sql and "2026-" not in sql:
            assert rows, sql
