"""Operator metrics (streams/metrics.py): counters, lag arithmetic, scrape-time gauges, health."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import faust
import pytest
from faust.types import TP

from schemas.config import Settings
from sinks.clickhouse import TABLE_COLUMNS, ClickHouseWriter
from streams.metrics import (
    TimedRedisStore,
    WorkerMetrics,
    consumer_lag,
    health,
    metrics_for,
    observed_batches,
)

pytestmark = pytest.mark.timeout(20)

SETTINGS = Settings(topic_prefix="t1-", app_id="metrics-test")


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def row(table: str, **values: Any) -> tuple[Any, ...]:
    return tuple(values.get(column, 0) for column in TABLE_COLUMNS[table])


def test_counters_move_per_logical_topic() -> None:
    metrics = WorkerMetrics(SETTINGS)
    metrics.count_events("t1-clicks", 3)
    metrics.count_events("t1-clicks", 2)
    metrics.count_events("t1-payments", 0)
    metrics.count_deadletter("t1-payments")
    assert sample(metrics, "borderflow_events_processed_total", topic="clicks") == 5
    assert sample(metrics, "borderflow_events_processed_total", topic="payments") is None
    assert sample(metrics, "borderflow_deadletters_total", topic="payments") == 1
    text = metrics.exposition().decode()
    assert 'borderflow_events_processed_total{topic="clicks"} 5.0' in text


def test_every_app_has_its_own_registry() -> None:
    first, second = faust.App("metrics-a"), faust.App("metrics-b")
    a = metrics_for(first, SETTINGS)
    assert metrics_for(first, SETTINGS) is a
    b = metrics_for(second, SETTINGS)
    assert a is not b and a.registry is not b.registry
    a.count_events("t1-clicks")
    assert sample(b, "borderflow_events_processed_total", topic="clicks") is None


def test_rows_feed_recs_hit_rate_and_fraud_alerts() -> None:
    metrics = WorkerMetrics(SETTINGS)
    metrics.observe_rows(
        {
            "rec_predictions": [
                row("rec_predictions", hit_rank=3),
                row("rec_predictions", hit_rank=0),
                row("rec_predictions", hit_rank=1),
            ],
            "fraud_scores": [row("fraud_scores", is_alert=1), row("fraud_scores", is_alert=0)],
            "events_per_minute": [],
        }
    )
    assert sample(metrics, "borderflow_rec_predictions_total") == 3
    assert sample(metrics, "borderflow_rec_hits_total") == 2
    assert sample(metrics, "borderflow_fraud_payments_scored_total") == 2
    assert sample(metrics, "borderflow_fraud_alerts_total") == 1


class FakeConsumer:
    def __init__(self) -> None:
        self.assigned = {TP("t1-clicks", 0), TP("t1-clicks", 1), TP("t1-payments", 2)}
        self.assigned |= {TP("t1-user_profiles-changelog", 0)}
        self.highwaters: dict[TP, int | None] = {
            TP("t1-clicks", 0): 100,
            TP("t1-clicks", 1): None,  # not fetched yet
            TP("t1-payments", 2): 7,
            TP("t1-user_profiles-changelog", 0): 50,
        }
        self._committed_offset: dict[TP, int | None] = {TP("t1-clicks", 0): 60}
        self._read_offset: dict[TP, int | None] = {TP("t1-clicks", 0): 89}

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


def test_lag_is_highwater_minus_committed_and_read_positions() -> None:
    lags = consumer_lag(FakeConsumer(), ["t1-clicks", "t1-payments"])
    assert [(lag.topic, lag.partition) for lag in lags] == [("t1-clicks", 0), ("t1-payments", 2)]
    clicks, payments = lags
    assert clicks.committed_lag == 40  # 100 - 60
    assert clicks.read_lag == 10  # 100 - (89 + 1)
    # Nothing committed or read yet: everything from the start is lag.
    assert payments.committed_lag == 7 and payments.read_lag == 7


def test_lag_of_a_consumer_that_is_not_started_is_empty() -> None:
    class NotStarted:
        def assignment(self) -> set[TP]:
            raise RuntimeError("no consumer yet")

    assert consumer_lag(NotStarted(), ["t1-clicks"]) == []


class FakeEngine:
    def stats(self) -> dict[str, Any]:
        return {
            "model_version": "v3",
            "labels_applied": 12,
            "pending_labels": 2,
            "drifts": 1,
            "threshold": 0.8,
        }


class FakeLogistics:
    def stats(self) -> dict[str, Any]:
        return {"mae_model_h": 5.5, "mae_baseline_h": 9.25, "predictions_scored": 40}


class FakeRedis:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.client = self

    async def ping(self) -> bool:
        if self.fail:
            raise ConnectionError("refused")
        return True


def fake_runtime(metrics: WorkerMetrics, *, redis_fails: bool = False, writer: Any = None) -> Any:
    runtime = SimpleNamespace(
        settings=SETTINGS,
        topology=SimpleNamespace(app=SimpleNamespace(_consumer=FakeConsumer())),
        _clickhouse=writer,
        fraud_engines={2: FakeEngine()},
        serving=SimpleNamespace(logistics=FakeLogistics()),
        redis=FakeRedis(fail=redis_fails),
        deadlettered=4,
        metrics=metrics,
    )
    metrics.runtime = cast(Any, runtime)
    return runtime


def test_scrape_computes_lag_buffer_and_model_gauges() -> None:
    metrics = WorkerMetrics(SETTINGS)
    writer = SimpleNamespace(buffered_rows=30, _max_buffered=1000, retrying=True)
    fake_runtime(metrics, writer=writer)
    lag = "borderflow_consumer_lag_messages"
    assert sample(metrics, lag, topic="clicks", partition="0") == 40
    assert sample(metrics, lag, topic="payments", partition="2") == 7
    assert sample(metrics, "borderflow_consumer_fetch_lag_messages", topic="clicks", partition="0")
    assert sample(metrics, "borderflow_assigned_partitions", topic="clicks") == 2
    assert sample(metrics, "borderflow_assigned_partitions", topic="logistics") == 0
    assert sample(metrics, "borderflow_clickhouse_buffered_rows") == 30
    assert sample(metrics, "borderflow_clickhouse_buffer_capacity_rows") == 1000
    assert sample(metrics, "borderflow_clickhouse_failing") == 1
    assert sample(metrics, "borderflow_fraud_model_info", partition="2", model_version="v3") == 1
    assert sample(metrics, "borderflow_fraud_labels_applied", partition="2") == 12
    assert sample(metrics, "borderflow_fraud_threshold", partition="2") == 0.8
    assert sample(metrics, "borderflow_logistics_mae_hours", predictor="model") == 5.5
    assert sample(metrics, "borderflow_logistics_mae_hours", predictor="baseline") == 9.25
    assert sample(metrics, "borderflow_logistics_predictions_scored") == 40
    assert b"borderflow_consumer_lag_messages{" in metrics.exposition()


async def test_health_is_ok_when_everything_answers() -> None:
    metrics = WorkerMetrics(SETTINGS)
    writer = SimpleNamespace(
        buffered_rows=0, _max_buffered=1000, retrying=False, failures=0, last_error=None
    )
    result = await health(fake_runtime(metrics, writer=writer))
    assert result["status"] == "ok", result
    assert result["reasons"] == []
    assert result["assigned_partitions"] == 3
    assert result["redis"]["ok"] is True
    assert result["clickhouse"]["buffered_rows"] == 0


async def test_health_is_degraded_with_reasons() -> None:
    metrics = WorkerMetrics(SETTINGS)
    writer = SimpleNamespace(
        buffered_rows=1000, _max_buffered=1000, retrying=True, failures=3, last_error="boom"
    )
    runtime = fake_runtime(metrics, redis_fails=True, writer=writer)
    runtime.topology.app._consumer.assigned = set()
    crashed = SimpleNamespace(crashed=True, crash_reason=AssertionError("no current event"))
    runtime.topology.app.agents = {
        "streams.agents.clicks.update_profiles_and_recs": SimpleNamespace(_actors=[crashed]),
        "streams.agents.payments.score_payments": SimpleNamespace(
            _actors=[SimpleNamespace(crashed=False, crash_reason=None)]
        ),
    }
    result = await health(runtime)
    assert result["status"] == "degraded"
    assert result["crashed_agents"] == {
        "update_profiles_and_recs": "AssertionError: no current event"
    }
    text = " | ".join(result["reasons"])
    assert "agent update_profiles_and_recs crashed" in text
    assert "no input partitions" in text
    assert "ClickHouse inserts failing: boom" in text
    assert "buffer full" in text
    assert "Redis unreachable" in text


async def test_redis_calls_are_timed_per_operation() -> None:
    metrics = WorkerMetrics(SETTINGS)

    class Store:
        prefix = "bf:"

        async def write_user_states(self, states: list[Any]) -> int:
            await asyncio.sleep(0)
            return len(states)

    timed = TimedRedisStore(Store(), metrics.redis_seconds)
    assert await timed.write_user_states([1, 2]) == 2
    assert timed.prefix == "bf:"
    name = "borderflow_redis_call_duration_seconds_count"
    assert sample(metrics, name, operation="write_user_states") == 1


async def test_observed_batches_record_sizes_and_close_the_source() -> None:
    metrics = WorkerMetrics(SETTINGS)
    closed = asyncio.Event()

    async def source() -> AsyncIterator[list[Any]]:
        try:
            for size in (3, 1, 5):
                yield list(range(size))
        finally:
            closed.set()

    batches = observed_batches(source(), metrics, "score_payments")
    seen = []
    async for batch in batches:
        seen.append(len(batch))
        if len(seen) == 2:
            break
    await cast(Any, batches).aclose()
    assert seen == [3, 1]
    assert closed.is_set()
    assert sample(metrics, "borderflow_batch_size_events_count", agent="score_payments") == 2
    assert sample(metrics, "borderflow_batch_size_events_sum", agent="score_payments") == 4
    # The second batch's processing time is observed when the next one is asked for (never).
    assert sample(metrics, "borderflow_batch_duration_seconds_count", agent="score_payments") == 1


class FlakyClient:
    def __init__(self, failures: list[int]) -> None:
        self.failures = failures

    def execute(self, query: str, data: Any = None, columnar: bool = False) -> None:
        if self.failures[0] > 0:
            self.failures[0] -= 1
            raise ConnectionError("ClickHouse went away")

    def disconnect(self) -> None:
        pass


def test_clickhouse_writer_reports_inserts_and_retries() -> None:
    metrics = WorkerMetrics(SETTINGS)
    failures = [1]
    writer = ClickHouseWriter(
        Settings(clickhouse_flush_rows=1, clickhouse_flush_interval_s=0.05),
        client_factory=lambda: FlakyClient(failures),
        observer=metrics,
    )
    durable = threading.Event()
    try:
        rows = [row("fraud_label_events"), row("fraud_label_events")]
        writer.add("fraud_label_events", rows, durable.set)
        assert durable.wait(10)
    finally:
        writer.close()
    assert writer.retrying is False
    assert (
        sample(metrics, "borderflow_clickhouse_rows_written_total", table="fraud_label_events") == 2
    )
    assert (
        sample(metrics, "borderflow_clickhouse_insert_failures_total", table="fraud_label_events")
        == 1
    )
    count = "borderflow_clickhouse_insert_duration_seconds_count"
    assert sample(metrics, count, table="fraud_label_events") == 1
