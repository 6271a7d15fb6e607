"""Helpers of ``test_outages.py``: what was sent where, what each sink must hold, and what the
worker process looks like from outside (``/metrics``, ``/proc``).

The replayed file is known in full before the run, and ``borderflow replay`` sends it in file
order with the murmur2 partitioner (``sinks/kafka.py``) to fresh topics, so every event's
Kafka position (topic, partition, offset) is known in advance: offsets count up per partition
in file order. A partition's high-water mark at any moment then says which events had been
sent by then, and the facts say how far they got: a fact table holds a prefix of every
partition's offsets (``max(src_next_offset)``, docs/architecture.md). The test checks the
mapping against the broker at the end, message by message. (Tansu sometimes reports a
high-water mark a record or two short of the last offset it serves, so a mark read during
the run is a lower bound of what had been sent: at most the last batch, milliseconds old,
counts as sent later.)

Redis: ``bf:recs:{u}:meta`` reflects the user's freshest event folded into the profile
(``UserProfile.freshness``: the newest click, or a newer shipment scan) as of the user's last
Redis write. Writes happen for every click batch and for scans that change the delivery
experience (a shipment's first delivery or return); other scans move the profile's freshness
without a write. So:

* after a set of sent events is processed, ``last_event_ts`` is at least the newest
  *state-writing* event's time (:meth:`Shop.redis_due`), whatever came after;
* at the end, ``last_event_id`` is the freshness over every click and the user's scans up to
  some scan at or after the last state-writing one (:meth:`Shop.redis_final_allowed`); which
  plain scans got in before the last write depends on how the clicks and logistics agents
  interleave, and nothing else may be there.
"""

from __future__ import annotations

import heapq
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from prometheus_client.parser import text_string_to_metric_families

from schemas.config import Settings
from schemas.events import CLICKS, FRAUD_LABELS, LOGISTICS, PAYMENTS

INPUT_TOPICS = (CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS)
#: The fact table written once per input event, and its key column (docs/contracts.md).
FACTS = {
    CLICKS: ("click_events", "event_id"),
    PAYMENTS: ("fraud_scores", "txn_id"),
    FRAUD_LABELS: ("fraud_label_events", "event_id"),
    LOGISTICS: ("shipment_events", "event_id"),
}
#: Watermarks: (topic, partition) -> high-water mark (the next offset).
Watermarks = Mapping[tuple[str, int], int]


