"""Helpers of ``test_worker_kills.py``: a generated shop and its truth, replaying it, watching
workers (ClickHouse facts, ``/metrics``, the processed counters), and reading two runs'
results back to compare them.

Progress is judged from the facts in ClickHouse and the committed consumer lag, never from the
processed counters alone: after a crash the replayed events are counted again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families

from infra.migrate import clickhouse_client
from infra.processes import WorkerProcess
from models.fx import to_usd
from schemas.config import Settings
from schemas.events import CLICKS, FRAUD_LABELS, LOGISTICS, PAYMENTS
from tests.integration.test_exactly_once_kill import rollup_mismatches

REPO = Path(__file__).resolve().parents[2]
INPUT_TOPICS = (CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS)
#: Fact table and the column that names its event, per input topic.
FACT_TABLES = {
    CLICKS: ("click_events", "event_id"),
    PAYMENTS: ("fraud_scores", "txn_id"),
    FRAUD_LABELS: ("fraud_label_events", "event_id"),
    LOGISTICS: ("shipment_events", "event_id"),
}
#: Input partitions of one app: 4 topics x BORDERFLOW_TOPIC_PARTITIONS (set per run).
TRACEBACK = "Traceback (most recent call last)"


# --------------------------------------------------------------------------------------------
# The shop: a JSONL file from `borderflow generate`, and what the facts must hold
# --------------------------------------------------------------------------------------------


@dataclass
class Shop:
    path: Path
    #: Per topic, the fields ``rollup_truth`` reads (slim copies of the events).
    events: dict[str, list[dict[str, Any]]]
    #: Per topic, the ids the fact table must hold (each once).
    ids: dict[str, set[str]]
    revenue_usd: float
    users: int
    #: Per user: clicks (a profile's ``events``) and delivered shipments (its ``deliveries``).
    clicks_of: Counter[str]
    deliveries_of: Counter[str]
    #: Users whose newest click or scan (what a profile's freshness follows) is a click.
    click_last: set[str]
    generate_s: float
    read_s: float

    @property
    def total(self) -> int:
        return sum(len(values) for values in self.events.values())

    def expected_counts(self) -> dict[str, int]:
        return {FACT_TABLES[t][0]: len(self.ids[t]) for t in INPUT_TOPICS}


def generate_shop(path: Path, events: int, seed: int) -> Shop:
    """``borderflow generate`` a shop of exactly ``events`` events (all four topics)."""
    users = max(50, events // 100)  # about 100 events per user in ~2 weeks: --days 21 suffices
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "infra.cli", "generate", "--users", str(users), "--days", "21",
        "--seed", str(seed), "--max-events", str(events), "--out", str(path), "--quiet",
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    generated = time.perf_counter()
    slim: dict[str, list[dict[str, Any]]] = {topic: [] for topic in INPUT_TOPICS}
    ids: dict[str, set[str]] = {topic: set() for topic in INPUT_TOPICS}
    revenue = 0.0
    clicks_of: Counter[str] = Counter()
    deliveries_of: Counter[str] = Counter()
    newest: dict[str, tuple[int, str]] = {}
    with path.open("rb") as lines:
        for line in lines:
            envelope = orjson.loads(line)
            topic, value = envelope["topic"], envelope["value"]
            if topic == CLICKS:
                clicks_of[value["user_id"]] += 1
                slim[topic].append(
                    {"ts": value["ts"], "type": value["type"], "country": value.get("country")}
                )
                if value["type"] == "purchase" and value.get("price") and value.get("currency"):
                    revenue += to_usd(value["price"], value["currency"]) or 0.0
            elif topic == PAYMENTS:
                slim[topic].append({"ts": value["ts"], "ip_country": value.get("ip_country")})
            elif topic == FRAUD_LABELS:
                slim[topic].append({"ts": value["ts"], "label": value["label"]})
            else:
                deliveries_of[value["user_id"]] += value["status"] == "delivered"
                slim[topic].append(
                    {
                        "ts": value["ts"],
                        "status": value["status"],
                        "dest_country": value.get("dest_country"),
                    }
                )
            ids[topic].add(str(value["event_id"]))
            if topic in (CLICKS, LOGISTICS):
                user = value["user_id"]
                if user not in newest or value["ts"] >= newest[user][0]:
                    newest[user] = (value["ts"], topic)
    shop = Shop(
        path=path,
        events=slim,
        ids=ids,
        revenue_usd=revenue,
        users=users,
        clicks_of=clicks_of,
        deliveries_of=deliveries_of,
        click_last={u for u, (_, topic) in newest.items() if topic == CLICKS},
        generate_s=generated - started,
        read_s=time.perf_counter() - generated,
    )
    assert shop.total == events, f"generated {shop.total} events, wanted {events}"
    assert all(len(shop.ids[t]) == len(shop.events[t]) for t in INPUT_TOPICS), "repeated ids"
    assert all(shop.events[t] for t in INPUT_TOPICS), "a topic has no events"
    return shop


def start_replay(settings: Settings, path: Path, log_dir: Path) -> subprocess.Popen[bytes]:
    """``borderflow replay FILE --rate 0`` in the background (its output in replay.log)."""
    log = (log_dir / f"replay-{settings.app_id}.log").open("wb")
    command = [sys.executable, "-m", "infra.cli", "replay", str(path), "--rate", "0", "--quiet"]
    env = {**_environ(), **settings.to_env()}
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def finish_replay(process: subprocess.Popen[bytes], timeout_s: float = 1800.0) -> None:
    code = process.wait(timeout_s)
    assert code == 0, f"borderflow replay exited with {code}"


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


# --------------------------------------------------------------------------------------------
# Watching a run
# --------------------------------------------------------------------------------------------


class Facts:
    """Counts and written positions of one run's ClickHouse database."""

    def __init__(self, settings: Settings) -> None:
        self.client = clickhouse_client(settings, settings.clickhouse_database)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return list(self.client.execute(sql))

    def counts(self) -> dict[str, int]:
        tables = [table for table, _ in FACT_TABLES.values()]
        sql = " UNION ALL ".join(f"SELECT '{t}', count() FROM {t}" for t in tables)
        return {str(name): int(n) for name, n in self.query(sql)}

    def written(self, table: str = "click_events") -> dict[int, int]:
        """Where ``table``'s rows end, per source partition (max ``src_next_offset``)."""
        rows = self.query(
            f"SELECT src_partition, max(src_next_offset) FROM {table} GROUP BY src_partition"
        )
        return {int(p): int(o) for p, o in rows}

    def close(self) -> None:
        self.client.disconnect()


