"""Dependency outages mid-stream (issue 7, item 2; ``make chaos`` only: marked ``chaos``, see
``tests/chaos/conftest.py``).

A generated shop (fixed seed, payments with fraud) is replayed paced (``borderflow replay FILE
--rate R``) into an isolated namespace with one worker. The shop's own fraud raises few alerts
until the model has learned from days of labels (9 of 4,879 payments in a 232k-event run, none
in the first 3 minutes), so a card-testing attack is merged into the file every
``BORDERFLOW_OUTAGE_ATTACK_EVERY_S`` (5) seconds of replay: the fraud rules alert on each at
once, and the alerts show whether scoring and alerting go on. Mid-stream Redis is stopped
for 30 s and later ClickHouse for 60 s, through ``LocalStack.down/up`` of the running stack
(local Redis keeps its data in an append-only file). The claim under test:

* scoring and alerting go on during both outages (fraud alerts reach ``fraud-alerts`` with
  Kafka timestamps inside each window) - while the ClickHouse writer's buffer has room: once
  it is full, backpressure pauses every agent's intake;
* ClickHouse inserts are retried with backoff, the buffer stays bounded and intake pauses
  instead of dropping rows or growing - also for a partition whose first event arrives
  during the outage (its first batch reads the partition's written positions from
  ClickHouse): label streams are sparse, so the ClickHouse outage is placed to begin 5 s
  before the last fraud-labels partition gets its first label, when the stream allows;
* afterwards each sink catches up with everything sent before and during its outage, and
  in the end nothing is lost or doubled: every fact once (without FINAL), exact rollups,
  every user's Redis state at the user's last event, every alert's fact row, no dead letter,
  and the worker never died nor logged a traceback.

It prints one JSON line, ``outages {...}``: events sent, per outage its window (seconds after
the replay started), alerts, payments scored and fact rows written within it, ClickHouse
insert retries, catch-up seconds of both sinks from the moment the service answered again
(``catchup_s`` is the stopped service's own sink), the worker's RSS before the outages and
its peak (VmHWM), and the final lost / duplicated / crash counts. How each sink's expected
content is known is explained in ``tests/chaos/outages.py``.

Knobs (environment, ``BORDERFLOW_OUTAGE_*``): ``RATE`` (600 events/s: one worker on the
2-core build machine tops out near 930, so 800 leaves it almost no room to catch up),
``LEAD_S`` (60: replay before the Redis outage), ``REDIS_S`` (30), ``GAP_S`` (60: from Redis
back to the ClickHouse outage, at least until Redis caught up; unless the outage is placed at
a partition's first event, see above), ``CLICKHOUSE_S`` (60), ``TAIL_S`` (60: replay after
ClickHouse is back), ``FLUSH_ROWS`` (2,000: the writer buffers 20x that, which a 60 s outage
fills, so backpressure engages), ``SEED`` (7), ``FRAUD_RATE`` (0.05), ``ATTACK_EVERY_S`` (5),
``CATCHUP_TIMEOUT_S`` (300). ``REDIS_S=0`` or ``CLICKHOUSE_S=0`` leaves that outage out.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from infra.migrate import clickhouse_client, migrate
from infra.processes import WorkerProcess, isolated, start_worker
from infra.stack import LocalStack
from models.fx import to_usd
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import ensure_topics
from tests.chaos.outages import (
    FACTS,
    INPUT_TOPICS,
    PROBE_PREFIX,
    BrokerMarks,
    Sampler,
    Shop,
    Watermarks,
    add_card_testing,
    backpressure_report,
    borderflow,
    delta,
    facts_behind,
    health,
    log_problems,
    memory_kib,
    misplaced,
    read_topic,
    redis_behind,
    redis_meta,
)
from tests.integration.test_exactly_once_kill import rollup_mismatches

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(2700)]


def _knob(name: str, default: float) -> float:
    return float(os.environ.get(f"BORDERFLOW_OUTAGE_{name}", default))


RATE = _knob("RATE", 600)
LEAD_S = _knob("LEAD_S", 60)
REDIS_S = _knob("REDIS_S", 30)
GAP_S = _knob("GAP_S", 60)
CLICKHOUSE_S = _knob("CLICKHOUSE_S", 60)
TAIL_S = _knob("TAIL_S", 60)
FLUSH_ROWS = int(_knob("FLUSH_ROWS", 2000))
SEED = int(_knob("SEED", 7))
FRAUD_RATE = _knob("FRAUD_RATE", 0.05)
CATCHUP_TIMEOUT_S = _knob("CATCHUP_TIMEOUT_S", 300)
#: A card-testing attack (alerted by the fraud rules) every this many seconds of replay.
ATTACK_EVERY_S = _knob("ATTACK_EVERY_S", 5)
#: Enough events to keep the replay going through the whole schedule (+ stop/start time).
EVENTS = int(RATE * (LEAD_S + REDIS_S + GAP_S + CLICKHOUSE_S + TAIL_S + 20))
#: The generator's shop makes about 78 events per user over 10 days.
USERS = max(100, EVENTS // 78)


@pytest.fixture
def outage_settings(stack: Settings) -> Iterator[Settings]:
    settings = isolated(
        stack,
        "outage",
        clickhouse_database=f"bf_outage_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_rows=FLUSH_ROWS,
    )
    migrate(settings)
    ensure_topics(settings, list(ALL_TOPICS))
    try:
        yield settings
    finally:
        LocalStack(settings).up()  # whatever happened, the stack is whole again
        client = clickhouse_client(settings)
        try:
            client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        finally:
            client.disconnect()
        store = redis.Redis.from_url(settings.redis_url, **settings.redis_credentials())
        try:
            keys = list(store.scan_iter(match=f"{settings.redis_prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                store.delete(*keys[start : start + 1000])
        finally:
            store.close()


class Run:
    """The live run: the worker, the observers and the clocks."""

    def __init__(self, settings: Settings, shop: Shop, worker: WorkerProcess) -> None:
        self.settings = settings
        self.shop = shop
        self.worker = worker
        self.port = settings.worker_web_port
        self.stack = LocalStack(settings)
        self.marks = BrokerMarks(settings)
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            **settings.redis_credentials(),
        )
        self.clickhouse = clickhouse_client(settings, settings.clickhouse_database)
        self.sampler = Sampler(worker.process.pid, self.port)
        self.started = time.time()
        #: When the worker was first seen dead (None: alive so far).
        self.died_at: float | None = None

    def alive(self) -> bool:
        if self.worker.process.poll() is not None and self.died_at is None:
            self.died_at = time.time()
        return self.died_at is None

    def rel(self, at: float) -> float:
        return round(at - self.started, 1)

    def sleep_until(self, at: float) -> None:
        while (left := at - time.time()) > 0 and self.alive():
            time.sleep(min(left, 1.0))

    def wait_ready(self, timeout_s: float = 240) -> None:
        """Until the worker owns every input partition (it joined its group)."""
        wanted = len(INPUT_TOPICS) * self.settings.topic_partitions
        deadline = time.time() + timeout_s
        while time.time() < deadline and self.alive():
            report = health(self.port)
            if report is not None and report.get("assigned_partitions", 0) >= wanted:
                return
            time.sleep(1.0)
        raise AssertionError(f"worker not ready in {timeout_s:.0f}s; see {self.worker.log_path}")

    def catch_up(self, marks: Watermarks, since: float, timeout_s: float) -> dict[str, Any]:
        """Seconds from ``since`` until each sink holds every event below ``marks``."""
        due = self.shop.redis_due(marks)
        done: dict[str, float | None] = {"clickhouse": None, "redis": None}
        behind: dict[str, Any] = {}
        deadline = since + timeout_s
        while self.alive():
            now = time.time()
            if done["clickhouse"] is None:
                try:
                    facts = facts_behind(self.clickhouse, marks)
                except Exception as exc:  # noqa: BLE001 - still restarting: not caught up
                    behind["clickhouse"] = f"{type(exc).__name__}: {exc}"[:200]
                else:
                    behind["clickhouse"] = facts
                    if not any(facts.values()):
                        done["clickhouse"] = round(now - since, 1)
            if done["redis"] is None:
                try:
                    users = redis_behind(self.redis, self.settings.redis_prefix, due)
                except redis.RedisError as exc:
                    behind["redis"] = f"{type(exc).__name__}: {exc}"[:200]
                else:
                    behind["redis"] = {"users_behind": users, "users": len(due)}
                    if users == 0:
                        done["redis"] = round(now - since, 1)
            if all(value is not None for value in done.values()) or now > deadline:
                break
            time.sleep(1.0)
        result: dict[str, Any] = {"catchup_all_s": done}
        stuck = {sink: behind[sink] for sink, value in done.items() if value is None}
        if stuck:
            result["not_caught_up"] = stuck
        return result

    def clickhouse_start(self, earliest: float) -> tuple[float, str | None]:
        """When to stop ClickHouse: 5 s before the input partition that starts last gets its
        first event (a fraud-labels partition, days into the shop), so that a partition's
        first batch - which reads its written positions from ClickHouse - meets the outage;
        else (it comes too early or too late in the stream) at ``earliest``."""
        topic, partition, index = self.shop.last_partition_start()
        start = self.started + index / RATE - 5
        latest = self.started + len(self.shop.events) / RATE - CLICKHOUSE_S - TAIL_S / 2
        if time.time() + 10 <= start <= latest:
            return start, f"first event of {topic}:{partition}"
        return earliest, None

    def outage(self, service: str, seconds: float) -> dict[str, Any]:
        """Stop ``service`` for ``seconds``, start it again, and measure the catch-up."""
        marks_before = self.marks.read()
        at_stop = self.sampler.take()
        called = time.time()
        try:
            self.stack.down([service])
            gone = time.time()
            self.sleep_until(gone + seconds)
        finally:
            self.stack.up([service])
        back = time.time()
        at_back = self.sampler.take()
        rss_at_back = at_back.memory.get("VmRSS")
        marks = self.marks.read()
        entry: dict[str, Any] = {
            "service": service,
            # The window: from the stop request (SIGTERM) until the service answers again.
            "start_s": self.rel(called),
            "end_s": self.rel(back),
            "stopping_s": round(gone - called, 1),
            "down_s": round(back - gone, 1),
            "events_sent_by_end": self.shop.sent_by(marks),
            # Input partitions whose first event was sent during the outage.
            "partitions_started": [
                f"{topic}:{partition}"
                for (topic, partition), mark in sorted(marks.items())
                if mark and not marks_before.get((topic, partition))
            ],
            "events_processed": _int(delta(at_stop, at_back, "borderflow_events_processed_total")),
            "payments_scored": _int(
                delta(at_stop, at_back, "borderflow_fraud_payments_scored_total")
            ),
            "fact_rows_written": _int(
                delta(at_stop, at_back, "borderflow_clickhouse_rows_written_total")
            ),
            "clickhouse_retries": _int(
                delta(at_stop, at_back, "borderflow_clickhouse_insert_failures_total")
            ),
            "redis_write_retries": _int(
                delta(at_stop, at_back, "borderflow_redis_write_failures_total")
            ),
            "_window": (called, back),
        }
        entry.update(self.catch_up(marks, back, CATCHUP_TIMEOUT_S))
        own = "redis" if service == "redis" else "clickhouse"
        entry["catchup_s"] = entry["catchup_all_s"][own]
        caught = time.time()
        window = self.sampler.between(called, caught)
        entry["rss_at_end_kib"] = rss_at_back
        entry["rss_max_kib"] = max((s.memory.get("VmRSS", 0) for s in window), default=None)
        first_insert = self.sampler.first_increase(
            "borderflow_clickhouse_rows_written_total", at_back
        )
        entry["first_insert_after_s"] = (
            None if first_insert is None else round(first_insert - back, 1)
        )
        at_caught = self.sampler.take()
        for sink, metric in (
            ("clickhouse", "borderflow_clickhouse_insert_failures_total"),
            ("redis", "borderflow_redis_write_failures_total"),
        ):
            entry[f"{sink}_retries_until_caught_up"] = _int(delta(at_stop, at_caught, metric))
        entry["redis_pending_peak"] = _int(
            max((s.get("borderflow_redis_pending_writes") or 0.0 for s in window), default=0.0)
        )
        if service == "clickhouse":
            entry["backpressure"] = backpressure_report(window)
        return entry


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def check_facts(client: Any, shop: Shop) -> dict[str, dict[str, Any]]:
    """Per fact table: rows, distinct keys, lost and duplicated (without FINAL)."""
    result: dict[str, dict[str, Any]] = {}
    for topic, (table, column) in FACTS.items():
        keys = [row[0] for row in client.execute(f"SELECT {column} FROM {table}")]
        present = set(keys)
        expected = shop.fact_keys[topic]
        foreign = len(present - expected)
        lost = expected - present
        result[table] = {
            "expected": len(expected),
            "rows": len(keys),
            "distinct": len(present),
            "lost": len(lost),
            "duplicated": len(keys) - len(present) + foreign,
        }
        if lost:
            where = {s.event_id: (s.partition, s.offset) for s in shop.events if s.topic == topic}
            result[table]["lost_examples"] = sorted((where[key], key) for key in lost)[:10]
    return result


def check_rollups(client: Any, shop: Shop) -> dict[str, int]:
    """Groups of each rollup that differ from the truth computed from the sent events."""
    expected = sum(
        to_usd(c["price"], c["currency"]) or 0.0
        for c in shop.values["clicks"]
        if c["type"] == "purchase" and c.get("price") and c.get("currency")
    )
    return rollup_mismatches(client.execute, shop.values, expected)


def check_redis(run: Run) -> dict[str, Any]:
    """Every user's ``recs:{u}:meta`` against the events sent (see ``Shop``)."""
    allowed = run.shop.redis_final_allowed()
    metas = redis_meta(run.redis, run.settings.redis_prefix, allowed)
    exact = later_scan = 0
    wrong = []
    for user, (expected, ok) in allowed.items():
        got = metas[user].get("last_event_id")
        if got == expected:
            exact += 1
        elif got in ok:
            later_scan += 1
        else:
            wrong.append((user, got, expected))
    return {
        "users": len(allowed),
        "exact": exact,
        "later_plain_scan": later_scan,
        "wrong": len(wrong),
        "wrong_examples": wrong[:5],
    }


