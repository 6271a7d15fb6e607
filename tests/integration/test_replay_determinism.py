"""Event time, not wall clock: the same file replayed at two speeds scores identically.

A generated shop (with chargebacks and settlements, so the fraud model learns during the
run) is written to JSONL, then replayed into two isolated pipelines: once as fast as
possible, once paced. Every transaction must get exactly the same score and model version.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.cli import cli
from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated, start_worker, wait_processed
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import ensure_topics

pytestmark = pytest.mark.integration

TOPICS = list(ALL_TOPICS)


def run_replay(stack: Settings, events_file: Path, n_events: int, rate: int, log_dir: Path):
    settings = isolated(stack, f"det{rate}", clickhouse_database=f"bf_det_{uuid.uuid4().hex[:8]}")
    migrate(settings)
    ensure_topics(settings, TOPICS)
    worker = start_worker(settings, log_dir, f"replay-{rate}")
    try:
        result = CliRunner().invoke(
            cli, ["replay", str(events_file), "--rate", str(rate), "--quiet"], obj=settings
        )
        assert result.exit_code == 0, result.output
        wait_processed(settings, n_events, worker, timeout_s=300)
    finally:
        worker.stop()  # SIGTERM: the worker flushes ClickHouse before it exits
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        rows = client.execute("SELECT txn_id, score, model_version FROM fraud_scores FINAL")
        client.execute(f"DROP DATABASE {settings.clickhouse_database}")
    finally:
        client.disconnect()
    return {txn: (score, version) for txn, score, version in rows}


def test_replays_at_different_speeds_give_identical_scores(stack: Settings, tmp_path: Path) -> None:
    events_file = tmp_path / "shop.jsonl"
    result = CliRunner().invoke(
        cli,
        ["generate", "--users", "300", "--days", "12", "--seed", "5", "--out", str(events_file),
         "--quiet"],
        obj=stack,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = events_file.read_bytes().splitlines()
    n_payments = sum(1 for line in lines if b'"topic":"payments"' in line)

    fast = run_replay(stack, events_file, len(lines), 0, tmp_path)
    paced = run_replay(stack, events_file, len(lines), 4000, tmp_path)

    assert len(fast) == n_payments > 100
    assert fast == paced
    # The comparison means something only if the model learned during the replay.
    versions = {version for _, version in fast.values()}
    assert len(versions) > 10
    assert len({score for score, _ in fast.values()}) > 20