@dataclass
class Lag:
    """One worker's view from ``/metrics``: assigned input partitions and committed lag."""

    assigned: int
    lag: dict[tuple[str, int], int]

    @property
    def total(self) -> int:
        return sum(self.lag.values())

    def partitions(self, topic: str) -> set[int]:
        return {p for t, p in self.lag if t == topic}


def scrape(port: int, timeout_s: float = 5.0) -> Lag | None:
    """The worker's ``/metrics`` on ``port``; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return None
    assigned = 0
    lag: dict[tuple[str, int], int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "borderflow_assigned_partitions":
            assigned = sum(int(s.value) for s in family.samples)
        elif family.name == "borderflow_consumer_lag_messages":
            for sample in family.samples:
                key = (sample.labels["topic"], int(sample.labels["partition"]))
                lag[key] = int(sample.value)
    return Lag(assigned, lag)


class Counters:
    """The processed counters in Redis (all workers, and per ``host:pid``)."""

    def __init__(self, settings: Settings) -> None:
        self.client = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, **settings.redis_credentials()
        )
        self.key = f"{settings.redis_prefix}stats:processed"

    def total(self) -> int:
        return sum(int(v) for v in self.client.hgetall(self.key).values())

    def of_pid(self, pid: int) -> int:
        total = 0
        for key in self.client.scan_iter(match=f"{self.key}:*:{pid}"):
            total += sum(int(v) for v in self.client.hgetall(key).values())
        return total

    def close(self) -> None:
        self.client.close()


def committed_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """The consumer group's committed offsets of ``topic`` (-1: none yet), read from the broker
    without joining the group."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {**settings.confluent_config(), "group.id": settings.app_id, "enable.auto.commit": False}
    )
    try:
        wanted = [
            TopicPartition(settings.topic(topic), p) for p in range(settings.topic_partitions)
        ]
        return {tp.partition: max(-1, tp.offset) for tp in consumer.committed(wanted, timeout=30)}
    finally:
        consumer.close()