def check_alerts(run: Run, client: Any, windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Alerts on ``fraud-alerts``: per outage window (Kafka timestamps), and against the
    ``fraud_scores`` rows flagged as alerts."""
    messages = read_topic(run.settings, run.settings.topic("fraud-alerts"))
    stamps = [m.timestamp()[1] / 1000 for m in messages]
    alerts = [orjson.loads(m.value()) for m in messages]
    txns = [alert["txn_id"] for alert in alerts]
    generated = [not alert["user_id"].startswith(PROBE_PREFIX) for alert in alerts]
    flagged = {row[0] for row in client.execute("SELECT txn_id FROM fraud_scores WHERE is_alert")}
    return {
        "total": len(messages),
        "card_testing": generated.count(False),
        "distinct": len(set(txns)),
        "without_fact_row": len(set(txns) - flagged),
        "facts_without_alert": len(flagged - set(txns)),
        "in_window": {
            name: sum(1 for at in stamps if start <= at <= end)
            for name, (start, end) in windows.items()
        },
        "generated_in_window": {
            name: sum(
                1 for at, g in zip(stamps, generated, strict=True) if g and start <= at <= end
            )
            for name, (start, end) in windows.items()
        },
    }


def test_redis_and_clickhouse_outages_mid_stream(outage_settings: Settings, tmp_path: Path) -> None:
    settings = outage_settings
    shop_path = tmp_path / "shop.jsonl"
    generate = borderflow(
        settings, "generate", "--users", str(USERS), "--days", "10", "--seed", str(SEED),
        "--fraud-rate", str(FRAUD_RATE), "--max-events", str(EVENTS), "--out", str(shop_path),
        "--quiet", log_path=tmp_path / "generate.log",
    )  # fmt: skip
    assert generate.wait(600) == 0, (tmp_path / "generate.log").read_text()
    attacks = add_card_testing(shop_path, every=max(1, int(RATE * ATTACK_EVERY_S)))
    shop = Shop.load(shop_path, settings.topic_partitions)

    report: dict[str, Any] = {
        "events_sent": len(shop.events),
        "rate": RATE,
        "per_topic": dict(Counter(sent.topic for sent in shop.events)),
        "card_testing_attacks": attacks,
        "flush_rows": FLUSH_ROWS,
    }
    outages: dict[str, dict[str, Any]] = {}
    worker = start_worker(settings, tmp_path, "worker", web_port=settings.worker_web_port)
    run = Run(settings, shop, worker)
    replay = None
    final: dict[str, Any] = {}
    try:
        run.wait_ready()
        run.sampler.start()
        replay = borderflow(
            settings, "replay", str(shop_path), "--rate", str(RATE), "--quiet",
            log_path=tmp_path / "replay.log",
        )  # fmt: skip
        run.started = time.time()
        report["replay_started"] = datetime.fromtimestamp(run.started, UTC).isoformat()

        # The steady state first: how far behind the sinks are without an outage.
        run.sleep_until(run.started + LEAD_S / 2)
        baseline_at = time.time()
        report["baseline"] = run.catch_up(run.marks.read(), baseline_at, LEAD_S / 2)
        run.sleep_until(run.started + LEAD_S)
        report["rss_before_kib"] = memory_kib(worker.process.pid).get("VmRSS")

        earliest = time.time()
        if REDIS_S > 0:
            outages["redis"] = run.outage("redis", REDIS_S)
            earliest = outages["redis"]["_window"][1] + GAP_S
        if CLICKHOUSE_S > 0:
            start, report["clickhouse_outage_placed_for"] = run.clickhouse_start(earliest)
            run.sleep_until(start)
            outages["clickhouse"] = run.outage("clickhouse", CLICKHOUSE_S)

        # The rest of the stream, then everything must arrive.
        assert replay.wait(timeout=EVENTS / RATE + 600) == 0, (tmp_path / "replay.log").read_text()
        replay_done = time.time()
        report["replay_s"] = run.rel(replay_done)
        final = run.catch_up(shop.watermarks, replay_done, CATCHUP_TIMEOUT_S)
        time.sleep(5.0)  # a late duplicate row would have been flushed by now
        report["final_catchup_s"] = final["catchup_all_s"]
        if "not_caught_up" in final:
            report["final_not_caught_up"] = final["not_caught_up"]

        facts = check_facts(run.clickhouse, shop)
        report["lost"] = sum(f["lost"] for f in facts.values())
        report["duplicated"] = sum(f["duplicated"] for f in facts.values())
        report["facts"] = facts
        report["rollup_mismatches"] = check_rollups(run.clickhouse, shop)
        report["redis"] = check_redis(run)
        windows = {name: entry["_window"] for name, entry in outages.items()}
        report["alerts"] = check_alerts(run, run.clickhouse, windows)
        for name, entry in outages.items():
            entry["alerts"] = report["alerts"]["in_window"][name]
            entry["alerts_of_generated_fraud"] = report["alerts"]["generated_in_window"][name]
        report["deadletters"] = len(read_topic(settings, settings.topic("deadletter"), idle_s=1))
        report["misplaced"] = misplaced(settings, shop)
        end = run.sampler.take()
        report["clickhouse_retries"] = _int(end.get("borderflow_clickhouse_insert_failures_total"))
        report["redis_write_retries"] = _int(end.get("borderflow_redis_write_failures_total"))
        report["events_processed"] = _int(end.get("borderflow_events_processed_total"))
    finally:
        run.sampler.stop()
        if replay is not None and replay.poll() is None:
            replay.kill()
            replay.wait(10)
        alive = run.alive()
        memory = memory_kib(worker.process.pid)
        report["rss_end_kib"] = memory.get("VmRSS")
        report["rss_peak_kib"] = memory.get("VmHWM")
        worker.stop()
        run.sampler.dump(tmp_path / "samples.jsonl")
        problems, driver_warnings = log_problems(worker.log_path)
        report["clickhouse_driver_connect_tracebacks"] = driver_warnings
        report["worker_alive"] = alive
        if run.died_at is not None:
            report["worker_died_s"] = run.rel(run.died_at)
            report["worker_exit_code"] = worker.process.returncode
        report["worker_crashes"] = (0 if alive else 1) + len(problems)
        report["worker_log_problems"] = problems[:3]
        report["outages"] = {
            name: {k: v for k, v in entry.items() if not k.startswith("_")}
            for name, entry in outages.items()
        }
        run.marks.close()
        run.redis.close()
        run.clickhouse.disconnect()
        print("outages " + json.dumps(report, default=str))

    log = worker.log_path
    assert alive and not problems, f"worker died or logged a traceback; see {log}: {problems[:3]}"
    assert report["lost"] == 0 and report["duplicated"] == 0, report["facts"]
    assert not any(report["rollup_mismatches"].values()), report["rollup_mismatches"]
    assert report["redis"]["wrong"] == 0, report["redis"]
    assert "not_caught_up" not in final, final
    alerts = report["alerts"]
    assert alerts["without_fact_row"] == 0 and alerts["facts_without_alert"] == 0, alerts
    assert report["deadletters"] == 0
    assert not any(report["misplaced"].values()), "the harness mapped events to wrong offsets"
    for name, entry in outages.items():
        assert entry["catchup_s"] is not None, (name, entry)
        assert entry["alerts"] > 0, f"no fraud alert during the {name} outage: {entry}"
    assert set(outages) == {
        name for name, seconds in (("redis", REDIS_S), ("clickhouse", CLICKHOUSE_S)) if seconds
    }
    if "clickhouse" in outages:
        pressure = outages["clickhouse"]["backpressure"]
        # The buffer filled, stayed bounded (each agent adds at most one batch past the
        # bound: up to 3 rows per event) and intake paused while it was full.
        batch = settings.batch_max_events
        assert pressure["seconds_full"] > 0, pressure
        bound = pressure["buffer_capacity_rows"] + len(INPUT_TOPICS) * 3 * batch
        assert pressure["buffer_peak_rows"] <= bound, pressure
        assert pressure["events_processed_while_full"] <= len(INPUT_TOPICS) * batch, pressure
