"""Online model metrics: what each model has learned, as ``model_metrics`` rows.

``borderflow eval fraud`` writes offline evaluations to ``model_metrics`` (migration 0002);
the worker writes its live models' state there too, under ``run_id = 'online:{app_id}'``, each
time it checkpoints them. These are gauges ("labels learned so far", "current threshold",
"delivery-time error so far"), one value per (model, event-time day, metric): the table's
ReplacingMergeTree keeps the newest, so rewriting a value after a restart replaces it rather
than counting it twice, and a day's last value stays as its record.

Quality measured against outcomes (alert precision, recommendation hit rate, on-time rate) is
not here: it is computed from the exactly-once facts (docs/analytics.md), which makes it exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from models.fraud import FraudEngine

#: Fraud engine counters written per partition (FraudEngine.stats() names).
FRAUD_METRICS = (
    "labels_applied",
    "labels_timed_out",
    "labels_unknown",
    "labels_duplicate",
    "pending_labels",
    "drifts",
    "threshold",
)
#: Serving model values written per worker (ServingModels.stats() and the logistics engine).
SERVING_METRICS = ("items", "lanes", "fbt_items")
LOGISTICS_METRICS = ("mae_model_h", "mae_baseline_h")


def online_run_id(app_id: str) -> str:
    return f"online:{app_id}"


def _day(watermark_ms: int) -> date:
    return datetime.fromtimestamp(watermark_ms / 1000, UTC).date()


def fraud_metric_rows(
    app_id: str, partition: int, engine: FraudEngine, computed_at: datetime
) -> list[tuple[Any, ...]]:
    """Rows (``model_metrics`` column order) for one partition's fraud engine."""
    if engine.watermark_ms <= 0:
        return []  # nothing scored yet: no event-time day to file the values under
    stats = engine.stats()
    model = engine.model
    values: dict[str, float] = {name: float(stats[name]) for name in FRAUD_METRICS}
    values["labels_learned"] = float(model.labels_learned)
    values["frauds_learned"] = float(model.frauds_learned)
    n = int(model.labels_learned)
    run_id, day = online_run_id(app_id), _day(engine.watermark_ms)
    name = f"fraud-p{partition}"
    return [(computed_at, run_id, name, day, metric, value, n) for metric, value in values.items()]


def serving_metric_rows(
    app_id: str,
    serving_stats: Mapping[str, Any],
    logistics_stats: Mapping[str, Any],
    computed_at: datetime,
) -> list[tuple[Any, ...]]:
    """Rows for the worker's serving models (catalog sizes) and delivery-time predictor."""
    # The serving models have no event-time clock of their own: the delivery-time
    # predictor's watermark (newest scan) dates the values.
    watermark = int(logistics_stats.get("watermark_ms") or 0)
    if watermark <= 0:
        return []
    run_id, day = online_run_id(app_id), _day(watermark)
    rows = [
        (computed_at, run_id, "serving", day, metric, float(serving_stats[metric]), 0)
        for metric in SERVING_METRICS
        if metric in serving_stats
    ]
    scored = int(logistics_stats.get("predictions_scored") or 0)
    for metric in LOGISTICS_METRICS:
        value = logistics_stats.get(metric)
        if value is not None:
            rows.append((computed_at, run_id, "delivery-time", day, metric, float(value), scored))
    return rows