def log_crashes(paths: Iterable[Path]) -> int:
    """Tracebacks and crash lines in worker logs (a SIGKILL leaves neither)."""
    found = 0
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        found += text.count(TRACEBACK) + text.count("crashed")
    return found


def sigkill(worker: WorkerProcess) -> bool:
    """SIGKILL the worker by pid; False when it had already exited by itself."""
    alive = worker.process.poll() is None
    if alive:
        worker.process.send_signal(signal.SIGKILL)
    worker.process.wait(30)
    return alive


def wait_complete(
    facts: Facts,
    expected: dict[str, int],
    ports: list[int],
    partitions: int,
    *,
    timeout_s: float,
    tick: Any = None,
) -> float:
    """Wait until every fact is in ClickHouse and the workers on ``ports`` own all
    ``partitions`` input partitions with no committed lag; returns the monotonic time then.

    ``tick`` (if given) is called every round first, e.g. to watch workers.
    """
    deadline = time.monotonic() + timeout_s
    last: tuple[Any, ...] = ()
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        counts = facts.counts()
        if all(counts[t] >= n for t, n in expected.items()):
            views = [scrape(port) for port in ports]
            live = [v for v in views if v is not None]
            assigned = sum(v.assigned for v in live)
            lag = sum(v.total for v in live)
            last = (counts, assigned, lag)
            if assigned == partitions and lag == 0:
                return time.monotonic()
        else:
            last = (counts,)
        time.sleep(1.0)
    raise AssertionError(f"not complete after {timeout_s:.0f}s: {last} of {expected}")


# --------------------------------------------------------------------------------------------
# Checking the facts
# --------------------------------------------------------------------------------------------


def check_facts(facts: Facts, shop: Shop) -> dict[str, Any]:
    """Per fact table: expected, found (count() without FINAL), distinct, lost, unknown."""
    out: dict[str, Any] = {"expected": {}, "found": {}, "distinct": {}, "lost": {}, "dup": {}}
    for topic, (table, key) in FACT_TABLES.items():
        [(count, distinct)] = facts.query(f"SELECT count(), uniqExact({key}) FROM {table}")
        found = {str(row[0]) for row in facts.query(f"SELECT DISTINCT {key} FROM {table}")}
        wanted = shop.ids[topic]
        out["expected"][table] = len(wanted)
        out["found"][table] = int(count)
        out["distinct"][table] = int(distinct)
        out["lost"][table] = len(wanted - found)
        # A row twice, or a row of no event of ours.
        out["dup"][table] = int(count) - int(distinct) + len(found - wanted)
    # Rollups count what reaches them: more events than distinct facts is a double.
    rollup = dict(facts.query("SELECT topic, sum(events) FROM events_per_minute GROUP BY topic"))
    out["rollup_overcount"] = {
        topic: int(rollup.get(topic, 0)) - out["distinct"][FACT_TABLES[topic][0]]
        for topic in INPUT_TOPICS
    }
    return out


def check_rollups(facts: Facts, shop: Shop) -> dict[str, int]:
    """Keys that differ from the truth, per rollup (0 everywhere: exact)."""
    return rollup_mismatches(facts.query, shop.events, shop.revenue_usd)


# --------------------------------------------------------------------------------------------
# Comparing a run with the reference
# --------------------------------------------------------------------------------------------


