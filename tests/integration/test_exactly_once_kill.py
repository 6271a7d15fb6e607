"""Exactly-once ClickHouse facts and rollups across repeated SIGKILLs of the worker.

A known set of events is sent in four waves; after each of the first three the worker is
killed with SIGKILL while rows are still buffered (and offsets uncommitted), then restarted.
At the end every fact count and every rollup equals the truth computed from the events
themselves: nothing lost, nothing counted twice - without FINAL.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated, processed_total, start_worker
from models.fx import to_usd
from schemas.config import Settings
from sinks.kafka import ensure_topics
from tests.integration.test_pipeline import TOPICS, send, wait_until

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000


def known_events(tag: str) -> dict[str, list[dict[str, Any]]]:
    """Clicks (views and purchases), payments, labels and scans of 30 users over 3 hours."""
    countries = ["DE", "FR", "US"]
    clicks, payments, labels, scans = [], [], [], []
    for u in range(30):
        user = f"{tag}-u{u}"
        country = countries[u % 3]
        for i in range(20):
            ts = T0 + (u * 7 + i * 9) * MINUTE
            value = {
                "event_id": f"{user}-c{i}",
                "ts": ts,
                "user_id": user,
                "session_id": f"{user}-s{i // 10}",
                "type": "purchase" if i % 10 == 9 else "view",
                "item_id": f"i{(u + i) % 40}",
                "category": "shoes",
                "country": country,
                "price": 20.0 + i,
                "currency": "EUR",
            }
            clicks.append(value)
        for i in range(2):
            txn = f"{user}-p{i}"
            payments.append({
                "event_id": txn, "ts": T0 + (u * 5 + i * 40) * MINUTE, "user_id": user,
                "card_id": f"card-{user}", "merchant_id": "m1", "amount": 30.0 + i,
                "currency": "USD", "billing_country": country, "ip_country": country,
            })  # fmt: skip
            if i == 0:
                labels.append({
                    "event_id": f"{txn}-l", "ts": T0 + (u * 5 + 60) * MINUTE, "user_id": user,
                    "txn_id": txn, "label": "legit" if u % 4 else "fraud",
                })  # fmt: skip
        for k, status in enumerate(("created", "picked", "departed")):
            scans.append({
                "event_id": f"{user}-s{k}", "ts": T0 + (u * 3 + k * 30) * MINUTE, "user_id": user,
                "order_id": f"{user}-o", "carrier": "dhl", "origin_country": "CN",
                "dest_country": country, "status": status,
            })  # fmt: skip
    return {"clicks": clicks, "payments": payments, "fraud-labels": labels, "logistics": scans}


def rollup_truth(events: dict[str, list[dict[str, Any]]]) -> tuple[Counter[Any], Counter[Any]]:
    """(events per minute, topic, type, country) and (purchases per hour and country)."""
    per_minute: Counter[Any] = Counter()
    purchases: Counter[Any] = Counter()
    for click in events["clicks"]:
        per_minute[(click["ts"] // MINUTE * 60, "clicks", click["type"], click["country"])] += 1
        if click["type"] == "purchase":
            purchases[(click["ts"] // 3_600_000 * 3600, click["country"])] += 1
    for payment in events["payments"]:
        per_minute[
            (payment["ts"] // MINUTE * 60, "payments", "payment", payment["ip_country"])
        ] += 1
    for label in events["fraud-labels"]:
        per_minute[(label["ts"] // MINUTE * 60, "fraud-labels", label["label"], "")] += 1
    for scan in events["logistics"]:
        per_minute[
            (scan["ts"] // MINUTE * 60, "logistics", scan["status"], scan["dest_country"])
        ] += 1
    return per_minute, purchases


def rollup_mismatches(
    query: Callable[[str], list[tuple[Any, ...]]],
    events: dict[str, list[dict[str, Any]]],
    revenue_usd: float,
) -> dict[str, int]:
    """Per rollup, the groups that differ from the truth of ``events`` (0 everywhere: exact);
    ``query`` runs SQL on the run's database, ``revenue_usd`` is the purchases' true sum."""
    per_minute, purchases = rollup_truth(events)
    per_hour: Counter[Any] = Counter()
    for (minute, topic, kind, country), n in per_minute.items():
        per_hour[(minute // 3600 * 3600, topic, kind, country)] += n

    def differing(sql: str, truth: Counter[Any], width: int) -> int:
        got = Counter({tuple(r[:width]): int(r[width]) for r in query(sql)})
        return sum(1 for key in set(got) | set(truth) if got.get(key, 0) != truth.get(key, 0))

    mismatches = {}
    for table, grain, truth in (
        ("events_per_minute", "minute", per_minute),
        ("events_per_hour", "hour", per_hour),
        ("activity_per_minute", "minute", per_minute),
        ("activity_per_hour", "hour", per_hour),
    ):
        mismatches[table] = differing(
            f"SELECT toUInt32({grain}), topic, event_type, country, sum(events) "
            f"FROM {table} GROUP BY {grain}, topic, event_type, country",
            truth,
            4,
        )
    mismatches["segment_mix_per_hour"] = differing(
        "SELECT toUInt32(hour), country, sum(purchases) FROM segment_mix_per_hour "
        "GROUP BY hour, country",
        purchases,
        2,
    )
    [(revenue,)] = query("SELECT sum(amount_usd) FROM events_per_minute WHERE topic = 'clicks'")
    off = abs(float(revenue) - revenue_usd) > 1e-6 * max(1.0, revenue_usd)
    mismatches["revenue_usd"] = int(off)
    return mismatches


def test_counts_and_rollups_are_exact_after_three_sigkills(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(
        stack,
        "once",
        clickhouse_database=f"bf_once_{uuid.uuid4().hex[:8]}",
        # Rows reach ClickHouse quickly but offsets are committed rarely: every kill makes the
        # next worker process again events whose rows are already stored (and some whose
        # rows were still buffered). Without the written positions this test fails (checked
        # by disabling them).
        clickhouse_flush_interval_s=0.3,
        broker_commit_interval_s=8.0,
        batch_max_events=100,
    )
    migrate(settings)
    ensure_topics(settings, TOPICS)
    events = known_events(uuid.uuid4().hex[:6])
    total = sum(len(values) for values in events.values())
    waves = 4
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        for wave in range(waves):
            worker = start_worker(settings, tmp_path, f"worker-{wave}")
            for topic, values in events.items():
                share = len(values) // waves
                chunk = values[wave * share : None if wave == waves - 1 else (wave + 1) * share]
                send(settings, topic, *chunk)
            if wave < waves - 1:
                # Kill it mid-stream: once it is processing this wave, before the rows flush.
                seen = processed_total(settings)
                try:
                    wait_until(
                        lambda seen=seen: processed_total(settings) > seen,
                        timeout_s=90,
                        what=f"wave {wave} being processed",
                    )
                    time.sleep(1.5)
                finally:  # also when the wait failed: no worker outlives the test
                    worker.process.send_signal(signal.SIGKILL)
                    worker.process.wait(10)
                continue

            def facts_complete() -> bool:
                counts = {
                    table: client.execute(f"SELECT count() FROM {table}")[0][0]
                    for table in (
                        "click_events",
                        "fraud_scores",
                        "fraud_label_events",
                        "shipment_events",
                    )
                }
                return counts == {
                    "click_events": len(events["clicks"]),
                    "fraud_scores": len(events["payments"]),
                    "fraud_label_events": len(events["fraud-labels"]),
                    "shipment_events": len(events["logistics"]),
                }

            try:
                wait_until(facts_complete, timeout_s=120, what="every fact in ClickHouse")
                time.sleep(4.0)  # a late duplicate would have been flushed by now
            finally:
                worker.stop()

        # Facts: exact counts without FINAL, each event once.
        for table, key, topic in (
            ("click_events", "event_id", "clicks"),
            ("fraud_scores", "txn_id", "payments"),
            ("fraud_label_events", "event_id", "fraud-labels"),
            ("shipment_events", "event_id", "logistics"),
        ):
            [(count, distinct)] = client.execute(f"SELECT count(), uniqExact({key}) FROM {table}")
            assert count == distinct == len(events[topic]), table

        # Rollups: every (minute, topic, type, country) equals the truth, and the hourly ones.
        per_minute, purchases = rollup_truth(events)
        rows = client.execute(
            "SELECT toUInt32(minute), topic, event_type, country, sum(events) "
            "FROM events_per_minute GROUP BY minute, topic, event_type, country"
        )
        assert Counter({tuple(r[:4]): r[4] for r in rows}) == per_minute
        per_hour: Counter[Any] = Counter()
        for (minute, topic, kind, country), n in per_minute.items():
            per_hour[(minute // 3600 * 3600, topic, kind, country)] += n
        rows = client.execute(
            "SELECT toUInt32(hour), topic, event_type, country, sum(events) "
            "FROM events_per_hour GROUP BY hour, topic, event_type, country"
        )
        assert Counter({tuple(r[:4]): r[4] for r in rows}) == per_hour
        # The corridor/carrier/segment rollups hold the same counts on those dimensions.
        for grain, truth in (("minute", per_minute), ("hour", per_hour)):
            rows = client.execute(
                f"SELECT toUInt32({grain}), topic, event_type, country, sum(events) "
                f"FROM activity_per_{grain} GROUP BY {grain}, topic, event_type, country"
            )
            assert Counter({tuple(r[:4]): r[4] for r in rows}) == truth, grain
        rows = client.execute(
            "SELECT toUInt32(hour), country, sum(purchases) FROM segment_mix_per_hour "
            "GROUP BY hour, country"
        )
        assert Counter({tuple(r[:2]): r[2] for r in rows}) == purchases
        [(revenue,)] = client.execute(
            "SELECT sum(amount_usd) FROM events_per_minute WHERE topic = 'clicks'"
        )
        expected = sum(
            to_usd(c["price"], c["currency"]) or 0.0
            for c in events["clicks"]
            if c["type"] == "purchase"
        )
        assert revenue == pytest.approx(expected)
        assert total == sum(per_minute.values())
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        client.disconnect()
