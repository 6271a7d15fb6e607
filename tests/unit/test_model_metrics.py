"""Online model metrics rows: filed under the event-time day, in the table's column order."""

from __future__ import annotations

from datetime import UTC, date, datetime

from models.fraud import FraudEngine
from schemas.events import FraudLabelEvent, PaymentEvent
from sinks.clickhouse import TABLE_COLUMNS
from streams.model_metrics import fraud_metric_rows, online_run_id, serving_metric_rows

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def payment(i: int, ts: int) -> PaymentEvent:
    return PaymentEvent(
        event_id=f"t{i}", ts=ts, user_id="u1", card_id="c1", merchant_id="m1",
        amount=10.0 + i, currency="USD",
    )  # fmt: skip


def test_fresh_engine_writes_nothing() -> None:
    assert fraud_metric_rows("app", 0, FraudEngine(), NOW) == []


def test_fraud_rows_carry_the_engine_counters_under_its_event_day() -> None:
    engine = FraudEngine(label_apply_delay_ms=0)
    engine.score([payment(i, T0 + i * 60_000) for i in range(3)])
    engine.add_labels(
        [FraudLabelEvent(event_id="l0", ts=T0 + 1, user_id="u1", txn_id="t0", label="legit")]
    )
    engine.score([payment(9, T0 + 86_400_000 + 5)])  # next day: the label gets applied
    rows = fraud_metric_rows("app", 3, engine, NOW)
    assert all(len(row) == len(TABLE_COLUMNS["model_metrics"]) for row in rows)
    by_metric = {row[4]: row for row in rows}
    assert by_metric["labels_applied"][5] == 1.0 == by_metric["labels_learned"][5]
    assert by_metric["threshold"][5] == engine.threshold
    computed_at, run_id, model, day, _, _, n = by_metric["labels_applied"]
    assert (computed_at, run_id, model, day, n) == (
        NOW,
        online_run_id("app"),
        "fraud-p3",
        date(2026, 1, 2),
        1,
    )


def test_serving_rows_need_an_event_time_and_skip_undefined_errors() -> None:
    assert serving_metric_rows("app", {"items": 5}, {"watermark_ms": 0}, NOW) == []
    rows = serving_metric_rows(
        "app",
        {"items": 5, "lanes": 2, "fbt_items": 1},
        {"watermark_ms": T0, "mae_model_h": None, "mae_baseline_h": 30.5, "predictions_scored": 7},
        NOW,
    )
    values = {(row[2], row[4]): (row[5], row[6]) for row in rows}
    assert values == {
        ("serving", "items"): (5.0, 0),
        ("serving", "lanes"): (2.0, 0),
        ("serving", "fbt_items"): (1.0, 0),
        ("delivery-time", "mae_baseline_h"): (30.5, 7),
    }
    assert {row[3] for row in rows} == {date(2026, 1, 1)}