def compare_fraud_scores(ref: Facts, run: Facts) -> dict[str, Any]:
    sql = "SELECT txn_id, score, model_version, is_alert, threshold FROM fraud_scores"
    mine = {row[0]: row[1:] for row in run.query(sql)}
    theirs = {row[0]: row[1:] for row in ref.query(sql)}
    both = set(mine) & set(theirs)
    score = sum(1 for t in both if mine[t][0] != theirs[t][0])
    version = sum(1 for t in both if mine[t][1] != theirs[t][1])
    alert = sum(1 for t in both if mine[t][2] != theirs[t][2])
    return {
        "txns": len(theirs),
        "missing": len(set(theirs) - set(mine)),
        "extra": len(set(mine) - set(theirs)),
        "score_mismatches": score,
        "model_version_mismatches": version,
        "alert_mismatches": alert,
        "max_abs_diff": max((abs(mine[t][0] - theirs[t][0]) for t in both), default=0.0),
        "alerts_ref": sum(int(v[2]) for v in theirs.values()),
        "alerts_run": sum(int(v[2]) for v in mine.values()),
    }


def compare_derived_facts(ref: Facts, run: Facts) -> dict[str, Any]:
    """Facts whose values come from the soft serving models too: counts, and the share of rows
    equal to the reference's."""
    out: dict[str, Any] = {}
    for table, key, columns in (
        ("rec_predictions", "event_id", "hit_rank, recs_size, personalised, recs_age_ms"),
        ("shipment_predictions", "event_id", "predicted_delivery_ts_ms, delay_risk"),
        ("shipments FINAL", "order_id", "outcome, transit_days, on_time, customs_hours"),
        ("click_events", "event_id", "segment"),
    ):
        sql = f"SELECT {key}, {columns} FROM {table}"
        mine = {row[0]: row[1:] for row in run.query(sql)}
        theirs = {row[0]: row[1:] for row in ref.query(sql)}
        both = set(mine) & set(theirs)
        equal = sum(1 for k in both if mine[k] == theirs[k])
        name = table.split()[0] + ("_segment" if table == "click_events" else "")
        out[name] = {
            "ref": len(theirs),
            "run": len(mine),
            "missing": len(set(theirs) - set(mine)),
            "extra": len(set(mine) - set(theirs)),
            "equal_share": round(equal / len(both), 4) if both else 1.0,
        }
    alerts = "SELECT uniqExact(alert_id) FROM logistics_alerts"
    out["logistics_alerts"] = {"ref": ref.query(alerts)[0][0], "run": run.query(alerts)[0][0]}
    segments = (
        "SELECT toUInt32(hour), country, segment, sum(purchases) FROM segment_mix_per_hour "
        "GROUP BY hour, country, segment"
    )
    mine_mix = Counter({tuple(r[:3]): int(r[3]) for r in run.query(segments)})
    ref_mix = Counter({tuple(r[:3]): int(r[3]) for r in ref.query(segments)})
    out["segment_mix_keys_differ"] = sum(
        1 for k in set(mine_mix) | set(ref_mix) if mine_mix.get(k, 0) != ref_mix.get(k, 0)
    )
    return out


@dataclass
class ServingState:
    """Everything a run left in Redis that storefronts and the next worker read."""

    profiles: dict[str, dict[str, str]] = field(default_factory=dict)
    recs: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    meta: dict[str, dict[str, str]] = field(default_factory=dict)
    shipments: dict[str, dict[str, str]] = field(default_factory=dict)
    item_lists: dict[str, list[str]] = field(default_factory=dict)
    fraud_checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)
    serving_checkpoint: dict[str, str] = field(default_factory=dict)


