"""The fraud model survives a worker restart: a new worker scores with the restored model."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated, start_worker, wait_processed
from models.fraud import FraudModel
from schemas.config import Settings
from sinks.kafka import ensure_topics
from tests.integration.test_pipeline import T0, TOPICS, payment, send, wait_until

pytestmark = pytest.mark.integration


def model_version_of(settings: Settings, txn_id: str) -> str | None:
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        rows = client.execute(
            "SELECT model_version FROM fraud_scores FINAL WHERE txn_id = %(txn)s", {"txn": txn_id}
        )
    finally:
        client.disconnect()
    return rows[0][0] if rows else None


def test_restarted_worker_scores_with_the_restored_model(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(
        stack,
        "life",
        clickhouse_database=f"bf_life_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.2,
        fraud_checkpoint_interval_s=1.0,
    )
    migrate(settings)
    ensure_topics(settings, TOPICS)
    user = f"u-{uuid.uuid4().hex[:6]}"  # one user: one partition, one engine
    payments = [
        payment(user, f"{user}-p{i}", i, 900.0 if i % 10 == 0 else 20.0 + i % 7) for i in range(80)
    ]
    labels = [
        {"event_id": f"{user}-l{i}", "ts": T0 + (100 * 60 + i) * 1000, "user_id": user,
         "txn_id": p["event_id"], "label": "fraud" if p["amount"] > 500 else "legit"}
        for i, p in enumerate(payments)
    ]  # fmt: skip
    trigger = payment(user, f"{user}-trigger", 180, 25.0)  # after label time + apply delay

    first = start_worker(settings, tmp_path, "first")
    try:
        send(settings, "payments", *payments)
        send(settings, "fraud-labels", *labels)
        wait_processed(settings, 160, first, timeout_s=120)
        send(settings, "payments", trigger)
        wait_processed(settings, 161, first, timeout_s=60)
        learned = f"{FraudModel.VERSION}@80"
        assert (
            wait_until(
                lambda: model_version_of(settings, trigger["event_id"]), what="trigger scored"
            )
            == learned
        )
    finally:
        first.stop()  # SIGTERM: the worker checkpoints its engines before it exits

    second = start_worker(settings, tmp_path, "second")
    try:
        later = payment(user, f"{user}-later", 240, 30.0)
        send(settings, "payments", later)
        version = wait_until(
            lambda: model_version_of(settings, later["event_id"]),
            timeout_s=90,
            what="the new worker to score",
        )
        assert version == learned  # restored, not a cold model (@0)
    finally:
        second.stop()
        client = clickhouse_client(settings)
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
