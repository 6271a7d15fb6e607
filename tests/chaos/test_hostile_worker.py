"""Hostile input through Kafka to a real worker (``make chaos``; marked ``chaos``, so the
default ``make test`` run leaves it out, see ``tests/chaos/conftest.py``).

The stream of ``test_hostile_agents.py`` - at least ``BORDERFLOW_CHAOS_EVENTS`` (100,000)
hostile events per input topic around a valid workload, duplicates on every topic - is
produced to the local stack, a ``borderflow worker`` consumes it, and then the test reads
``deadletter`` and the ClickHouse facts. It prints one JSON line:

    hostile-worker {"events_sent": ..., "rejected_expected": ..., "deadletters_found": ...,
                    "lost": ..., "duplicated": ..., "worker_crashes": ..., ...}

``lost``: valid events (event ids; label transaction ids) missing from their fact table.
``duplicated``: fact keys that are not valid events (a hostile event got in) plus dead
letters beyond the expected ones. ``rollup_overcount``: how many more events the
``events_per_minute`` rollup counts than there are distinct facts (duplicates that reach the
facts again are counted again by the materialized views; reported, see the report of issue
7). ``worker_crashes``: 0 when the worker is alive at the end and its log has no traceback.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from infra.hostile import INPUT_TOPICS, Message
from infra.migrate import clickhouse_client, migrate
from infra.processes import WorkerProcess, isolated, processed_total, start_worker
from schemas.config import Settings
from schemas.events import ALL_TOPICS, CLICKS, FRAUD_LABELS, LOGISTICS, PAYMENTS
from sinks.kafka import TopicReader, ensure_topics
from tests.chaos.workload import check_deadletters, schedules, stats_by_topic, valid_workload

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(900)]

HOSTILE_PER_TOPIC = int(os.environ.get("BORDERFLOW_CHAOS_EVENTS", "100000"))
#: Fact table and key column of each input topic's valid events.
FACTS = {
    CLICKS: ("click_events", "event_id"),
    PAYMENTS: ("fraud_scores", "txn_id"),
    FRAUD_LABELS: ("fraud_labels", "txn_id"),
    LOGISTICS: ("shipment_events", "event_id"),
}


@pytest.fixture
def chaos_settings(stack: Settings) -> Iterator[Settings]:
    settings = isolated(
        stack,
        "chaos",
        clickhouse_database=f"bf_chaos_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.5,
    )
    migrate(settings)
    ensure_topics(settings, list(ALL_TOPICS))
    try:
        yield settings
    finally:
        client = clickhouse_client(settings)
        try:
            client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        finally:
            client.disconnect()


def produce(settings: Settings, messages: list[Message]) -> dict[tuple[str, int, int], Message]:
    """Send ``messages`` in order; returns each delivered one by (topic, partition, offset)."""
    placed: dict[tuple[str, int, int], Message] = {}
    failures: list[str] = []
    producer = Producer({
        **settings.confluent_config(),
        "linger.ms": 20,
        "partitioner": "murmur2_random",
        "enable.idempotence": True,  # no duplicates of our own: only the planned ones
        "message.max.bytes": 16 * 1024 * 1024,  # the 10 MiB values must reach the worker
    })  # fmt: skip

    def on_delivery(message: Message) -> Any:
        def report(error: Any, record: Any) -> None:
            if error is not None:
                failures.append(f"{message.topic}: {error}")
            else:
                placed[(record.topic(), record.partition(), record.offset())] = message

        return report

    for message in messages:
        while True:
            try:
                producer.produce(
                    settings.topic(message.topic),
                    message.value,
                    message.key,
                    on_delivery=on_delivery(message),
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(120)
    assert remaining == 0 and not failures, (remaining, failures[:5])
    return placed


def query(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        return client.execute(sql)
    finally:
        client.disconnect()


def fact_keys(settings: Settings) -> dict[str, list[str]]:
    return {
        topic: [row[0] for row in query(settings, f"SELECT {column} FROM {table} FINAL")]
        for topic, (table, column) in FACTS.items()
    }


def read_deadletters(settings: Settings, expected: int, timeout_s: float) -> list[dict[str, Any]]:
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    with TopicReader(settings, settings.topic("deadletter")) as reader:
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = reader.poll(1.0)
            if batch:
                idle_since = time.monotonic()
            letters.extend({"key": m.key(), **orjson.loads(m.value())} for m in batch)
            if len(letters) >= expected and time.monotonic() - idle_since > 3:
                break  # all there, and nothing more for a while
    return letters


def log_problems(path: Path) -> int:
    text = path.read_text(errors="replace")
    return text.count("Traceback (most recent call last)") + text.count("crashed")


def test_hostile_stream_through_a_real_worker(chaos_settings: Settings, tmp_path: Path) -> None:
    settings = chaos_settings
    started = time.monotonic()
    workload = valid_workload()
    _, steps = schedules(workload, HOSTILE_PER_TOPIC, seed=23)
    messages = [message for step in steps for message in step.messages]
    stats = stats_by_topic(steps)
    valid_ids: dict[str, set[str]] = {topic: set() for topic in INPUT_TOPICS}
    for event in workload:
        # Labels are keyed by their transaction in ClickHouse; a payment's txn_id is its id.
        key = event.value["txn_id" if event.topic == FRAUD_LABELS else "event_id"]
        valid_ids[event.topic].add(str(key))
    accepted = sum(s["accepted"] for s in stats.values())
    rejects = sum(s["rejects"] for s in stats.values())

    worker: WorkerProcess = start_worker(settings, tmp_path, "worker")
    exit_code: int | None = None
    try:
        placed = produce(settings, messages)
        produced = time.monotonic()
        # Every valid event (duplicates too) is counted once processed.
        deadline = time.monotonic() + 300
        done = 0
        while time.monotonic() < deadline and worker.process.poll() is None:
            done = processed_total(settings)
            if done >= accepted:
                break
            time.sleep(1.0)
        processed_at = time.monotonic()
        letters = read_deadletters(
            settings, rejects, timeout_s=max(30.0, deadline - time.monotonic())
        )
        # ClickHouse flushes every 0.5 s; give the last rows a moment.
        for _ in range(60):
            keys = fact_keys(settings)
            if all(valid_ids[t] <= set(keys[t]) for t in INPUT_TOPICS):
                break
            time.sleep(1.0)
        alive = worker.process.poll() is None
    finally:
        worker.stop()
        exit_code = worker.process.returncode

    cases, problems = check_deadletters(letters, placed)
    lost = {t: len(valid_ids[t] - set(keys[t])) for t in INPUT_TOPICS}
    foreign = {t: len(set(keys[t]) - valid_ids[t]) for t in INPUT_TOPICS}
    rollup = dict(
        query(settings, "SELECT topic, sum(events) FROM events_per_minute GROUP BY topic")
    )
    overcount = {t: int(rollup.get(t, 0)) - len(set(keys[t])) for t in INPUT_TOPICS}
    crashes = (0 if alive else 1) + log_problems(worker.log_path)
    summary = {
        "events_sent": len(workload) + sum(s["hostile_events"] for s in stats.values()),
        "messages_sent": len(messages),
        "hostile_events": {t: stats[t]["hostile_events"] for t in INPUT_TOPICS},
        "valid_events": len(workload),
        "duplicates_sent": {t: stats[t]["duplicates"] for t in INPUT_TOPICS},
        "rejected_expected": rejects,
        "deadletters_found": len(letters),
        "deadletter_problems": len(problems),
        "cases": len(cases),
        "processed": done,
        "lost": sum(lost.values()),
        "duplicated": sum(foreign.values()) + max(0, len(letters) - rejects),
        "rollup_overcount": overcount,
        "worker_crashes": crashes,
        "worker_alive": alive,
        "worker_exit_code": exit_code,
        "seconds": {
            "produce": round(produced - started, 1),
            "process": round(processed_at - produced, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    print("hostile-worker " + json.dumps(summary))
    assert alive and crashes == 0, f"worker died or logged a traceback; see {worker.log_path}"
    assert done >= accepted, f"processed {done} of {accepted} valid events"
    assert not problems, f"{len(problems)} dead letter problems:\n" + "\n".join(problems[:20])
    assert summary["lost"] == 0, lost
    assert summary["duplicated"] == 0, foreign