def read_serving_state(settings: Settings) -> ServingState:
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, **settings.redis_credentials()
    )
    prefix = settings.redis_prefix
    state = ServingState()
    try:
        keys = sorted(client.scan_iter(match=f"{prefix}*", count=5000))
        hashes: dict[str, list[str]] = {"profile": [], "meta": [], "shipment": []}
        zsets: dict[str, list[str]] = {"recs": [], "lists": []}
        for key in keys:
            name = key[len(prefix) :]
            kind = name.split(":", 1)[0]
            if kind == "profile":
                hashes["profile"].append(key)
            elif kind == "recs":
                (hashes["meta"] if name.endswith(":meta") else zsets["recs"]).append(key)
            elif kind == "shipment":
                hashes["shipment"].append(key)
            elif kind in ("fbt", "popular"):
                zsets["lists"].append(key)
            elif name.startswith("fraud:checkpoint:"):
                state.fraud_checkpoints[name.rsplit(":", 1)[1]] = _without_blob(client, key)
            elif name.startswith("serving:checkpoint:"):
                state.serving_checkpoint = _without_blob(client, key)

        def chunks(items: list[str], n: int = 1000) -> Iterable[list[str]]:
            for i in range(0, len(items), n):
                yield items[i : i + n]

        for kind, target in (
            ("profile", state.profiles),
            ("meta", state.meta),
            ("shipment", state.shipments),
        ):
            for chunk in chunks(hashes[kind]):
                pipe = client.pipeline(transaction=False)
                for key in chunk:
                    pipe.hgetall(key)
                for key, value in zip(chunk, pipe.execute(), strict=True):
                    ident = key[len(prefix) :].split(":")[1]
                    target[ident] = value
        for chunk in chunks(zsets["recs"]):
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.zrevrange(key, 0, -1, withscores=True)
            for key, rows in zip(chunk, pipe.execute(), strict=True):
                state.recs[key[len(prefix) :].split(":")[1]] = [(i, float(s)) for i, s in rows]
        for chunk in chunks(zsets["lists"]):
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.zrevrange(key, 0, -1)
            for key, rows in zip(chunk, pipe.execute(), strict=True):
                state.item_lists[key[len(prefix) :]] = list(rows)
    finally:
        client.close()
    return state


def _without_blob(client: redis.Redis, key: str) -> dict[str, str]:
    """A checkpoint hash without its (large, binary) image."""
    fields = [str(f) for f in client.hkeys(key) if f != "blob"]
    return {f: str(v) for f, v in zip(fields, client.hmget(key, fields), strict=True)}


#: Fields holding the wall-clock time of a write, not a result.
WALL_CLOCK_FIELDS = frozenset({"updated_at", "saved_at_ms", "bytes"})


def _field_diffs(
    ref: dict[str, dict[str, str]], run: dict[str, dict[str, str]]
) -> tuple[int, Counter[str]]:
    """(keys whose hash is equal, per field: keys where it differs), over keys in both."""
    equal = 0
    differ: Counter[str] = Counter()
    for key in set(ref) & set(run):
        a, b = ref[key], run[key]
        fields = [f for f in set(a) | set(b) if f not in WALL_CLOCK_FIELDS]
        bad = [f for f in fields if a.get(f) != b.get(f)]
        differ.update(bad)
        equal += not bad
    return equal, differ


def profiles_vs_truth(state: ServingState, shop: Shop) -> dict[str, int]:
    """Profiles whose click count (``events``) or ``deliveries`` is not the truth's: an event
    applied twice (or lost) by the Faust table state."""
    events = [
        int(p.get("events") or 0) - shop.clicks_of[u]
        for u, p in state.profiles.items()
        if u in shop.clicks_of
    ]
    deliveries = [
        int(p.get("deliveries") or 0) - shop.deliveries_of[u] for u, p in state.profiles.items()
    ]
    return {
        "users_events_over": sum(1 for d in events if d > 0),
        "events_over": sum(d for d in events if d > 0),
        "users_events_under": sum(1 for d in events if d < 0),
        "users_deliveries_over": sum(1 for d in deliveries if d > 0),
        "users_deliveries_under": sum(1 for d in deliveries if d < 0),
    }


