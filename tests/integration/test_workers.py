"""Several workers side by side share the partitions, and together process everything once."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated, per_worker_processed, start_worker, wait_processed
from schemas.config import Settings
from sinks.kafka import ensure_topics
from tests.integration.test_pipeline import TOPICS, click, payment, send, wait_until

pytestmark = pytest.mark.integration


def test_two_workers_share_the_partitions(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack, "two", clickhouse_database=f"bf_two_{uuid.uuid4().hex[:8]}")
    migrate(settings)
    ensure_topics(settings, TOPICS)
    workers = [start_worker(settings, tmp_path, f"worker-{i}") for i in range(2)]
    try:
        users = [f"u-{uuid.uuid4().hex[:6]}" for _ in range(80)]
        # Warm-up rounds until both workers own partitions (the second join rebalances).
        sent = 0
        for round_no in range(60):
            send(settings, "clicks", *[click(u, f"{u}-warm{round_no}", 0) for u in users])
            sent += len(users)
            wait_processed(settings, sent, workers[0], timeout_s=120)
            if len(per_worker_processed(settings)) == 2:
                break
        send(settings, "clicks", *[click(u, f"{u}-{i}", i) for u in users for i in range(1, 6)])
        send(settings, "payments", *[payment(u, f"{u}-p", 30, 15.0) for u in users])
        total = sent + len(users) * 6
        wait_processed(settings, total, workers[0], timeout_s=120)
        assert all(w.process.poll() is None for w in workers)
        counts = per_worker_processed(settings)
        # At-least-once: a batch caught in the rebalance may be counted twice, never lost.
        assert sum(counts.values()) >= total
        assert len(counts) == 2 and all(c > 0 for c in counts.values()), counts
        client = clickhouse_client(settings, settings.clickhouse_database)
        rows = wait_until(
            lambda: client.execute("SELECT count() FROM fraud_scores FINAL")[0][0] == len(users),
            timeout_s=30,
            what="all payments scored once",
        )
        assert rows
        client.execute(f"DROP DATABASE {settings.clickhouse_database}")
    finally:
        for worker in workers:
            worker.stop()
