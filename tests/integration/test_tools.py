"""The operator-facing commands run end to end on the real stack: bench and demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from schemas.config import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def borderflow(settings: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        env={**os.environ, **settings.to_env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_writes_results_for_both_variants(stack: Settings, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    settings = stack.model_copy(update={"stack_dir": tmp_path})
    done = borderflow(settings, "bench", "--events", "3000", "--latency-seconds", "3",
                      "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = orjson.loads(out.read_bytes())
    throughput = results["throughput"]
    assert set(throughput) == {"naive", "batched"}
    for variant in throughput.values():
        assert variant["events"] == 3000
        assert variant["events_per_s"] > 0
    assert results["speedup_vs_naive"] == pytest.approx(
        throughput["batched"]["events_per_s"] / throughput["naive"]["events_per_s"], rel=0.01
    )
    latency = results["latency_half_load"]["click_to_recs_in_redis"]
    assert latency["samples"] > 100
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    assert results["workload"]["mix"]["clicks"] > 0 and results["machine"]["cpus"] >= 1
    assert results["fraud_scoring"]["us_per_payment"] > 0
    assert not results["fraud_scoring"]["model_version"].endswith("@0")


def test_bench_with_tracker_batches_counts_events_and_messages_apart(
    stack: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    settings = stack.model_copy(update={"stack_dir": tmp_path})
    done = borderflow(settings, "bench", "--events", "2000", "--latency-seconds", "2",
                      "--skip-naive", "--events-per-message", "8", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = orjson.loads(out.read_bytes())
    batched = results["throughput"]["batched"]
    assert set(results["throughput"]) == {"batched"} and "speedup_vs_naive" not in results
    workload = results["workload"]
    assert batched["events"] == workload["events"] == 2000
    assert batched["messages"] == workload["messages"] < 2000
    assert batched["messages_per_s"] == pytest.approx(
        batched["events_per_s"] * batched["messages"] / batched["events"], rel=0.01
    )
    assert results["latency_half_load"]["click_to_recs_in_redis"]["samples"] > 20


def test_demo_shows_every_user_group(stack: Settings, tmp_path: Path) -> None:
    settings = stack.model_copy(
        update={"stack_dir": tmp_path, "clickhouse_database": "bf_demo_test",
                "redis_prefix": "demo-test:"}
    )  # fmt: skip
    done = borderflow(settings, "demo", "--users", "150", "--days", "9")
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    for section in ("pipeline", "storefronts: Redis", "risk team", "analysts: ClickHouse"):
        assert f"== {section}" in text
    assert re.search(
        r"recs \((session|profile|popular-country|popular-global), after event (clk|trk)-", text
    )
    assert "price band" in text and "trending in DE: " in text
    assert "recommendation quality online (rec_quality)" in text
    processed = re.search(r"processed ([\d,]+) events; ([\d,]+) events/s", text)
    assert processed, text
    assert int(processed[2].replace(",", "")) > 0  # it waited for this run's worker
    assert "events per topic" in text and "clicks" in text
    assert "worker stopped" in text