def compare_serving(
    ref: ServingState, run: ServingState, top_n: int, click_last: set[str]
) -> dict[str, Any]:
    users = set(ref.profiles) & set(run.profiles)
    meta_users = set(ref.meta) & set(run.meta)
    # A profile hash is a snapshot as of the event in its meta (``last_event_id``). Ordinary
    # shipment scans update the table but not the hash, so two runs can leave snapshots of
    # different moments; only snapshots of the same moment must be equal.
    same_as_of = {
        u
        for u in users & meta_users
        if ref.meta[u].get("last_event_id") == run.meta[u].get("last_event_id")
    }
    profile_equal, profile_fields = _field_diffs(
        {u: ref.profiles[u] for u in same_as_of}, {u: run.profiles[u] for u in same_as_of}
    )
    _, other_fields = _field_diffs(
        {u: ref.profiles[u] for u in users - same_as_of},
        {u: run.profiles[u] for u in users - same_as_of},
    )
    recs_users = set(ref.meta)  # a user with an empty list has meta but no recs key
    identical = same_set = scores = 0
    overlap = 0.0
    for user in recs_users:
        a, b = ref.recs.get(user, []), run.recs.get(user, [])
        items_a, items_b = [i for i, _ in a[:top_n]], [i for i, _ in b[:top_n]]
        identical += items_a == items_b
        same_set += set(items_a) == set(items_b)
        scores += a == b
        size = max(len(items_a), len(items_b))
        overlap += len(set(items_a) & set(items_b)) / size if size else 1.0
    n_recs = max(1, len(recs_users))

    def share(n: int, of: int) -> float:
        return round(n / of, 4) if of else 1.0

    def meta_equal(name: str, among: set[str] | None = None) -> int:
        chosen = meta_users if among is None else meta_users & among
        return sum(1 for u in chosen if ref.meta[u].get(name) == run.meta[u].get(name))

    click_last_users = set(ref.meta) & click_last

    shipment_equal, shipment_fields = _field_diffs(ref.shipments, run.shipments)
    lists: dict[str, dict[str, Any]] = {}
    for kind in ("fbt", "popular"):
        names = {k for k in set(ref.item_lists) | set(run.item_lists) if k.startswith(kind)}
        equal = sum(1 for k in names if ref.item_lists.get(k) == run.item_lists.get(k))
        lists[kind] = {"keys": len(names), "identical_share": share(equal, len(names))}
    fraud_equal, fraud_fields = _field_diffs(ref.fraud_checkpoints, run.fraud_checkpoints)
    serving_fields = sorted(
        f
        for f in set(ref.serving_checkpoint) | set(run.serving_checkpoint)
        if f not in WALL_CLOCK_FIELDS
        and ref.serving_checkpoint.get(f) != run.serving_checkpoint.get(f)
    )
    return {
        "users_ref": len(ref.profiles),
        "users_run": len(run.profiles),
        "users_missing": len(set(ref.profiles) - set(run.profiles)),
        "users_extra": len(set(run.profiles) - set(ref.profiles)),
        "profiles_same_as_of": len(same_as_of),
        "profiles_equal_share": share(profile_equal, len(same_as_of)),
        "profile_fields_differ": dict(profile_fields.most_common()),
        "profile_fields_differ_other_as_of": dict(other_fields.most_common()),
        "last_event_id_equal_share": share(meta_equal("last_event_id"), len(ref.meta)),
        # The newest event a click: its write is the last one in any run, so the same id.
        "last_event_id_equal_share_click_last": share(
            meta_equal("last_event_id", click_last_users), len(click_last_users)
        ),
        "click_last_users": len(click_last_users),
        "meta_users_missing": len(set(ref.meta) - set(run.meta)),
        "basis_equal_share": share(meta_equal("basis"), len(ref.meta)),
        "recs_users": len(recs_users),
        "recs_identical_share": share(identical, n_recs),
        "recs_same_set_share": share(same_set, n_recs),
        "recs_scores_identical_share": share(scores, n_recs),
        "recs_mean_overlap": round(overlap / n_recs, 4),
        "shipments_ref": len(ref.shipments),
        "shipments_run": len(run.shipments),
        "shipments_equal_share": share(
            shipment_equal, len(set(ref.shipments) & set(run.shipments))
        ),
        "shipment_fields_differ": dict(shipment_fields.most_common()),
        "item_lists": lists,
        "fraud_checkpoints_equal": f"{fraud_equal}/{len(ref.fraud_checkpoints)}",
        "fraud_checkpoint_fields_differ": dict(fraud_fields.most_common()),
        "serving_checkpoint_fields_differ": {
            f: [ref.serving_checkpoint.get(f), run.serving_checkpoint.get(f)]
            for f in serving_fields
        },
    }


def drop_run(settings: Settings) -> None:
    """Drop a run's Redis keys and ClickHouse database (best effort)."""
    client = redis.Redis.from_url(settings.redis_url, **settings.redis_credentials())
    try:
        batch: list[Any] = []
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()
    ch = clickhouse_client(settings)
    try:
        ch.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    finally:
        ch.disconnect()


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, sort_keys=False, default=str)
