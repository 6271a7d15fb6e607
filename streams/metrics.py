"""Operator metrics (Prometheus) and the health check of one worker.

Every worker app gets its own :class:`WorkerMetrics` with its own ``CollectorRegistry`` (not
prometheus-client's global one), so several apps in one process - tests, the bench - never
share or collide on a metric. The worker's Faust web server serves them:

* ``GET /metrics``  Prometheus text format (see docs/operations.md, "Metrics and health");
* ``GET /health``   JSON ``{"status": "ok" | "degraded", "reasons": [...], ...}``, HTTP 200
  when ok and 503 when degraded.

Counters and histograms move where the work happens (``Runtime.decode``/``deadletter``/
``finish_batch``, :func:`streams.runtime.micro_batches`, the ClickHouse writer thread, the
Redis store). Gauges that describe state - consumer lag, the ClickHouse buffer, model
quality - are computed when Prometheus scrapes, from the live objects.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faust
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from schemas.config import Settings
from schemas.events import CLICKS, FRAUD_LABELS, LOGISTICS, PAYMENTS
from sinks.redis_writes import describe as describe_writes

if TYPE_CHECKING:
    from streams.runtime import Runtime

INPUT_TOPICS = (CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS)

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_BY_APP: weakref.WeakKeyDictionary[Any, WorkerMetrics] = weakref.WeakKeyDictionary()


class WorkerMetrics:
    """The metrics of one worker app (one registry)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "borderflow_events_processed",
            "Valid events decoded and processed, per input topic.",
            ["topic"],
            registry=r,
        )
        self.deadletters = Counter(
            "borderflow_deadletters",
            "Events sent to the dead-letter topic, per source topic.",
            ["topic"],
            registry=r,
        )
        self.batch_size = Histogram(
            "borderflow_batch_size_events",
            "Kafka messages per micro-batch, per agent.",
            ["agent"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "borderflow_batch_duration_seconds",
            "Time an agent spent processing one micro-batch.",
            ["agent"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.clickhouse_rows = Counter(
            "borderflow_clickhouse_rows_written",
            "Rows stored in ClickHouse, per table.",
            ["table"],
            registry=r,
        )
        self.clickhouse_insert_seconds = Histogram(
            "borderflow_clickhouse_insert_duration_seconds",
            "Duration of one successful columnar INSERT, per table.",
            ["table"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.clickhouse_failures = Counter(
            "borderflow_clickhouse_insert_failures",
            "Failed ClickHouse INSERTs; each is retried (with backoff) until it succeeds.",
            ["table"],
            registry=r,
        )
        self.redis_seconds = Histogram(
            "borderflow_redis_call_duration_seconds",
            "Duration of one Redis store call (usually one pipeline or script), per operation.",
            ["operation"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.redis_write_failures = Counter(
            "borderflow_redis_write_failures",
            "Failed attempts to store the queued serving writes (Redis unreachable); they stay "
            "queued and are retried with backoff.",
            registry=r,
        )
        self.rec_predictions = Counter(
            "borderflow_rec_predictions",
            "Interest clicks scored against the recommendations served before them.",
            registry=r,
        )
        self.rec_hits = Counter(
            "borderflow_rec_hits",
            "Scored clicks whose item was in the served recommendations (hits@recs_top_n).",
            registry=r,
        )
        self.fraud_scored = Counter(
            "borderflow_fraud_payments_scored",
            "Payments scored by the fraud model.",
            registry=r,
        )
        self.fraud_alerts = Counter(
            "borderflow_fraud_alerts",
            "Payments scored at or above the alert threshold.",
            registry=r,
        )
        self.runtime: Runtime | None = None
        self.registry.register(_StateCollector(self))

    # -- hooks --------------------------------------------------------------------------------
    def topic_name(self, topic: str) -> str:
        """The logical topic name (without ``topic_prefix``), so dashboards fit every setup."""
        prefix = self.settings.topic_prefix
        return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic

    def count_events(self, topic: str, n: int = 1) -> None:
        if n:
            self.events.labels(self.topic_name(topic)).inc(n)

    def count_deadletter(self, topic: str) -> None:
        self.deadletters.labels(self.topic_name(topic)).inc()

    def observe_rows(self, rows: Mapping[str, Sequence[tuple[Any, ...]]]) -> None:
        """Model-quality counters from a micro-batch's ClickHouse rows (recs and fraud)."""
        from sinks.clickhouse import TABLE_COLUMNS

        predictions = rows.get("rec_predictions")
        if predictions:
            rank = TABLE_COLUMNS["rec_predictions"].index("hit_rank")
            self.rec_predictions.inc(len(predictions))
            self.rec_hits.inc(sum(1 for row in predictions if row[rank] > 0))
        scores = rows.get("fraud_scores")
        if scores:
            alert = TABLE_COLUMNS["fraud_scores"].index("is_alert")
            self.fraud_scored.inc(len(scores))
            self.fraud_alerts.inc(sum(1 for row in scores if row[alert]))

    # ClickHouseWriter observer (called from the writer thread; prometheus-client is
    # thread-safe).
    def inserted(self, table: str, rows: int, seconds: float) -> None:
        self.clickhouse_rows.labels(table).inc(rows)
        self.clickhouse_insert_seconds.labels(table).observe(seconds)

    def insert_failed(self, table: str, error: str) -> None:
        self.clickhouse_failures.labels(table).inc()

    # RedisWriteBehind observer (on the event loop).
    def redis_write_failed(self, error: str) -> None:
        self.redis_write_failures.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_for(app: Any, settings: Settings) -> WorkerMetrics:
    """The app's metrics, created on first use."""
    metrics = _BY_APP.get(app)
    if metrics is None:
        metrics = _BY_APP[app] = WorkerMetrics(settings)
    return metrics


def find_metrics(app: Any) -> WorkerMetrics | None:
    return _BY_APP.get(app) if app is not None else None


# -- micro-batches ------------------------------------------------------------------------------
async def observed_batches(
    batches: AsyncIterator[Sequence[faust.EventT]], metrics: WorkerMetrics, agent: str | None
) -> AsyncIterator[Sequence[faust.EventT]]:
    """``batches`` as they are, observing each batch's size and processing time.

    Closing this generator closes ``batches`` too (so its last batch is still acked)."""
    try:
        async for batch in batches:
            label = agent or (metrics.topic_name(batch[0].message.topic) if batch else "unknown")
            metrics.batch_size.labels(label).observe(len(batch))
            started = time.perf_counter()
            yield batch
            metrics.batch_seconds.labels(label).observe(time.perf_counter() - started)
    finally:
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()


def current_agent_name() -> str | None:
    from faust.agents import current_agent

    agent = current_agent()
    return str(agent.name) if agent is not None else None


# -- Redis --------------------------------------------------------------------------------------
class TimedRedisStore:
    """Wraps a ``RedisStore``: its coroutine methods are timed into ``redis_seconds``."""

    def __init__(self, store: Any, histogram: Histogram) -> None:
        self._store = store
        self._histogram = histogram

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        child = self._histogram.labels(name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                child.observe(time.perf_counter() - started)

        return timed


# -- scrape-time state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    highwater: int
    committed: int | None
    read: int | None

    @property
    def committed_lag(self) -> int:
        """Messages after the committed offset (what a restart would process again or anew)."""
        return max(0, self.highwater - (self.committed or 0))

    @property
    def read_lag(self) -> int:
        """Messages not fetched yet (the read position is the last offset read, plus one)."""
        position = self.read + 1 if self.read is not None else (self.committed or 0)
        return max(0, self.highwater - position)


def consumer_lag(consumer: Any, topics: Iterable[str]) -> list[PartitionLag]:
    """Lag of every assigned partition of ``topics``.

    ``highwater(tp)`` is the log end offset the consumer last saw in a fetch response (the
    offset the next message will get). Faust keeps ``_committed_offset[tp]`` (the next offset
    to process, Kafka's committed-offset convention) and ``_read_offset[tp]`` (the offset of
    the last message read). Partitions whose high-water mark is not known yet are skipped.
    """
    wanted = set(topics)
    try:
        assignment = consumer.assignment()
    except Exception:  # noqa: BLE001 - no consumer yet: nothing assigned
        return []
    committed_offsets = getattr(consumer, "_committed_offset", {})
    read_offsets = getattr(consumer, "_read_offset", {})
    lags = []
    for tp in sorted(assignment):
        if tp.topic not in wanted:
            continue
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # noqa: BLE001, S112 - e.g. revoked since assignment()
            continue
        if highwater is None:
            continue
        lags.append(
            PartitionLag(
                tp.topic,
                tp.partition,
                int(highwater),
                committed_offsets.get(tp),
                read_offsets.get(tp),
            )
        )
    return lags


class _StateCollector:
    """Gauges read from the live runtime at scrape time."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unknown until collected (they depend on what is running)

    def collect(self) -> Iterator[Metric]:
        runtime = self.metrics.runtime
        if runtime is None:
            return
        yield from self._consumer(runtime)
        yield from self._clickhouse(runtime)
        yield from self._redis_writes(runtime)
        yield from self._models(runtime)
        yield from self._checkpoints(runtime)
        yield self._duplicates(runtime)

    def _checkpoints(self, runtime: Runtime) -> Iterator[Metric]:
        spent = GaugeMetricFamily(
            "borderflow_checkpoint_pickle_seconds",
            "Event-loop time the last checkpoint round took to pickle its images, per kind.",
            labels=["kind"],
        )
        skipped = CounterMetricFamily(
            "borderflow_checkpoint_rounds_skipped",
            "Timer rounds skipped to keep pickling below BORDERFLOW_CHECKPOINT_MAX_LOOP_SHARE "
            "of the loop's time, per kind.",
            labels=["kind"],
        )
        for kind, pacer in getattr(runtime, "checkpoint_pacers", {}).items():
            spent.add_metric([kind], pacer.last_spent_s)
            skipped.add_metric([kind], float(pacer.skipped))
        yield spent
        yield skipped

    def _duplicates(self, runtime: Runtime) -> Metric:
        family = CounterMetricFamily(
            "borderflow_duplicate_events",
            "Events dropped as duplicates (event id already applied at another offset): "
            "no fact row, no Redis write.",
            labels=["topic"],
        )
        counts = getattr(runtime, "duplicates", {})
        for name in INPUT_TOPICS:
            family.add_metric([name], float(counts.get(name, 0)))
        return family

    def _consumer(self, runtime: Runtime) -> Iterator[Metric]:
        metrics = self.metrics
        committed = GaugeMetricFamily(
            "borderflow_consumer_lag_messages",
            "High-water mark minus committed offset, per assigned input partition.",
            labels=["topic", "partition"],
        )
        read = GaugeMetricFamily(
            "borderflow_consumer_fetch_lag_messages",
            "High-water mark minus the read position (messages not fetched yet).",
            labels=["topic", "partition"],
        )
        assigned = GaugeMetricFamily(
            "borderflow_assigned_partitions",
            "Input partitions assigned to this worker, per topic.",
            labels=["topic"],
        )
        consumer = _consumer_of(runtime)
        topics = {runtime.settings.topic(name): name for name in INPUT_TOPICS}
        counts = dict.fromkeys(INPUT_TOPICS, 0)
        if consumer is not None:
            try:
                for tp in consumer.assignment():
                    if tp.topic in topics:
                        counts[topics[tp.topic]] += 1
            except Exception:  # noqa: BLE001, S110 - not started yet
                pass
            for lag in consumer_lag(consumer, topics):
                labels = [metrics.topic_name(lag.topic), str(lag.partition)]
                committed.add_metric(labels, lag.committed_lag)
                read.add_metric(labels, lag.read_lag)
        for name, count in counts.items():
            assigned.add_metric([name], count)
        yield committed
        yield read
        yield assigned

    def _clickhouse(self, runtime: Runtime) -> Iterator[Metric]:
        writer = runtime._clickhouse
        buffered = GaugeMetricFamily(
            "borderflow_clickhouse_buffered_rows",
            "Rows waiting for (or in) a ClickHouse insert.",
        )
        capacity = GaugeMetricFamily(
            "borderflow_clickhouse_buffer_capacity_rows",
            "Buffered rows at which intake pauses (backpressure).",
        )
        failing = GaugeMetricFamily(
            "borderflow_clickhouse_failing",
            "1 while the writer is retrying a failed insert, else 0.",
        )
        if writer is not None:
            buffered.add_metric([], float(getattr(writer, "buffered_rows", 0)))
            capacity.add_metric([], float(getattr(writer, "_max_buffered", 0)))
            failing.add_metric([], float(bool(getattr(writer, "retrying", False))))
        yield buffered
        yield capacity
        yield failing

    def _redis_writes(self, runtime: Runtime) -> Iterator[Metric]:
        writes = getattr(runtime, "_redis_writes", None)
        pending = GaugeMetricFamily(
            "borderflow_redis_pending_writes",
            "Serving writes queued for Redis (coalesced per key; many only while it is down).",
        )
        capacity = GaugeMetricFamily(
            "borderflow_redis_pending_capacity",
            "Queued Redis writes at which intake pauses (backpressure).",
        )
        failing = GaugeMetricFamily(
            "borderflow_redis_failing",
            "1 while queued Redis writes are being retried (Redis unreachable), else 0.",
        )
        if writes is not None:
            pending.add_metric([], float(writes.pending))
            capacity.add_metric([], float(writes.max_pending))
            failing.add_metric([], float(writes.retrying))
        yield pending
        yield capacity
        yield failing

    def _models(self, runtime: Runtime) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "borderflow_fraud_model_info",
            "1 per payments partition owned, labelled with its fraud model version.",
            labels=["partition", "model_version"],
        )
        gauges = {
            name: GaugeMetricFamily(f"borderflow_fraud_{name}", text, labels=["partition"])
            for name, text in (
                ("labels_applied", "Fraud labels learned by the partition's model."),
                ("labels_pending", "Fraud labels queued until their apply time."),
                ("drifts", "Concept drifts detected by the partition's model."),
                ("threshold", "Current alert threshold of the partition's policy."),
            )
        }
        for partition, engine in sorted(runtime.fraud_engines.items()):
            try:
                stats = engine.stats()
            except Exception:  # noqa: BLE001, S112 - a metric must never break the scrape
                continue
            p = str(partition)
            info.add_metric([p, str(stats.get("model_version", ""))], 1)
            for name, key in (
                ("labels_applied", "labels_applied"),
                ("labels_pending", "pending_labels"),
                ("drifts", "drifts"),
                ("threshold", "threshold"),
            ):
                value = stats.get(key)
                if isinstance(value, int | float):
                    gauges[name].add_metric([p], float(value))
        yield info
        yield from gauges.values()

        logistics = GaugeMetricFamily(
            "borderflow_logistics_mae_hours",
            "Mean absolute error of delivery-time predictions (model vs baseline), hours.",
            labels=["predictor"],
        )
        scored = GaugeMetricFamily(
            "borderflow_logistics_predictions_scored",
            "Delivered shipments whose predictions were scored.",
        )
        try:
            stats = runtime.serving.logistics.stats()
        except Exception:  # noqa: BLE001 - not loaded yet
            stats = {}
        for predictor, key in (("model", "mae_model_h"), ("baseline", "mae_baseline_h")):
            value = stats.get(key)
            if isinstance(value, int | float):
                logistics.add_metric([predictor], float(value))
        if isinstance(stats.get("predictions_scored"), int):
            scored.add_metric([], float(stats["predictions_scored"]))
        yield logistics
        yield scored


def _consumer_of(runtime: Runtime) -> Any:
    app = runtime.topology.app
    # ``app.consumer`` would create a consumer; only read one the worker has started.
    return getattr(app, "_consumer", None)


# -- health -------------------------------------------------------------------------------------
def crashed_agents(runtime: Runtime) -> dict[str, str]:
    """Agents with a crashed actor (an exception escaped a batch), with the reason."""
    agents = getattr(runtime.topology.app, "agents", None) or {}
    crashed: dict[str, str] = {}
    for name, agent in agents.items():
        for actor in getattr(agent, "_actors", ()):
            if getattr(actor, "crashed", False):
                reason = getattr(actor, "crash_reason", None)
                crashed[str(name).rsplit(".", 1)[-1]] = f"{type(reason).__name__}: {reason}"[:300]
    return crashed


async def health(runtime: Runtime, *, redis_timeout_s: float = 1.0) -> dict[str, Any]:
    """The worker's health: ``status`` ok/degraded with the ``reasons`` and the details."""
    reasons: list[str] = []
    report: dict[str, Any] = {"app_id": runtime.settings.app_id}

    consumer = _consumer_of(runtime)
    topics = {runtime.settings.topic(name) for name in INPUT_TOPICS}
    assigned: list[str] = []
    if consumer is not None:
        try:
            assigned = sorted(
                f"{tp.topic}:{tp.partition}" for tp in consumer.assignment() if tp.topic in topics
            )
        except Exception:  # noqa: BLE001 - not started
            assigned = []
    report["assigned_partitions"] = len(assigned)
    if not assigned:
        reasons.append("no input partitions assigned (starting, rebalancing or idle spare)")
    crashed = crashed_agents(runtime)
    report["crashed_agents"] = crashed
    for name, reason in crashed.items():
        # A crashed agent processes nothing more, and its offsets are never committed: the
        # worker must be restarted (the next owner reads those events again).
        reasons.append(f"agent {name} crashed: {reason}")

    writer = runtime._clickhouse
    if writer is None:
        report["clickhouse"] = {"started": False}
    else:
        buffered = int(getattr(writer, "buffered_rows", 0))
        capacity = int(getattr(writer, "_max_buffered", 0))
        retrying = bool(getattr(writer, "retrying", False))
        report["clickhouse"] = {
            "started": True,
            "buffered_rows": buffered,
            "capacity_rows": capacity,
            "retrying": retrying,
            "failures": int(getattr(writer, "failures", 0)),
            "last_error": getattr(writer, "last_error", None),
        }
        if retrying:
            reasons.append(f"ClickHouse inserts failing: {writer.last_error}")
        if capacity and buffered >= capacity:
            reasons.append("ClickHouse buffer full (intake paused)")

    redis_report: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        client = runtime.redis.client
        await asyncio.wait_for(client.ping(), timeout=redis_timeout_s)
        redis_report["ok"] = True
        redis_report["ping_ms"] = round((time.perf_counter() - started) * 1000, 2)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        redis_report["ok"] = False
        redis_report["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        reasons.append(f"Redis unreachable: {redis_report['error']}")
    writes = getattr(runtime, "_redis_writes", None)
    if writes is not None:
        redis_report["writes"] = describe_writes(writes)
        if writes.retrying:
            reasons.append(f"Redis writes queued and retried: {writes.last_error}")
        if not writes.has_capacity():
            reasons.append("Redis write queue full (intake paused)")
    report["redis"] = redis_report
    report["deadlettered"] = runtime.deadlettered
    return {"status": "degraded" if reasons else "ok", "reasons": reasons, **report}


# -- web pages -----------------------------------------------------------------------------------
def add_pages(app: faust.App, runtime: Runtime) -> None:
    """Serve ``/metrics`` and ``/health`` on the worker's web server."""
    metrics = runtime.metrics

    @app.page("/metrics")
    async def prometheus_metrics(self: faust.web.View, request: faust.web.Request) -> Any:
        # Collected on the event loop: the scrape-time gauges read the agents' live state.
        return self.bytes(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/health")
    async def worker_health(self: faust.web.View, request: faust.web.Request) -> Any:
        result = await health(runtime)
        return self.json(result, status=200 if result["status"] == "ok" else 503)
