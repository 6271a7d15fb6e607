"""A real worker serves Prometheus metrics and its health on its own web server."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated, start_worker, wait_processed
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import ensure_topics
from tests.integration.test_pipeline import click, payment, send, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int, path: str) -> tuple[int, bytes, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line of a Prometheus text exposition."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_worker_serves_metrics_and_health(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(
        stack,
        "metr",
        clickhouse_database=f"bf_metr_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.2,
    )
    migrate(settings)
    ensure_topics(settings, list(ALL_TOPICS))
    port = free_port()
    worker = start_worker(settings, tmp_path, "worker", web_port=port)
    try:
        user = f"m-{uuid.uuid4().hex[:6]}"
        send(settings, "clicks", *(click(user, f"{user}-c{i}", i) for i in range(3)))
        send(settings, "payments", payment(user, f"{user}-p0", 5, 20.0))
        send(settings, "clicks", b"{not json")
        wait_processed(settings, 4, worker, timeout_s=120)

        def scraped() -> dict[str, float] | None:
            status, body, _ = get(port, "/metrics")
            values = samples(body.decode()) if status == 200 else {}
            done = (
                values.get('borderflow_events_processed_total{topic="clicks"}') == 3
                and values.get('borderflow_deadletters_total{topic="clicks"}') == 1
                and values.get('borderflow_clickhouse_rows_written_total{table="fraud_scores"}')
            )
            return values if done else None

        values = wait_until(scraped, 60, "the worker's metrics to show the events")
        _, _, content_type = get(port, "/metrics")
        assert content_type.startswith("text/plain")
        assert values['borderflow_events_processed_total{topic="payments"}'] == 1
        assert values["borderflow_fraud_payments_scored_total"] == 1
        assert values['borderflow_batch_size_events_count{agent="update_profiles_and_recs"}'] >= 1
        assert values['borderflow_batch_size_events_sum{agent="update_profiles_and_recs"}'] == 4
        assert values['borderflow_batch_duration_seconds_count{agent="score_payments"}'] >= 1
        assert any(k.startswith("borderflow_redis_call_duration_seconds_count{") for k in values)
        assert (
            values.get('borderflow_clickhouse_insert_failures_total{table="fraud_scores"}', 0) == 0
        )
        assert values["borderflow_clickhouse_failing"] == 0
        assigned = sum(
            v for k, v in values.items() if k.startswith("borderflow_assigned_partitions")
        )
        assert assigned == 4 * settings.topic_partitions

        # Everything was processed and committed: the lag drains to zero.
        def lag_drained() -> bool:
            now = samples(get(port, "/metrics")[1].decode())
            lags = {
                k: v for k, v in now.items() if k.startswith("borderflow_consumer_lag_messages{")
            }
            return bool(lags) and all(v == 0 for v in lags.values())

        wait_until(lag_drained, 30, "the consumer lag to drain")

        status, body, _ = get(port, "/health")
        report = json.loads(body)
        assert status == 200, report
        assert report["status"] == "ok" and report["reasons"] == []
        assert report["assigned_partitions"] == 4 * settings.topic_partitions
        assert report["redis"]["ok"] is True
        assert report["clickhouse"]["retrying"] is False
        assert report["deadlettered"] == 1
    finally:
        worker.stop()
        clickhouse_client(settings).execute(
            f"DROP DATABASE IF EXISTS {settings.clickhouse_database}"
        )