def partition_of(key: str, partitions: int) -> int:
    """The partition Java, aiokafka and librdkafka's murmur2 partitioners give ``key``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class Sent:
    topic: str
    partition: int
    offset: int
    user: str
    ts: int
    event_id: str
    #: The worker writes the user's Redis state for this event (clicks; a shipment's first
    #: delivered or returned scan).
    writes_state: bool


@dataclass
class Shop:
    """Every event of a replay file with its Kafka position."""

    events: list[Sent] = field(default_factory=list)
    #: What each fact table must hold in the end: its key column's values.
    fact_keys: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: The generated values per topic (for the rollup truth).
    values: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def load(cls, path: Path, partitions: int) -> Shop:
        shop = cls()
        next_offset: dict[tuple[str, int], int] = defaultdict(int)
        completed: set[tuple[str, str]] = set()  # (order_id, status) already seen
        with path.open("rb") as lines:
            for line in lines:
                envelope = orjson.loads(line)
                topic, value = envelope["topic"], envelope["value"]
                key = str(envelope.get("key") or value["user_id"])
                partition = partition_of(key, partitions)
                offset = next_offset[(topic, partition)]
                next_offset[(topic, partition)] += 1
                writes = topic == CLICKS
                if topic == LOGISTICS and value["status"] in ("delivered", "returned"):
                    first = (value["order_id"], value["status"]) not in completed
                    completed.add((value["order_id"], value["status"]))
                    writes = first
                shop.events.append(
                    Sent(topic, partition, offset, str(value["user_id"]), int(value["ts"]),
                         str(value["event_id"]), writes)
                )  # fmt: skip
                # Every fact key is its event's id (a payment's txn_id is its event_id).
                shop.fact_keys[topic].add(str(value["event_id"]))
                shop.values[topic].append(value)
        return shop

    @property
    def watermarks(self) -> dict[tuple[str, int], int]:
        """The high-water marks once everything is sent."""
        marks: dict[tuple[str, int], int] = {}
        for sent in self.events:
            marks[(sent.topic, sent.partition)] = sent.offset + 1
        return marks

    def last_partition_start(self) -> tuple[str, int, int]:
        """The input partition whose first event comes last in the file: (topic, partition,
        the event's index in the file). Label streams are sparse: their partitions start days
        into the shop's event time."""
        first: dict[tuple[str, int], int] = {}
        for index, sent in enumerate(self.events):
            first.setdefault((sent.topic, sent.partition), index)
        (topic, partition), index = max(first.items(), key=lambda item: item[1])
        return topic, partition, index

    def sent_by(self, marks: Watermarks) -> int:
        return sum(1 for s in self.events if s.offset < marks.get((s.topic, s.partition), 0))

    def redis_due(self, marks: Watermarks) -> dict[str, int]:
        """Per user: the time of the newest state-writing event sent below ``marks``; once
        those events are processed, ``recs:{u}:meta`` holds that time or a later one."""
        due: dict[str, int] = {}
        for sent in self.events:
            if sent.writes_state and sent.offset < marks.get((sent.topic, sent.partition), 0):
                if sent.ts > due.get(sent.user, -1):
                    due[sent.user] = sent.ts
        return due

    def redis_final_allowed(self) -> dict[str, tuple[str, set[str]]]:
        """Per user with a Redis state: (the exact expectation, every acceptable event id).

        The exact one is the freshness over every click and the scans up to the last
        state-writing scan; the others let later plain scans in (see the module docstring)."""
        clicks: dict[str, tuple[int, int, str]] = {}
        scans: dict[str, list[Sent]] = defaultdict(list)
        for sent in self.events:
            if sent.topic == CLICKS:
                newest = (sent.ts, sent.offset, sent.event_id)  # ties: the later click wins
                if sent.user not in clicks or newest[:2] >= clicks[sent.user][:2]:
                    clicks[sent.user] = newest
            elif sent.topic == LOGISTICS:
                scans[sent.user].append(sent)
        allowed: dict[str, tuple[str, set[str]]] = {}
        for user in set(clicks) | set(scans):
            click_ts, _, click_id = clicks.get(user, (0, 0, ""))
            ordered = sorted(scans.get(user, []), key=lambda s: s.offset)
            last_writer = max((i for i, s in enumerate(ordered) if s.writes_state), default=-1)
            if user not in clicks and last_writer < 0:
                continue  # never written
            ids: list[str] = []
            newest_scan: tuple[int, str] = (0, "")
            if last_writer < 0:
                ids.append(click_id)  # no scan applied yet at the last write
            for index, scan in enumerate(ordered):
                if scan.ts >= newest_scan[0]:  # models.profile.record_scan
                    newest_scan = (scan.ts, scan.event_id)
                if index >= last_writer:
                    ids.append(newest_scan[1] if newest_scan[0] > click_ts else click_id)
            allowed[user] = (ids[0], set(ids))
        return allowed


#: Prefix of the card-testing users :func:`add_card_testing` puts into a replay file.
PROBE_PREFIX = "probe-"


def add_card_testing(path: Path, every: int) -> int:
    """Put a card-testing attack into the replay file every ``every`` events; returns how
    many. Each is a fresh user's card: five $1 authorisations 30 s apart, then $900 four
    minutes after the first (event time, from the event it is anchored at), merged into the
    file by event time. The fraud engine's rules alert on the $900 charge whether or not its
    model has learned anything yet, so alerts keep coming through the whole stream."""
    from tests.integration.test_pipeline import payment

    with path.open("rb") as lines:
        envelopes = [orjson.loads(line) for line in lines]
    attacks: list[tuple[int, dict[str, Any]]] = []
    for number, anchor in enumerate(envelopes[every::every]):
        user = f"{PROBE_PREFIX}{number}"
        start = int(anchor["value"]["ts"])
        charges = [(start + i * 30_000, f"{user}-t{i}", 1.0) for i in range(5)]
        charges.append((start + 240_000, f"{user}-big", 900.0))
        for ts, txn, amount in charges:
            value = {**payment(user, txn, 0, amount), "ts": ts}
            attacks.append((ts, {"topic": PAYMENTS, "key": user, "value": value}))
    merged = heapq.merge(
        ((int(e["value"]["ts"]), 0, index, e) for index, e in enumerate(envelopes)),
        ((ts, 1, index, e) for index, (ts, e) in enumerate(attacks)),
    )
    with path.open("wb") as out:
        for *_, envelope in merged:
            out.write(orjson.dumps(envelope) + b"\n")
    return len(attacks) // 6


# -- the broker ---------------------------------------------------------------------------------
class BrokerMarks:
    """High-water marks of the input topics (one consumer, no group joined)."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Consumer

        self.settings = settings
        self._consumer = Consumer({
            **settings.confluent_config(),
            "group.id": "borderflow-observer",  # required by librdkafka; never joined
            "enable.auto.commit": False,
        })  # fmt: skip

    def read(self) -> dict[tuple[str, int], int]:
        from confluent_kafka import TopicPartition

        marks = {}
        for topic in INPUT_TOPICS:
            for partition in range(self.settings.topic_partitions):
                tp = TopicPartition(self.settings.topic(topic), partition)
                _, high = self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                marks[(topic, partition)] = int(high)
        return marks

    def close(self) -> None:
        self._consumer.close()


def misplaced(settings: Settings, shop: Shop) -> dict[str, int]:
    """Per input topic: events not found at their expected (partition, offset), plus
    messages the broker holds beyond them (0 everywhere: the mapping is right)."""
    wrong = {}
    for topic in INPUT_TOPICS:
        found = {
            (m.partition(), m.offset()): orjson.loads(m.value()).get("event_id")
            for m in read_topic(settings, settings.topic(topic))
        }
        expected = {(s.partition, s.offset): s.event_id for s in shop.events if s.topic == topic}
        wrong[topic] = sum(1 for key, event_id in expected.items() if found.get(key) != event_id)
        wrong[topic] += len(set(found) - set(expected))
    return wrong


def read_topic(settings: Settings, topic: str, idle_s: float = 3.0) -> list[Any]:
    """Every message of a topic (its broker-side name) until nothing new for ``idle_s``."""
    from sinks.kafka import TopicReader

    with TopicReader(settings, topic) as reader:
        return reader.read_until_idle(idle_s=idle_s, max_s=300)


# -- the sinks ----------------------------------------------------------------------------------
def facts_behind(client: Any, marks: Watermarks) -> dict[str, int]:
    """Per fact table, how many events below ``marks`` its rows do not reach yet (0: all in).

    A table holds a prefix of each partition's offsets, so ``max(src_next_offset)`` per
    partition says how far it got."""
    behind = {}
    for topic, (table, _) in FACTS.items():
        rows = client.execute(
            f"SELECT src_partition, max(src_next_offset) FROM {table} GROUP BY src_partition"
        )
        reached = {int(p): int(o) for p, o in rows}
        behind[table] = sum(
            max(0, mark - reached.get(partition, 0))
            for (name, partition), mark in marks.items()
            if name == topic
        )
    return behind


def redis_meta(redis_client: Any, prefix: str, users: Iterable[str]) -> dict[str, dict[str, str]]:
    """``recs:{u}:meta`` of each user ({} when absent), in one pipeline."""
    users = list(users)
    pipe = redis_client.pipeline(transaction=False)
    for user in users:
        pipe.hgetall(f"{prefix}recs:{user}:meta")
    return dict(zip(users, pipe.execute(), strict=True))


def redis_behind(redis_client: Any, prefix: str, due: Mapping[str, int]) -> int:
    """Users whose meta does not reflect their due event time yet."""
    metas = redis_meta(redis_client, prefix, due)
    return sum(1 for user, ts in due.items() if int(metas[user].get("last_event_ts") or -1) < ts)


# -- the worker, seen from outside ---------------------------------------------------------------
#: The /metrics samples the test follows (summed over labels).
FOLLOWED = (
    "borderflow_events_processed_total",
    "borderflow_fraud_payments_scored_total",
    "borderflow_fraud_alerts_total",
    "borderflow_clickhouse_rows_written_total",
    "borderflow_clickhouse_insert_failures_total",
    "borderflow_clickhouse_buffered_rows",
    "borderflow_clickhouse_buffer_capacity_rows",
    "borderflow_clickhouse_failing",
    "borderflow_redis_write_failures_total",
    "borderflow_redis_pending_writes",
    "borderflow_redis_pending_capacity",
    "borderflow_redis_failing",
)


def scrape(port: int, timeout_s: float = 5.0) -> dict[str, float] | None:
    """The worker's /metrics, every sample summed over its labels; None if it did not answer."""
    try:
        with urllib.request.urlopen(  # noqa: S310 - fixed http://127.0.0.1 URL
            f"http://127.0.0.1:{port}/metrics", timeout=timeout_s
        ) as response:
            text = response.read().decode()
    except OSError:
        return None
    sums: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] += float(sample.value)
    return dict(sums)


