"""The agents move the worker's Prometheus metrics (same harness and fakes as test_agents.py)."""

from __future__ import annotations

import pytest

from streams.agents.clicks import process_clicks
from streams.agents.payments import process_payments
from streams.metrics import find_metrics
from tests.agents import test_agents as base

pytestmark = pytest.mark.timeout(30)

harness = base.harness  # the fixture, shared


def value(h: base.Harness, name: str, **labels: str) -> float:
    return h.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_events_deadletters_and_rec_hits_are_counted(harness: base.Harness) -> None:
    assert find_metrics(harness.runtime.topology.app) is harness.runtime.metrics
    t0, minute = base.T0, base.MINUTE
    first = [base.click("m1", t0 + i * minute, item_id=f"item{i}") for i in range(3)]
    invalid = harness.event("clicks", b"{not json", partition=1)
    events = [harness.event("clicks", v) for v in first] + [invalid]
    assert await process_clicks(harness.runtime, events) == 3
    await harness.settle()

    assert value(harness, "borderflow_events_processed_total", topic="clicks") == 3
    assert value(harness, "borderflow_deadletters_total", topic="clicks") == 1

    # The next click of the user is scored against the recs served after the first batch.
    served = harness.redis.state_writes[-1][0]
    recommended = served.recs[0][0] if served.recs else "item0"
    again = base.click("m1", t0 + 10 * minute, item_id=recommended)
    await process_clicks(harness.runtime, [harness.event("clicks", again)])
    predictions = harness.writer.table("rec_predictions")
    assert value(harness, "borderflow_rec_predictions_total") == len(predictions) > 0
    hits = sum(1 for p in predictions if p["hit_rank"] > 0)
    assert value(harness, "borderflow_rec_hits_total") == hits


async def test_payments_feed_fraud_counters_and_model_gauges(harness: base.Harness) -> None:
    events = [
        harness.event("payments", base.payment("p1", base.T0 + i * base.MINUTE)) for i in range(4)
    ]
    events.append(harness.event("payments", {"event_id": "bad"}))
    assert await process_payments(harness.runtime, events) == 4
    assert value(harness, "borderflow_events_processed_total", topic="payments") == 4
    assert value(harness, "borderflow_deadletters_total", topic="payments") == 1
    assert value(harness, "borderflow_fraud_payments_scored_total") == 4
    text = harness.runtime.metrics.exposition().decode()
    assert 'borderflow_fraud_model_info{model_version="' in text
    assert "borderflow_fraud_labels_applied{" in text


async def test_duplicates_are_counted_per_topic(harness: base.Harness) -> None:
    first = base.click("d1", base.T0, item_id="item1")
    await process_clicks(harness.runtime, [harness.event("clicks", first)])
    # The same event again at a new offset (a producer retry): dropped and counted.
    await process_clicks(harness.runtime, [harness.event("clicks", first)])
    await harness.settle()
    text = harness.runtime.metrics.exposition().decode()
    assert 'borderflow_duplicate_events_total{topic="clicks"} 1.0' in text
    assert 'borderflow_duplicate_events_total{topic="payments"} 0.0' in text