def health(port: int, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """The worker's /health JSON (also when degraded, HTTP 503); None if it did not answer."""
    import urllib.error

    try:
        with urllib.request.urlopen(  # noqa: S310 - fixed http://127.0.0.1 URL
            f"http://127.0.0.1:{port}/health", timeout=timeout_s
        ) as response:
            return dict(orjson.loads(response.read()))
    except urllib.error.HTTPError as error:
        return dict(orjson.loads(error.read()))
    except (OSError, ValueError):
        return None


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a live process, in KiB ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


@dataclass
class Sample:
    at: float
    metrics: dict[str, float] | None
    memory: dict[str, int]

    def get(self, name: str) -> float | None:
        return None if self.metrics is None else self.metrics.get(name, 0.0)


class Sampler:
    """Scrapes the worker's /metrics and memory every ``interval_s`` in a thread."""

    def __init__(self, pid: int, port: int, interval_s: float = 2.0) -> None:
        self.pid, self.port, self.interval_s = pid, port, interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outage-sampler", daemon=True)

    def take(self) -> Sample:
        return Sample(time.time(), scrape(self.port), memory_kib(self.pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.take())
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end and s.metrics is not None]

    def first_increase(self, name: str, since: Sample) -> float | None:
        """When a sample after ``since`` first saw ``name`` above its value then."""
        floor = since.get(name)
        for sample in self.samples:
            value = sample.get(name)
            if sample.at > since.at and floor is not None and value is not None and value > floor:
                return sample.at
        return None

    def dump(self, path: Path) -> None:
        """The samples as JSON lines (evidence next to the worker's log)."""
        with path.open("wb") as out:
            for sample in list(self.samples):
                metrics = sample.metrics or {}
                followed = {name: metrics[name] for name in metrics if name.startswith(FOLLOWED)}
                record = {"at": round(sample.at, 2), "memory": sample.memory, "metrics": followed}
                out.write(orjson.dumps(record) + b"\n")


def delta(before: Sample, after: Sample, name: str) -> float | None:
    first, last = before.get(name), after.get(name)
    return None if first is None or last is None else last - first


def backpressure_report(samples: list[Sample]) -> dict[str, Any]:
    """How full the ClickHouse buffer got, and whether intake stopped while it was full."""
    full = []
    peak = 0.0
    capacity = 0.0
    for sample in samples:
        buffered = sample.get("borderflow_clickhouse_buffered_rows") or 0.0
        capacity = sample.get("borderflow_clickhouse_buffer_capacity_rows") or capacity
        peak = max(peak, buffered)
        full.append(bool(capacity) and buffered >= capacity)
    # Events taken in between consecutive samples that both saw a full buffer, and no insert
    # between them (so it cannot have drained and refilled meanwhile).
    during_full = 0.0
    full_s = 0.0
    rss_full: list[int] = []
    for (a, b), (fa, fb) in zip(
        zip(samples, samples[1:], strict=False), zip(full, full[1:], strict=False), strict=False
    ):
        if fa and fb and not delta(a, b, "borderflow_clickhouse_rows_written_total"):
            full_s += b.at - a.at
            during_full += delta(a, b, "borderflow_events_processed_total") or 0.0
            rss_full += [a.memory.get("VmRSS", 0), b.memory.get("VmRSS", 0)]
    return {
        "buffer_capacity_rows": int(capacity),
        "buffer_peak_rows": int(peak),
        "seconds_full": round(full_s, 1),
        "events_processed_while_full": int(during_full),
        "rss_kib_while_full": [min(rss_full), max(rss_full)] if rss_full else None,
    }


# -- processes ------------------------------------------------------------------------------------
def borderflow(settings: Settings, *args: str, log_path: Path) -> subprocess.Popen[bytes]:
    """``borderflow ARGS`` for ``settings`` as a child process, output to ``log_path``."""
    import os

    env = {**os.environ, **settings.to_env()}
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "infra.cli", *args],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )


#: clickhouse_driver logs each failed connection attempt as a WARNING with its traceback
#: ("Failed to connect to HOST:PORT"): the writer retrying while ClickHouse is down, not a crash.
DRIVER_CONNECT_WARNING = "[WARNING] Failed to connect to "


def log_problems(path: Path) -> tuple[list[str], int]:
    """Tracebacks and crashed agents in a worker log (each with what follows it), and how many
    tracebacks were clickhouse_driver's connection warnings (not counted as problems)."""
    lines = path.read_text(errors="replace").splitlines()
    problems = []
    driver_warnings = 0
    for index, line in enumerate(lines):
        before = lines[index - 1] if index else ""
        if "Traceback (most recent call last)" in line:
            if DRIVER_CONNECT_WARNING in before:
                driver_warnings += 1
                continue
            if "crashed" in before.lower():
                continue  # the crash's own traceback: counted with it
        elif "crashed" not in line.lower():
            continue
        context = [text for text in lines[index : index + 24] if text.strip(" ^~")]
        problems.append(" | ".join(context)[:1200])
    return problems, driver_warnings
