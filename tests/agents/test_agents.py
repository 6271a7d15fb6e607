"""The agents' batch handlers, with fakes for everything that leaves the process.

Each test builds the real topology (``build_topology``) and a :class:`Runtime` whose Redis
store and ClickHouse writer are in-memory fakes; the two output topics get async fakes for
``send``. Faust events are stand-ins with ``.value`` and ``.message``, so the handlers run
without a broker or a worker.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from models.fraud import HOUR_MS
from models.profile import UserProfile
from models.shipments import status_text
from schemas.config import Settings
from schemas.events import DeadLetter, FraudAlert
from sinks.clickhouse import TABLE_COLUMNS, ClickHouseWriter
from sinks.redis_store import RedisStore, UserState
from sinks.redis_writes import PendingWrites
from streams.agents.clicks import process_clicks
from streams.agents.fraud_labels import process_labels
from streams.agents.logistics import process_scans
from streams.agents.payments import process_payments
from streams.agents.repeats import duplicates
from streams.runtime import Runtime
from streams.topology import build_topology

pytestmark = pytest.mark.timeout(30)

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
MINUTE = 60_000


# -- fakes ----------------------------------------------------------------------------------------


@dataclass
class FakeMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp: float  # producer CreateTime, seconds
    refcount: int = 0
    acks: list[Any] = field(default_factory=list)

    def incref(self, n: int = 1) -> None:
        self.refcount += n

    def ack(self, consumer: Any, n: int = 1) -> bool:
        self.acks.append(consumer)
        self.refcount -= n
        return self.refcount == 0


@dataclass
class FakeEvent:
    value: bytes | None
    message: FakeMessage


class FakeRedisStore:
    def __init__(self) -> None:
        self.state_writes: list[list[UserState]] = []
        self.processed: Counter[str] = Counter()
        self.latencies: list[tuple[str, list[float]]] = []
        self.checkpoints: dict[tuple[str, int], bytes] = {}
        self.serving_checkpoints: dict[str, bytes] = {}
        self.serving_meta: dict[str, Any] = {}
        self.alerts: list[bytes] = []
        self.item_lists: dict[str, list[tuple[str, float]]] = {}
        self.popular_lists: dict[str, list[tuple[str, float]]] = {}
        self.shipments: dict[str, dict[str, Any]] = {}
        #: The newest state written per user (what bf:profile/bf:recs hold).
        self.user_states: dict[str, UserState] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        #: Writes and deletions in the order they happened: ("write"|"forget", user_id).
        self.log: list[tuple[str, str]] = []
        #: True: every serving write fails as if Redis were unreachable.
        self.down = False

    async def write_user_states(
        self, states: Iterable[UserState], *, updated_at_ms: int, processed: Mapping[str, int]
    ) -> list[int]:
        batch = list(states)
        self.state_writes.append(batch)
        self.processed.update(processed)
        for state in batch:
            self.user_states[state.user_id] = state
            self.log.append(("write", state.user_id))
        return [1] * len(batch)

    async def write_serving_batch(self, batch: PendingWrites, *, updated_at_ms: int) -> None:
        """The real store's one pipeline, played by the fake's methods (tests wrap them)."""
        if self.down:
            raise RedisConnectionError("Redis is down (test)")
        if batch.user_states or batch.processed:
            await self.write_user_states(
                batch.user_states.values(), updated_at_ms=updated_at_ms, processed=batch.processed
            )
        for kind in ("fbt", "popular"):
            lists = {key: items for (k, key), items in batch.item_lists.items() if k == kind}
            if lists:
                await self.write_item_lists(lists, kind=kind)
        if batch.shipments:
            for ttl_s in sorted({ttl for _, ttl in batch.shipments.values()}):
                views = [fields for fields, ttl in batch.shipments.values() if ttl == ttl_s]
                await self.write_shipments(views, ttl_s=ttl_s)
        if batch.alerts:
            await self.publish_alerts(batch.alerts)
        for stage, produced in batch.latency_origins.items():
            await self.record_latencies(stage, [updated_at_ms - ts for ts in produced])

    async def forget_user(self, user_id: str, order_ids: Iterable[str] = ()) -> dict[str, int]:
        self.log.append(("forget", user_id))
        present = self.user_states.pop(user_id, None) is not None
        theirs = [o for o in order_ids if self.shipments.get(o, {}).get("user_id") == user_id]
        for order_id in theirs:
            del self.shipments[order_id]
        return {"profile": int(present), "recs": 2 * int(present), "shipments": len(theirs)}

    async def forget_alerts(self, user_id: str) -> int:
        kept = [a for a in self.alerts if orjson.loads(a)["user_id"] != user_id]
        removed, self.alerts = len(self.alerts) - len(kept), kept
        return removed

    async def save_privacy_receipt(
        self, request_id: str, fields: Mapping[str, Any], ttl_s: int
    ) -> None:
        self.receipts[request_id] = dict(fields)

    async def read_privacy_receipt(self, request_id: str) -> dict[str, str]:
        return {k: str(v) for k, v in self.receipts.get(request_id, {}).items()}

    async def count_processed(self, processed: Mapping[str, int]) -> None:
        self.processed.update(processed)

    async def record_latencies(self, stage: str, samples_ms: list[float]) -> None:
        self.latencies.append((stage, samples_ms))

    async def load_checkpoint(self, app_id: str, partition: int) -> bytes | None:
        return self.checkpoints.get((app_id, partition))

    async def save_checkpoint(
        self, app_id: str, partition: int, blob: bytes, meta: Mapping[str, Any]
    ) -> None:
        self.checkpoints[(app_id, partition)] = blob

    async def write_shipments(
        self, shipments: Iterable[Mapping[str, Any]], *, ttl_s: int = 0
    ) -> list[int]:
        results = []
        for fields in shipments:  # the same event-time guard as the Lua script
            stored = self.shipments.get(str(fields["order_id"]))
            ok = stored is None or int(stored["last_scan_ts"]) <= int(fields["last_scan_ts"])
            if ok:
                self.shipments[str(fields["order_id"])] = dict(fields)
            results.append(int(ok))
        return results

    async def load_serving_checkpoint(self, app_id: str) -> bytes | None:
        return self.serving_checkpoints.get(app_id)

    async def save_serving_checkpoint(
        self, app_id: str, blob: bytes, meta: Mapping[str, Any]
    ) -> None:
        self.serving_checkpoints[app_id] = blob
        self.serving_meta = dict(meta)

    async def write_item_lists(
        self, lists: Mapping[str, list[tuple[str, float]]], *, kind: str = "fbt"
    ) -> None:
        if kind == "fbt":
            self.item_lists.update(lists)
        else:
            assert kind == "popular"
            self.popular_lists.update(lists)

    async def publish_alerts(self, alerts: Iterable[bytes]) -> None:
        self.alerts.extend(alerts)

    async def aclose(self) -> None:
        pass


class FakeWriter:
    """Keeps rows and durability callbacks; ``make_durable`` plays the writer thread."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[Any, ...]]] = {}
        self.callbacks: list[Callable[[], None]] = []

    def add(
        self,
        table: str,
        rows: list[tuple[Any, ...]],
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        assert table in TABLE_COLUMNS
        for row in rows:
            assert len(row) == len(TABLE_COLUMNS[table]), (table, row)
        self.rows.setdefault(table, []).extend(rows)
        if on_durable is not None:
            self.callbacks.append(on_durable)

    def add_callback(self, on_durable: Callable[[], None]) -> None:
        self.callbacks.append(on_durable)

    def has_capacity(self) -> bool:
        return True

    def wait_for_capacity(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float = 30.0) -> None:
        pass

    def flush(self, timeout: float = 60.0) -> bool:
        self.make_durable()
        return True

    def make_durable(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()

    def table(self, name: str) -> list[dict[str, Any]]:
        return [dict(zip(TABLE_COLUMNS[name], row, strict=True)) for row in self.rows.get(name, [])]


@dataclass
class Harness:
    runtime: Runtime
    settings: Settings
    redis: FakeRedisStore
    writer: FakeWriter
    deadletters: list[dict[str, Any]]
    alerts: list[tuple[bytes, dict[str, Any]]]
    table_writes: Counter[bytes]
    logistics_alerts: list[tuple[bytes, dict[str, Any]]]
    offsets: Counter[tuple[str, int]] = field(default_factory=Counter)

    def event(
        self,
        topic: str,
        value: bytes | dict[str, Any] | list[Any],
        partition: int = 0,
        key: bytes | None = None,
    ) -> FakeEvent:
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
        offset = self.offsets[(topic, partition)]
        self.offsets[(topic, partition)] += 1
        if key is None and isinstance(value, dict):
            key = str(value.get("user_id", "")).encode()
        message = FakeMessage(self.settings.topic(topic), partition, offset, key, T0 / 1000)
        return FakeEvent(raw, message)

    def replay(self, event: FakeEvent) -> FakeEvent:
        """The same message read again (after a crash): same bytes, same position."""
        old = event.message
        message = FakeMessage(old.topic, old.partition, old.offset, old.key, old.timestamp)
        return FakeEvent(event.value, message)

    async def settle(self) -> None:
        """Run the writer's callbacks, then let the loop run what they scheduled."""
        self.writer.make_durable()
        for _ in range(3):
            await asyncio.sleep(0)


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    settings = Settings(
        topic_prefix="agents-",
        topic_partitions=4,
        app_id="borderflow-agents-test",
        fraud_label_wait_s=0.0,
        fraud_label_apply_delay_s=3600.0,
        recs_top_n=10,
    )
    topology = build_topology(settings)
    redis = FakeRedisStore()
    writer = FakeWriter()
    runtime = Runtime(
        settings,
        topology,
        redis=cast(RedisStore, redis),
        clickhouse=cast(ClickHouseWriter, writer),
    )
    deadletters: list[dict[str, Any]] = []
    alerts: list[tuple[bytes, dict[str, Any]]] = []

    async def send_deadletter(*, key: Any = None, value: bytes, **_: Any) -> None:
        deadletters.append({"key": key, **orjson.loads(value)})

    async def send_alert(*, key: bytes, value: bytes, **_: Any) -> None:
        alerts.append((key, orjson.loads(value)))

    monkeypatch.setattr(topology.deadletter, "send", send_deadletter)
    monkeypatch.setattr(topology.fraud_alerts, "send", send_alert)
    logistics_alerts: list[tuple[bytes, dict[str, Any]]] = []

    async def send_logistics_alert(*, key: bytes, value: bytes, **_: Any) -> None:
        logistics_alerts.append((key, orjson.loads(value)))

    monkeypatch.setattr(topology.logistics_alerts, "send", send_logistics_alert)

    # Writing to the Faust table works outside a worker (the changelog record is only
    # buffered), so the real table is used; its per-key set hook is wrapped to count writes.
    table_writes: Counter[bytes] = Counter()
    table = topology.user_profiles
    original_on_key_set = table.on_key_set

    def counting_on_key_set(key: bytes, value: bytes) -> None:
        table_writes[key] += 1
        original_on_key_set(key, value)

    monkeypatch.setattr(table, "on_key_set", counting_on_key_set)

    # The consumer's high-water marks only exist in a running worker: treat the label
    # stream as caught up (what a worker reports once it has read every label).
    monkeypatch.setattr(runtime, "labels_caught_up", lambda partition: True)
    # No ClickHouse here: every fact table starts empty (written positions 0).
    monkeypatch.setattr(runtime.positions, "_read", lambda tables, partitions: {})
    return Harness(
        runtime, settings, redis, writer, deadletters, alerts, table_writes, logistics_alerts
    )


_ids = itertools.count()


def click(user: str, ts: int, **overrides: Any) -> dict[str, Any]:
    value = {
        "event_id": f"c{next(_ids)}",
        "ts": ts,
        "user_id": user,
        "session_id": f"s-{user}",
        "type": "view",
        "item_id": "i1",
        "country": "DE",
    }
    value.update(overrides)
    return value


def payment(user: str, ts: int, **overrides: Any) -> dict[str, Any]:
    value = {
        "event_id": f"p{next(_ids)}",
        "ts": ts,
        "user_id": user,
        "card_id": f"card-{user}",
        "merchant_id": "m1",
        "amount": 25.0,
        "currency": "EUR",
        "billing_country": "DE",
        "shipping_country": "DE",
        "ip_country": "DE",
        "device_id": f"dev-{user}",
    }
    value.update(overrides)
    return value


def assert_deadletter(record: dict[str, Any], event: FakeEvent, field_name: str | None) -> None:
    DeadLetter.model_validate({k: v for k, v in record.items() if k != "key"})
    assert record["source_topic"] == event.message.topic
    assert record["partition"] == event.message.partition
    assert record["offset"] == event.message.offset
    assert record["key"] == event.message.key
    if field_name is not None:
        assert record["error"].startswith(f"{field_name}:"), record["error"]


# -- clicks ---------------------------------------------------------------------------------------


async def test_clicks_write_one_state_per_user_with_the_latest_event(harness: Harness) -> None:
    u1 = [click("u1", T0 + i * MINUTE, item_id=f"item{i}", category="shoes") for i in range(6)]
    u1[2]["ts"] = T0 + 30 * MINUTE  # the newest by event time, though not the last delivered
    u1.append(
        click("u1", T0 + 10 * MINUTE, type="purchase", item_id="item9", price=10.0, currency="EUR")
    )
    u2 = [click("u2", T0 + i * MINUTE, item_id=f"item{i}") for i in range(2)]
    events = [harness.event("clicks", value) for value in [*u1, *u2]]

    assert await process_clicks(harness.runtime, events) == len(u1) + len(u2)

    [states] = harness.redis.state_writes
    by_user = {state.user_id: state for state in states}
    assert set(by_user) == {"u1", "u2"}
    assert (by_user["u1"].event_id, by_user["u1"].event_ts) == (u1[2]["event_id"], T0 + 30 * MINUTE)
    assert (by_user["u2"].event_id, by_user["u2"].event_ts) == (u2[1]["event_id"], u2[1]["ts"])
    profile = by_user["u1"].profile
    assert profile["events"] == len(u1)
    assert profile["frequency_purchases"] == 1
    assert profile["monetary_usd"] == pytest.approx(10.8)
    assert profile["country"] == "DE"
    assert "item9" not in [item for item, _ in by_user["u1"].recs]  # just bought
    assert harness.redis.processed == Counter({"clicks": 9})

    # One table write per user for the whole batch, holding the final profile.
    assert harness.table_writes == Counter({b"u1": 1, b"u2": 1})
    stored = UserProfile.from_bytes(harness.runtime.topology.user_profiles[b"u1"])
    assert stored.events == len(u1)
    assert stored.last_event_id == u1[2]["event_id"]

    # One fact row per click, tagged with its Kafka position (rollups are views over it).
    facts = harness.writer.table("click_events")
    assert [row["event_id"] for row in facts] == [v["event_id"] for v in [*u1, *u2]]
    assert [row["src_next_offset"] for row in facts] == list(range(1, 10))
    assert {row["src_partition"] for row in facts} == {0}
    [purchase] = [row for row in facts if row["click_type"] == "purchase"]
    assert purchase["amount_usd"] == pytest.approx(10.8)
    assert harness.writer.table("events_per_minute") == []  # written by ClickHouse views

    # The purchase placed the buyer in an RFM segment, and its fact row carries it.
    assert profile["segment"] in {"high-value", "dynamic", "growth"}
    assert by_user["u2"].profile["segment"] == ""  # no purchase yet
    assert purchase["segment"] == profile["segment"] and purchase["country"] == "DE"
    assert {row["segment"] for row in facts if row["click_type"] != "purchase"} == {""}


async def test_the_next_batch_continues_the_stored_profile(harness: Harness) -> None:
    first = click("u1", T0)
    await process_clicks(harness.runtime, [harness.event("clicks", first)])
    second = click("u1", T0 + MINUTE, item_id="i2")
    await process_clicks(
        harness.runtime, [harness.event("clicks", first), harness.event("clicks", second)]
    )  # the first click is redelivered
    state = harness.redis.state_writes[-1][0]
    assert state.profile["events"] == 2
    assert state.event_id == second["event_id"]
    assert harness.table_writes[b"u1"] == 2  # one per batch


async def test_users_get_recommendations_from_other_sessions(harness: Harness) -> None:
    events = []
    for i in range(5):  # five other users: phone, then case
        events.append(harness.event("clicks", click(f"o{i}", T0, item_id="phone")))
        events.append(harness.event("clicks", click(f"o{i}", T0 + 1, item_id="case")))
    await process_clicks(harness.runtime, events)
    await process_clicks(
        harness.runtime, [harness.event("clicks", click("me", T0 + 2, item_id="phone"))]
    )
    [state] = harness.redis.state_writes[-1]
    assert state.recs[0][0] == "case"
    assert len(state.recs) <= harness.settings.recs_top_n


async def test_opted_out_user_gets_only_popular_items(harness: Harness) -> None:
    events = []
    for i in range(3):
        events.append(harness.event("clicks", click(f"o{i}", T0, item_id="a")))
        events.append(harness.event("clicks", click(f"o{i}", T0 + 1, item_id="niche")))
    for i in range(6):
        events.append(harness.event("clicks", click(f"p{i}", T0, item_id="bestseller")))
    await process_clicks(harness.runtime, events)
    opted_out = click("me", T0 + 2, item_id="a", personalisation=False)
    await process_clicks(harness.runtime, [harness.event("clicks", opted_out)])
    [state] = harness.redis.state_writes[-1]
    assert state.profile["personalisation"] == 0
    expected = harness.runtime.serving.recommender.recommend(
        [], country="DE", n=harness.settings.recs_top_n, personalised=False
    )
    assert [item for item, _ in state.recs] == [item for item, _ in expected]
    assert state.recs[0][0] == "bestseller"
    assert state.meta == {"personalised": 0, "basis": "popular-country"}
    # Trending lists for users the storefront knows nothing about: the country and global.
    assert set(harness.redis.popular_lists) == {"DE", "global"}
    assert harness.redis.popular_lists["DE"][0][0] == "bestseller"
    # A personalised user who clicked the same item gets the session's neighbour first.
    await process_clicks(
        harness.runtime, [harness.event("clicks", click("you", T0 + 3, item_id="a"))]
    )
    [state] = harness.redis.state_writes[-1]
    assert state.recs[0][0] == "niche"
    assert state.meta == {"personalised": 1, "basis": "session"}


async def test_each_click_is_scored_against_the_recs_served_before_it(harness: Harness) -> None:
    events = []
    for i in range(4):  # others: phone -> case
        events.append(harness.event("clicks", click(f"o{i}", T0, item_id="phone")))
        events.append(harness.event("clicks", click(f"o{i}", T0 + 1, item_id="case")))
    await process_clicks(harness.runtime, events)
    harness.writer.rows.clear()
    first = click("me", T0 + MINUTE, item_id="phone")
    await process_clicks(harness.runtime, [harness.event("clicks", first)])
    assert harness.writer.table("rec_predictions") == []  # no recs had been served to "me"
    served = [item for item, _ in harness.redis.state_writes[-1][0].recs]
    assert served[0] == "case"

    hit = click("me", T0 + 2 * MINUTE, item_id="case")
    miss = click("me", T0 + 3 * MINUTE, item_id="never-recommended")
    search = click("me", T0 + 4 * MINUTE, type="search", item_id=None, query="x")
    # One batch: both clicks are scored against what the storefront showed before the batch.
    batch = [harness.event("clicks", v) for v in (hit, miss, search)]
    await process_clicks(harness.runtime, batch)
    rows = harness.writer.table("rec_predictions")
    assert [(r["event_id"], r["hit_rank"]) for r in rows] == [
        (hit["event_id"], 1),
        (miss["event_id"], 0),
    ]
    assert rows[0]["recs_size"] == len(served)
    assert rows[0]["recs_age_ms"] == MINUTE  # served for the click at T0 + 1 min
    assert rows[1]["recs_age_ms"] == 2 * MINUTE
    assert (rows[0]["click_type"], rows[0]["country"], rows[0]["personalised"]) == ("view", "DE", 1)

    # Replayed after a crash (same position): the profile has applied it, and rebuilds the
    # same row from what it remembers, in case ClickHouse never got it...
    harness.writer.rows.clear()
    hit_event = next(e for e in batch if orjson.loads(cast(bytes, e.value)) == hit)
    await process_clicks(harness.runtime, [harness.replay(hit_event)])
    [again] = harness.writer.table("rec_predictions")
    assert again == rows[0]
    # ... and writes nothing when ClickHouse's written position is past it.
    harness.writer.rows.clear()
    redelivered = harness.replay(hit_event)
    harness.runtime.positions._known[("rec_predictions", 0)] = redelivered.message.offset + 1
    harness.runtime.positions._known[("click_events", 0)] = redelivered.message.offset + 1
    await process_clicks(harness.runtime, [redelivered])
    assert harness.writer.table("rec_predictions") == []
    assert harness.writer.table("click_events") == []
    assert harness.runtime.positions.skipped == {"rec_predictions": 1, "click_events": 1}


async def test_items_bought_in_one_session_become_bought_together_lists(harness: Harness) -> None:
    def buy(user: str, item: str, ts: int, session: str) -> dict[str, Any]:
        return click(user, ts, type="purchase", item_id=item, session_id=session)

    events = [
        buy("u1", "phone", T0, "s1"),
        buy("u1", "case", T0 + 1, "s1"),
        buy("u2", "phone", T0, "s2"),
        buy("u2", "charger", T0 + 1, "s2"),
        buy("u2", "case", T0 + 2, "s2"),
        buy("u3", "phone", T0, "s3"),  # bought alone: no pair
        buy("u1", "cable", T0 + 3 * 3_600_000, "s4"),  # a later session of u1: not with phone
    ]
    await process_clicks(harness.runtime, [harness.event("clicks", v) for v in events])
    lists = harness.redis.item_lists
    assert set(lists) == {"phone", "case", "charger"}
    assert [item for item, _ in lists["phone"]] == ["case", "charger"]
    assert lists["phone"][0][1] == pytest.approx(1.0)  # both phone baskets hold a case
    assert lists["phone"][1][1] == pytest.approx(0.5)
    assert {item for item, _ in lists["case"]} == {"phone", "charger"}
    harness.redis.item_lists.clear()
    await process_clicks(harness.runtime, [harness.event("clicks", click("u9", T0, item_id="x"))])
    assert harness.redis.item_lists == {}  # nothing bought: nothing rewritten


def scan(user: str, order: str, status: str, ts: int, **overrides: Any) -> dict[str, Any]:
    value = {
        "event_id": f"sc{next(_ids)}",
        "ts": ts,
        "user_id": user,
        "order_id": order,
        "carrier": "dhl",
        "origin_country": "CN",
        "dest_country": "DE",
        "status": status,
    }
    value.update(overrides)
    return value


async def test_deliveries_update_the_profile_and_steer_recs_to_fast_lanes(
    harness: Harness,
) -> None:
    day = 86_400_000
    # Two popular items: one ships from China (5 clicks), one from Germany (4 clicks).
    events = [
        harness.event("clicks", click(f"o{i}", T0, item_id="from-cn", origin_country="CN"))
        for i in range(5)
    ]
    events += [
        harness.event("clicks", click(f"p{i}", T0, item_id="from-de", origin_country="DE"))
        for i in range(4)
    ]
    events.append(harness.event("clicks", click("me", T0 + 2, item_id="other")))
    await process_clicks(harness.runtime, events)
    [state] = [s for s in harness.redis.state_writes[-1] if s.user_id == "me"]
    ranked = [item for item, _ in state.recs]
    assert ranked.index("from-cn") < ranked.index("from-de")  # the more popular

    # Deliveries into DE: 3 from CN take 14 days (one late), 3 from DE take 2 days.
    scans = []
    for k in range(3):
        for origin, days in (("CN", 14), ("DE", 2)):
            order = f"{origin}-{k}"
            promised = T0 + 10 * day
            scans.append(
                scan("me", order, "created", T0, origin_country=origin, promised_ts=promised)
            )
            scans.append(scan("me", order, "delivered", T0 + days * day, origin_country=origin))
    events = [harness.event("logistics", v) for v in scans]
    assert await process_scans(harness.runtime, events) == len(scans)

    [state] = harness.redis.state_writes[-1]
    assert state.user_id == "me"
    assert state.profile["deliveries"] == 6
    assert state.profile["avg_delivery_days"] == pytest.approx(8.0)
    assert state.profile["late_delivery_share"] == pytest.approx(0.5)
    assert state.profile["open_shipments"] == 0
    assert state.event_ts == T0 + 14 * day  # the newest event is now a scan
    ranked = [item for item, _ in state.recs]
    assert ranked.index("from-de") < ranked.index("from-cn")  # 12 days faster wins
    assert harness.runtime.serving.lanes.expected_days("CN", "DE") == pytest.approx(14.0)

    # Redelivered scans change nothing; a user with scans but no clicks gets no recs.
    await process_scans(harness.runtime, [harness.event("logistics", scans[1])])
    assert harness.redis.state_writes[-1] == []
    me = UserProfile.from_bytes(harness.runtime.topology.user_profiles[b"me"])
    assert me.deliveries == 6
    await process_scans(
        harness.runtime, [harness.event("logistics", scan("ghost", "g1", "created", T0))]
    )
    assert harness.redis.state_writes[-1] == []
    ghost = UserProfile.from_bytes(harness.runtime.topology.user_profiles[b"ghost"])
    assert ghost.open_shipments == 1


async def test_a_journey_with_a_late_and_a_repeated_scan_ends_in_the_right_state(
    harness: Harness,
) -> None:
    hour = 3_600_000
    promised = T0 + 5 * 86_400_000
    journey = [
        scan("u7", "o7", status, T0 + k * 10 * hour, promised_ts=promised, location=place)
        for k, (status, place) in enumerate(
            [
                ("created", "Shenzhen, CN"),
                ("picked", "Shenzhen, CN"),
                ("departed", "Shenzhen, CN"),
                ("arrived_hub", "Frankfurt, DE"),
                ("out_for_delivery", "Berlin, DE"),
                ("delivered", "Berlin, DE"),
            ]
        )
    ]
    await process_clicks(harness.runtime, [harness.event("clicks", click("u7", T0, lang="de"))])
    # The pick-up scan arrives last (out of order), the departure scan twice.
    order = [journey[0], journey[2], journey[3], journey[2], journey[4], journey[5], journey[1]]
    for value in order[:4]:
        await process_scans(harness.runtime, [harness.event("logistics", value)])
    view = harness.redis.shipments["o7"]
    assert (view["status"], view["lang"], view["location"]) == (
        "arrived_hub",
        "de",
        "Frankfurt, DE",
    )
    assert view["status_text"] == status_text("arrived_hub", "de", "Frankfurt, DE")
    assert view["status_text"] != status_text("arrived_hub", "en", "Frankfurt, DE")
    # Nothing delivered has been learned yet: no prediction rather than a guess.
    assert view["predicted_delivery_ts"] == "" and view["promised_ts"] == promised
    await process_scans(harness.runtime, [harness.event("logistics", v) for v in order[4:]])
    view = harness.redis.shipments["o7"]
    assert view["status"] == "delivered"
    assert view["delivered_ts"] == journey[5]["ts"]
    assert view["last_scan_ts"] == journey[5]["ts"]  # the late pick-up did not move it back
    assert view["invalid_transitions"] == 0
    assert view["status_text"] == status_text("delivered", "de", "Berlin, DE")
    # Exactly one completion row: the order, delivered on time, 50 hours after creation.
    [row] = harness.writer.table("shipments")
    assert (row["order_id"], row["outcome"], row["on_time"], row["has_promise"]) == (
        "o7",
        "delivered",
        1,
        1,
    )
    assert row["transit_days"] == pytest.approx(50 / 24, abs=1e-3)
    events = [r["event_id"] for r in harness.writer.table("shipment_events")]
    # The repeated departure came at a new offset: a duplicate, neither a fact nor applied.
    assert len(events) == len(set(events)) == 6
    assert duplicates(harness.runtime) == Counter({"logistics": 1})
    assert harness.writer.table("shipment_predictions") == []  # nothing learned to predict with
    profile = UserProfile.from_bytes(harness.runtime.topology.user_profiles[b"u7"])
    assert (profile.deliveries, profile.open_shipments, profile.late_deliveries) == (1, 0, 0)
    assert harness.logistics_alerts == []
    # Operators see the repeat and the late scan in the checkpoint's counters.
    await harness.runtime.checkpoint_serving_models()
    meta = harness.redis.serving_meta
    assert (meta["logistics_duplicates"], meta["logistics_out_of_order"]) == (1, 1)
    assert (meta["logistics_invalid_transitions"], meta["logistics_deliveries"]) == (0, 1)


async def test_a_delayed_shipment_raises_exactly_one_alert(harness: Harness) -> None:
    hour = 3_600_000
    day = 24 * hour
    engine = harness.runtime.serving.logistics
    # Teach the engine that CN -> DE takes about 8 days (warm-up deliveries).
    history = []
    for k in range(40):
        start = T0 - 60 * day + k * hour
        history += [
            scan(f"h{k}", f"h{k}", "created", start),
            scan(f"h{k}", f"h{k}", "departed", start + day),
            scan(f"h{k}", f"h{k}", "arrived_hub", start + 6 * day),
            scan(f"h{k}", f"h{k}", "delivered", start + 8 * day),
        ]
    await process_scans(harness.runtime, [harness.event("logistics", v) for v in history])
    assert engine.counters["deliveries"] == 40
    # Promised in 3 days: the model expects about 8, so it is late from the first scan on.
    promised = T0 + 3 * day
    late = [
        scan("u8", "o8", "created", T0, promised_ts=promised),
        scan("u8", "o8", "departed", T0 + day, promised_ts=promised),
        scan("u8", "o8", "arrived_hub", T0 + 6 * day, promised_ts=promised),
    ]
    for value in late:
        await process_scans(harness.runtime, [harness.event("logistics", value)])
    await process_scans(harness.runtime, [harness.event("logistics", late[1])])  # redelivered
    assert len(harness.logistics_alerts) == 1
    key, alert = harness.logistics_alerts[0]
    assert key == b"u8"
    assert (alert["alert_id"], alert["kind"], alert["order_id"]) == (
        "o8:predicted_late",
        "predicted_late",
        "o8",
    )
    assert alert["promised_ts"] == promised and alert["predicted_delivery_ts"] > promised
    assert "promised" in alert["reason"]
    assert float(harness.redis.shipments["o8"]["delay_risk"]) > 0.5
    rows = [r for r in harness.writer.table("shipment_predictions") if r["order_id"] == "o8"]
    assert [r["status"] for r in rows] == ["created", "departed", "arrived_hub"]
    assert all(r["predicted_delivery_ts_ms"] > promised for r in rows)


async def test_a_customs_hold_without_further_scans_alerts_once_overdue(harness: Harness) -> None:
    hour = 3_600_000
    day = 24 * hour
    # 30 finished holds of about 10 hours teach what "usual" is for CN -> DE.
    history = []
    for k in range(30):
        start = T0 - 30 * day + k * hour
        history += [
            scan(f"c{k}", f"c{k}", "created", start),
            scan(f"c{k}", f"c{k}", "customs_hold", start + 2 * day),
            scan(f"c{k}", f"c{k}", "customs_cleared", start + 2 * day + 10 * hour),
        ]
    await process_scans(harness.runtime, [harness.event("logistics", v) for v in history])
    held = [scan("u9", "o9", "created", T0), scan("u9", "o9", "customs_hold", T0 + day)]
    await process_scans(harness.runtime, [harness.event("logistics", v) for v in held])
    assert harness.logistics_alerts == []
    # Other users' scans move event time on; o9 itself gets no scan.
    later = scan("x1", "x1", "created", T0 + day + 5 * day)
    await process_scans(harness.runtime, [harness.event("logistics", later)])
    kinds = [(a["order_id"], a["kind"]) for _, a in harness.logistics_alerts]
    assert kinds == [("o9", "customs_delay")]
    await process_scans(
        harness.runtime, [harness.event("logistics", scan("x2", "x2", "created", T0 + 9 * day))]
    )
    assert len(harness.logistics_alerts) == 1  # once per shipment and kind


async def test_serving_models_are_restored_from_their_checkpoint(harness: Harness) -> None:
    events = []
    for i in range(3):
        events.append(harness.event("clicks", click(f"o{i}", T0, item_id="phone")))
        events.append(harness.event("clicks", click(f"o{i}", T0 + 1, item_id="case")))
    buy = click("o0", T0 + 2, type="purchase", item_id="case", price=30.0, currency="EUR")
    events.append(harness.event("clicks", buy, partition=2))
    await process_clicks(harness.runtime, events)
    assert await harness.runtime.checkpoint_serving_models() > 0

    restarted = Runtime(
        harness.settings,
        harness.runtime.topology,
        redis=cast(RedisStore, harness.redis),
        clickhouse=cast(ClickHouseWriter, harness.writer),
    )
    models = await restarted.serving_models()
    assert models is not harness.runtime.serving
    assert models.recommender.recommend(["phone"], country="DE", n=1)[0][0] == "case"
    assert list(models.segmenters) == [2]  # the RFM segmenter of the purchase's partition
    assert models.segmenters[2].observed == 1
    # A worker that has not loaded its models yet never overwrites the checkpoint.
    fresh = Runtime(
        harness.settings,
        harness.runtime.topology,
        redis=cast(RedisStore, harness.redis),
        clickhouse=cast(ClickHouseWriter, harness.writer),
    )
    assert await fresh.checkpoint_serving_models() == 0


async def test_invalid_clicks_are_dead_lettered_with_reason_position_and_bytes(
    harness: Harness,
) -> None:
    good = click("u1", T0)
    not_json = harness.event("clicks", b"\xffnot json", partition=2, key=b"k")
    missing_item = harness.event("clicks", click("u1", T0, item_id=None), partition=1)
    batch = harness.event(
        "clicks",
        [click("u3", T0), {"event_id": "x", "ts": "yesterday"}, 7],
        partition=3,
        key=b"u3",
    )
    ok = harness.event("clicks", good)
    events = [ok, not_json, missing_item, batch]

    assert await process_clicks(harness.runtime, events) == 2
    records = harness.deadletters
    assert len(records) == 4
    assert harness.runtime.deadlettered == 4

    assert_deadletter(records[0], not_json, None)
    assert base64.b64decode(records[0]["payload_b64"]) == b"\xffnot json"
    assert records[0]["payload"] == "\ufffdnot json"
    assert records[0]["index"] is None

    assert_deadletter(records[1], missing_item, None)
    assert "item_id is required" in records[1]["error"]
    assert base64.b64decode(records[1]["payload_b64"]) == missing_item.value

    assert_deadletter(records[2], batch, "ts")
    assert records[2]["index"] == 1
    assert orjson.loads(base64.b64decode(records[2]["payload_b64"])) == {
        "event_id": "x",
        "ts": "yesterday",
    }
    assert_deadletter(records[3], batch, None)
    assert records[3]["index"] == 2
    assert records[3]["error"] == "array element is not a JSON object"

    assert {s.user_id for s in harness.redis.state_writes[0]} == {"u1", "u3"}


async def test_batch_offsets_are_committed_only_when_clickhouse_has_the_rows(
    harness: Harness,
) -> None:
    events = [harness.event("clicks", click("u1", T0 + i)) for i in range(3)]
    events.append(harness.event("clicks", b"{broken"))
    await process_clicks(harness.runtime, events)
    # Held for ClickHouse, bad one included (Redis stored the batch's writes at once).
    assert [e.message.refcount for e in events] == [1, 1, 1, 1]

    await harness.settle()
    consumer = harness.runtime.topology.app.consumer
    assert all(e.message.acks[-1] is consumer for e in events)
    assert [e.message.refcount for e in events] == [0, 0, 0, 0]


async def test_a_redis_outage_queues_the_writes_and_holds_the_offsets(
    harness: Harness,
) -> None:
    runtime, redis = harness.runtime, harness.redis
    writes = runtime.redis_writes
    writes._retry_initial_s = 0.01  # the test's outage is short
    redis.down = True
    first = [harness.event("clicks", click("u1", T0 + i)) for i in range(2)]
    second = [harness.event("clicks", click(u, T0 + 10)) for u in ("u1", "u2")]
    scans = [harness.event("logistics", scan("u2", "o1", "created", T0 + 20))]
    alerting = harness.event("payments", payment("u3", T0))
    await process_clicks(runtime, first)
    await process_clicks(runtime, second)
    await process_scans(runtime, scans)
    await process_payments(runtime, [alerting])
    await harness.settle()  # ClickHouse has the rows: only Redis holds the offsets now

    # Nothing lost, nothing stored, the agents went on; one queued state per user.
    events = [*first, *second, *scans, alerting]
    assert redis.user_states == {} and redis.processed == Counter()
    assert writes.retrying and set(writes._pending.user_states) == {"u1", "u2"}
    assert (
        writes._pending.user_states["u1"].event_id
        == orjson.loads(cast(bytes, second[0].value))["event_id"]
    )
    # Held for Redis (and the payment also for its fraud engine checkpoint).
    assert [e.message.refcount for e in events] == [1] * (len(events) - 1) + [2]

    redis.down = False
    for _ in range(200):
        if not writes.retrying:
            break
        await asyncio.sleep(0.01)
    assert not writes.retrying and writes.pending == 0
    assert set(redis.user_states) == {"u1", "u2"}
    assert (
        redis.user_states["u1"].event_id == orjson.loads(cast(bytes, second[0].value))["event_id"]
    )
    assert set(redis.shipments) == {"o1"}
    assert redis.processed == Counter({"clicks": 4, "logistics": 1, "payments": 1})
    # All offsets released once stored (the payment's waits for its engine checkpoint).
    assert [e.message.refcount for e in events[:-1]] == [0] * (len(events) - 1)
    await runtime.checkpoint_fraud_engines()
    assert alerting.message.refcount == 0


async def test_latency_samples_are_recorded_when_asked(harness: Harness) -> None:
    runtime = harness.runtime
    runtime.settings = runtime.settings.model_copy(update={"record_latency": True})
    events = [harness.event("clicks", click("u1", T0 + i)) for i in range(3)]
    events.append(harness.event("clicks", b"{}"))
    await process_clicks(runtime, events)
    [(stage, samples)] = harness.redis.latencies
    assert stage == "recs"
    assert len(samples) == 3  # valid clicks only
    assert all(s > 0 for s in samples)


# -- payments -------------------------------------------------------------------------------------


async def test_payments_become_fraud_score_rows_and_card_testing_alerts(harness: Harness) -> None:
    normal = [payment(f"n{i}", T0 + i * MINUTE) for i in range(3)]
    burst = [payment("thief", T0 + i * 1000, amount=1.0, currency="USD") for i in range(4)]
    burst.append(payment("thief", T0 + 5000, amount=900.0, currency="USD", ip_country="NG"))
    events = [harness.event("payments", v, partition=0) for v in normal]
    events += [harness.event("payments", v, partition=1) for v in burst]
    events.append(harness.event("payments", payment("n9", T0, amount=-3.0), partition=0))

    assert await process_payments(harness.runtime, events) == len(normal) + len(burst)

    rows = harness.writer.rows["fraud_scores"]
    assert all(len(row) == len(TABLE_COLUMNS["fraud_scores"]) for row in rows)
    scores = {row["txn_id"]: row for row in harness.writer.table("fraud_scores")}
    assert set(scores) == {v["event_id"] for v in [*normal, *burst]}
    big = scores[burst[-1]["event_id"]]
    assert big["is_alert"] == 1
    assert big["score"] >= harness.settings.fraud_alert_threshold
    assert big["threshold"] == harness.settings.fraud_alert_threshold
    assert big["ts"] == burst[-1]["ts"] // 1000 and big["ts_ms"] == burst[-1]["ts"]
    assert big["ip_country"] == "NG"
    assert any("card testing" in reason for reason in big["reasons"])
    first = scores[normal[0]["event_id"]]
    assert (first["is_alert"], first["currency"], first["amount"]) == (0, "EUR", 25.0)
    assert first["amount_usd"] == pytest.approx(27.0)

    assert len(harness.alerts) == 1
    key, alert = harness.alerts[0]
    assert key == b"thief"
    FraudAlert.model_validate(alert)
    assert alert["txn_id"] == burst[-1]["event_id"]
    assert alert["alert_id"] == f"alert-{burst[-1]['event_id']}"
    assert alert["reasons"][0].startswith("card testing")

    # One engine per payments partition; the invalid payment is dead-lettered.
    assert set(harness.runtime.fraud_engines) == {0, 1}
    [record] = harness.deadletters
    assert record["error"].startswith("amount:")
    scores = harness.writer.table("fraud_scores")
    assert len(scores) == 8 and len({r["txn_id"] for r in scores}) == 8
    assert all(r["src_next_offset"] > 0 for r in scores)


async def test_replayed_payment_batch_scores_the_same(harness: Harness) -> None:
    values = [payment("u1", T0 + i, amount=1.0, currency="USD") for i in range(7)]
    events = [harness.event("payments", v) for v in values]
    await process_payments(harness.runtime, events)
    first = harness.writer.table("fraud_scores")
    alerts = len(harness.alerts)
    assert alerts == sum(r["is_alert"] for r in first) > 0
    # Read again at the same offsets (after a crash): the same rows and alerts again, in case
    # they never got out (the written positions drop rows ClickHouse has).
    await process_payments(harness.runtime, [harness.replay(e) for e in events])
    again = harness.writer.table("fraud_scores")[len(first) :]
    assert again == [r | {"scored_at": a["scored_at"]} for r, a in zip(first, again, strict=True)]
    assert len(harness.alerts) == 2 * alerts
    assert len(harness.redis.alerts) == 2 * alerts
    assert duplicates(harness.runtime) == Counter()


async def test_duplicate_payments_write_and_send_nothing(harness: Harness) -> None:
    values = [payment("u1", T0 + i, amount=1.0, currency="USD") for i in range(7)]
    await process_payments(harness.runtime, [harness.event("payments", v) for v in values])
    rows = len(harness.writer.table("fraud_scores"))
    alerts, published = len(harness.alerts), len(harness.redis.alerts)
    engine = harness.runtime.fraud_engines[0]
    stats = engine.stats()
    # The same payments sent again (a producer retry): new offsets, and twice in one message.
    retried = [harness.event("payments", v) for v in values]
    retried.append(harness.event("payments", [values[0], values[0]]))
    assert await process_payments(harness.runtime, retried) == 9
    assert len(harness.writer.table("fraud_scores")) == rows
    assert (len(harness.alerts), len(harness.redis.alerts)) == (alerts, published)
    assert engine.stats() == stats
    assert duplicates(harness.runtime) == Counter({"payments": 9})
    assert harness.redis.processed["payments"] == 7 + 9  # processed, just not written
    # A new payment in the same message as a duplicate is scored and written.
    fresh = payment("u1", T0 + 100)
    await process_payments(harness.runtime, [harness.event("payments", [values[1], fresh])])
    assert [r["txn_id"] for r in harness.writer.table("fraud_scores")[rows:]] == [fresh["event_id"]]
    assert duplicates(harness.runtime)["payments"] == 10


# -- labels ---------------------------------------------------------------------------------------


async def test_labels_are_stored_and_queued_in_their_partitions_engine(harness: Harness) -> None:
    paid = payment("u1", T0)
    await process_payments(harness.runtime, [harness.event("payments", paid, partition=2)])
    label = {
        "event_id": "l1",
        "ts": T0 + MINUTE,
        "user_id": "u1",
        "txn_id": paid["event_id"],
        "label": "fraud",
        "source": "chargeback",
    }
    events = [
        harness.event("fraud-labels", label, partition=2),
        harness.event("fraud-labels", {"event_id": "l2", "label": "maybe"}, partition=2),
        harness.event("fraud-labels", label | {"event_id": "l3", "txn_id": "x"}, partition=3),
    ]
    assert await process_labels(harness.runtime, events) == 2

    rows = harness.writer.table("fraud_label_events")
    assert [(r["event_id"], r["txn_id"], r["label"], r["ts_ms"], r["source"]) for r in rows] == [
        ("l1", paid["event_id"], "fraud", T0 + MINUTE, "chargeback"),
        ("l3", "x", "fraud", T0 + MINUTE, "chargeback"),
    ]
    assert rows[0]["ts"] == (T0 + MINUTE) // 1000
    engine = harness.runtime.fraud_engines[2]
    assert engine.pending_labels == 1
    assert engine.label_watermark_ms == T0 + MINUTE
    assert harness.runtime.fraud_engines[3].pending_labels == 1
    # Offsets of every label message count, also of the invalid one.
    assert harness.runtime.label_offsets == {2: 1, 3: 0}
    assert len(harness.deadletters) == 1
    assert harness.redis.processed["fraud-labels"] == 2

    # A later payment in the same partition makes the engine learn the label.
    later = payment("u1", T0 + MINUTE + HOUR_MS)
    await process_payments(harness.runtime, [harness.event("payments", later, partition=2)])
    assert (engine.labels_applied, engine.pending_labels) == (1, 0)
    assert harness.writer.table("fraud_scores")[-1]["model_version"].endswith("@1")

    await harness.settle()
    # Still held: the queued labels live in the engine until it is checkpointed.
    assert all(e.message.refcount == 1 for e in events)
    assert await harness.runtime.checkpoint_fraud_engines() == 2
    assert set(harness.redis.checkpoints) == {(harness.runtime.settings.app_id, p) for p in (2, 3)}
    assert all(e.message.refcount == 0 and len(e.message.acks) == 3 for e in events)
    # Each checkpoint also files the engine's state in model_metrics (online run).
    metrics = {(row["model"], row["metric"]): row for row in harness.writer.table("model_metrics")}
    applied = metrics[("fraud-p2", "labels_applied")]
    assert applied["value"] == 1.0 and applied["run_id"] == f"online:{harness.settings.app_id}"
    assert str(applied["day"]) == "2026-01-01"
    # Partition 3 scored no payment yet: no event-time day to file its values under.
    assert not any(model == "fraud-p3" for model, _ in metrics)


# -- logistics ------------------------------------------------------------------------------------


async def test_scans_become_shipment_rows(harness: Harness) -> None:
    scan = {
        "event_id": "s1",
        "ts": T0,
        "user_id": "u1",
        "order_id": "o1",
        "carrier": "dhl",
        "origin_country": "CN",
        "dest_country": "DE",
        "status": "customs_hold",
        "promised_ts": T0 + 86_400_000,
        "location": "FRA",
    }
    plain = scan | {"event_id": "s2", "status": "delivered"}
    del plain["promised_ts"], plain["location"]
    events = [
        harness.event("logistics", scan),
        harness.event("logistics", plain),
        harness.event("logistics", scan | {"event_id": "s3", "status": "lost"}),
    ]
    assert await process_scans(harness.runtime, events) == 2
    rows = harness.writer.table("shipment_events")
    assert all(len(r) == len(TABLE_COLUMNS["shipment_events"]) for r in rows)
    assert [(r["event_id"], r["status"], r["promised_ts_ms"], r["location"]) for r in rows] == [
        ("s1", "customs_hold", T0 + 86_400_000, "FRA"),
        ("s2", "delivered", 0, ""),
    ]
    assert rows[0]["ts"] == T0 // 1000 and rows[0]["ts_ms"] == T0
    assert [(r["src_partition"], r["src_next_offset"]) for r in rows] == [(0, 1), (0, 2)]
    [record] = harness.deadletters
    assert record["error"].startswith("status:")
    assert harness.redis.processed["logistics"] == 2


# -- repeated events: replays (same position) and duplicates (new position) ----------------------


def rows_without(rows: list[dict[str, Any]], *columns: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


async def test_a_duplicate_click_writes_nothing_and_serves_nobody(harness: Harness) -> None:
    others = []
    for i in range(4):  # others: phone -> case, so "me" gets recs
        others.append(harness.event("clicks", click(f"o{i}", T0, item_id="phone")))
        others.append(harness.event("clicks", click(f"o{i}", T0 + 1, item_id="case")))
    await process_clicks(harness.runtime, others)
    first = click("me", T0 + MINUTE, item_id="phone")
    await process_clicks(harness.runtime, [harness.event("clicks", first)])
    hit = click("me", T0 + 2 * MINUTE, item_id="case")  # scored: a rec_predictions row
    await process_clicks(harness.runtime, [harness.event("clicks", hit)])
    stored = harness.runtime.topology.user_profiles[b"me"]
    rows = {table: list(table_rows) for table, table_rows in harness.writer.rows.items()}
    writes, table_writes = len(harness.redis.state_writes), Counter(harness.table_writes)
    harness.redis.popular_lists.clear()

    # Sent again (a tracker retry): new offsets, once alone and twice in one message.
    await process_clicks(harness.runtime, [harness.event("clicks", hit)])
    await process_clicks(harness.runtime, [harness.event("clicks", [first, first])])
    assert harness.writer.rows == rows  # no fact row: the rollups count each click once
    assert harness.redis.state_writes[writes:] == [[], []]  # no recs served again
    assert harness.table_writes == table_writes
    assert harness.runtime.topology.user_profiles[b"me"] == stored  # served_recs unchanged
    assert harness.redis.popular_lists == {}
    assert duplicates(harness.runtime) == Counter({"clicks": 3})
    assert harness.redis.processed["clicks"] == 8 + 2 + 3  # processed, just not written

    # A batch with a new click and a duplicate of the same user serves the user once.
    later = click("me", T0 + 3 * MINUTE, item_id="phone")
    await process_clicks(
        harness.runtime, [harness.event("clicks", hit), harness.event("clicks", later)]
    )
    [state] = harness.redis.state_writes[-1]
    assert (state.user_id, state.event_id, state.profile["events"]) == ("me", later["event_id"], 3)
    assert [r["event_id"] for r in harness.writer.table("click_events")][-1] == later["event_id"]
    assert len(harness.writer.table("click_events")) == len(rows["click_events"]) + 1
    assert duplicates(harness.runtime) == Counter({"clicks": 4})


async def test_a_replayed_click_rebuilds_its_rows_and_serves_its_user(harness: Harness) -> None:
    others = []
    for i in range(4):
        others.append(harness.event("clicks", click(f"o{i}", T0, item_id="phone")))
        others.append(harness.event("clicks", click(f"o{i}", T0 + 1, item_id="case")))
    await process_clicks(harness.runtime, others)
    await process_clicks(harness.runtime, [harness.event("clicks", click("me", T0 + MINUTE))])
    hit = harness.event("clicks", click("me", T0 + 2 * MINUTE, item_id="case"))
    purchase = click("me", T0 + 3 * MINUTE, type="purchase", item_id="x", price=9.0, currency="EUR")
    batch = [hit, harness.event("clicks", purchase)]
    await process_clicks(harness.runtime, batch)
    written = {t: harness.writer.table(t) for t in ("click_events", "rec_predictions")}
    [served] = harness.redis.state_writes[-1]
    assert [r["hit_rank"] for r in written["rec_predictions"]] == [1, 0]

    # A crash before the rows were stored and before Redis had the state: the profile (from
    # the changelog) has applied both clicks; they are read again at the same offsets.
    harness.writer.rows.clear()
    await process_clicks(harness.runtime, [harness.replay(e) for e in batch])
    for table, before in written.items():
        again = harness.writer.table(table)
        assert rows_without(again, "ingested_at") == rows_without(
            before[-len(again) :], "ingested_at"
        )
    assert len(harness.writer.table("click_events")) == 2
    [state] = harness.redis.state_writes[-1]  # Redis gets the user's state again
    assert (state.user_id, state.event_id, state.profile) == ("me", served.event_id, served.profile)
    assert duplicates(harness.runtime) == Counter()
    # A profile stored before positions were kept: its clicks' positions are unknown, and a
    # repeat is rebuilt as a replay (what every repeat got before).
    profile = UserProfile.from_bytes(harness.runtime.topology.user_profiles[b"me"])
    old = orjson.loads(profile.to_bytes())
    del old["recent_event_positions"]
    harness.runtime.topology.user_profiles[b"me"] = orjson.dumps(old)
    harness.writer.rows.clear()
    await process_clicks(harness.runtime, [harness.event("clicks", purchase)])
    assert [r["event_id"] for r in harness.writer.table("click_events")] == [purchase["event_id"]]
    assert duplicates(harness.runtime) == Counter()


async def test_label_duplicates_replays_and_relabels(harness: Harness) -> None:
    paid = payment("u1", T0)
    await process_payments(harness.runtime, [harness.event("payments", paid, partition=2)])
    label = {
        "event_id": "l1",
        "ts": T0 + MINUTE,
        "user_id": "u1",
        "txn_id": paid["event_id"],
        "label": "fraud",
    }
    original = harness.event("fraud-labels", label, partition=2)
    await process_labels(harness.runtime, [original])
    [row] = harness.writer.table("fraud_label_events")
    engine = harness.runtime.fraud_engines[2]
    assert engine.pending_labels == 1

    # The same label event at a new offset, alone and twice in one message: nothing.
    assert (
        await process_labels(
            harness.runtime,
            [
                harness.event("fraud-labels", label, partition=2),
                harness.event("fraud-labels", [label, label], partition=2),
            ],
        )
        == 3
    )
    assert harness.writer.table("fraud_label_events") == [row]
    assert engine.pending_labels == 1
    assert duplicates(harness.runtime) == Counter({"fraud-labels": 3})
    assert harness.runtime.label_offsets[2] == 2  # still read: the label stream is caught up

    # Read again at its offset (after a crash): its row is rebuilt, it is not queued twice.
    await process_labels(harness.runtime, [harness.replay(original)])
    rows = harness.writer.table("fraud_label_events")
    assert rows_without(rows, "ingested_at") == rows_without([row, row], "ingested_at")
    assert engine.pending_labels == 1

    # A relabel of the transaction is a new event: written, queued, learned once.
    relabel = label | {"event_id": "l2", "ts": T0 + 2 * MINUTE, "label": "legit"}
    await process_labels(harness.runtime, [harness.event("fraud-labels", relabel, partition=2)])
    assert [r["event_id"] for r in harness.writer.table("fraud_label_events")] == ["l1"] * 2 + [
        "l2"
    ]
    assert engine.pending_labels == 2
    later = payment("u1", T0 + 3 * MINUTE + HOUR_MS)
    await process_payments(harness.runtime, [harness.event("payments", later, partition=2)])
    assert (engine.labels_applied, engine.labels_duplicate) == (1, 1)
    assert duplicates(harness.runtime) == Counter({"fraud-labels": 3})


async def test_scan_duplicates_and_replays(harness: Harness) -> None:
    views: list[str] = []
    write_shipments = harness.redis.write_shipments

    async def recording(shipments: Iterable[Mapping[str, Any]], *, ttl_s: int = 0) -> list[int]:
        shipments = list(shipments)
        views.extend(str(s["order_id"]) for s in shipments)
        return await write_shipments(shipments, ttl_s=ttl_s)

    cast(Any, harness.redis).write_shipments = recording
    created = harness.event("logistics", scan("u1", "o1", "created", T0))
    delivered = harness.event("logistics", scan("u1", "o1", "delivered", T0 + 86_400_000))
    await process_scans(harness.runtime, [created, delivered])
    tables = ("shipment_events", "shipments")
    written = {t: harness.writer.table(t) for t in tables}
    assert [len(rows) for rows in written.values()] == [2, 1] and views == ["o1"]
    profile = harness.runtime.topology.user_profiles[b"u1"]

    # Both scans sent again at new offsets: no row, no view, no profile change.
    views.clear()
    again = [harness.event("logistics", cast(bytes, e.value)) for e in (created, delivered)]
    assert await process_scans(harness.runtime, again) == 2
    assert {t: harness.writer.table(t) for t in tables} == written
    assert views == [] and harness.runtime.topology.user_profiles[b"u1"] == profile
    assert duplicates(harness.runtime) == Counter({"logistics": 2})

    # Read again at their offsets (after a crash): the rows and the view are rebuilt.
    harness.writer.rows.clear()
    await process_scans(harness.runtime, [harness.replay(e) for e in (created, delivered)])
    for table, before in written.items():
        rebuilt = harness.writer.table(table)
        assert rows_without(rebuilt, "ingested_at") == rows_without(before, "ingested_at")
    assert views == ["o1"]
    assert harness.runtime.topology.user_profiles[b"u1"] == profile  # applied once
    assert duplicates(harness.runtime) == Counter({"logistics": 2})


@pytest.mark.parametrize("left_behind", ["user_profiles", "user_shipments"])
async def test_a_replay_heals_a_crash_between_the_two_tables_changelog_records(
    harness: Harness, left_behind: str
) -> None:
    """A SIGKILL can leave one table's changelog record out and the other's in: a delivery
    then stands in the book but not in the profile, or the other way round. Read again, the
    scan leaves the profile with the delivery counted exactly once."""
    tables = harness.runtime.topology
    created = harness.event("logistics", scan("u1", "o1", "created", T0))
    await process_scans(harness.runtime, [created])
    before = {name: dict(getattr(tables, name)) for name in ("user_profiles", "user_shipments")}
    delivered = harness.event("logistics", scan("u1", "o1", "delivered", T0 + 2 * 86_400_000))
    await process_scans(harness.runtime, [delivered])
    after = UserProfile.from_bytes(tables.user_profiles[b"u1"])
    assert (after.deliveries, after.open_shipments) == (1, 0)
    # The crash: one table restored as it was before the delivery.
    getattr(tables, left_behind)[b"u1"] = before[left_behind][b"u1"]
    stale = UserProfile.from_bytes(tables.user_profiles[b"u1"])
    await process_scans(harness.runtime, [harness.replay(delivered)])
    healed = UserProfile.from_bytes(tables.user_profiles[b"u1"])
    assert (healed.deliveries, healed.open_shipments) == (1, 0), left_behind
    assert healed.delivery_days_total == after.delivery_days_total
    assert healed.last_scan_id == after.last_scan_id
    if left_behind == "user_profiles":
        assert stale.deliveries == 0  # what the replay had to heal
    assert duplicates(harness.runtime) == Counter()


async def test_a_book_stored_before_books_kept_the_experience_starts_from_the_profile(
    harness: Harness,
) -> None:
    tables = harness.runtime.topology
    await process_scans(
        harness.runtime, [harness.event("logistics", scan("u1", "o1", "created", T0))]
    )
    old_book = orjson.loads(tables.user_shipments[b"u1"])
    del old_book["experience"]
    tables.user_shipments[b"u1"] = orjson.dumps(old_book)
    profile = UserProfile.from_bytes(tables.user_profiles[b"u1"])
    profile.deliveries, profile.delivery_days_total = 3, 9.0  # counted by the profile so far
    tables.user_profiles[b"u1"] = profile.to_bytes()
    delivered = scan("u1", "o1", "delivered", T0 + 2 * 86_400_000)
    await process_scans(harness.runtime, [harness.event("logistics", delivered)])
    profile = UserProfile.from_bytes(tables.user_profiles[b"u1"])
    assert (profile.deliveries, profile.delivery_days_total) == (4, pytest.approx(11.0))
    assert orjson.loads(tables.user_shipments[b"u1"])["experience"]["deliveries"] == 4


# -- with the real writer thread ------------------------------------------------------------------


class _RecordingClient:
    def __init__(self) -> None:
        self.inserted: list[str] = []
        self.lock = threading.Lock()

    def execute(self, query: str, data: Any = None, columnar: bool = False) -> None:
        with self.lock:
            self.inserted.append(query.split()[2])

    def disconnect(self) -> None:
        pass


async def test_real_writer_releases_offsets_after_the_insert(harness: Harness) -> None:
    client = _RecordingClient()
    writer = ClickHouseWriter(
        harness.settings.model_copy(update={"clickhouse_flush_interval_s": 60.0}),
        client_factory=lambda: client,
    )
    runtime = Runtime(
        harness.settings,
        harness.runtime.topology,
        redis=cast(RedisStore, harness.redis),
        clickhouse=writer,
    )
    runtime.positions._read = lambda tables, partitions: {}  # type: ignore[method-assign]
    try:
        events = [
            harness.event(
                "logistics",
                {
                    "event_id": "s",
                    "ts": T0,
                    "user_id": "u",
                    "order_id": "o",
                    "carrier": "c",
                    "origin_country": "CN",
                    "dest_country": "DE",
                    "status": "picked",
                },
            )
        ]
        await process_scans(runtime, events)
        # Redis stored its writes at once; the ClickHouse hold remains.
        assert events[0].message.refcount == 1 and len(events[0].message.acks) == 1
        assert client.inserted == []
        assert await asyncio.to_thread(writer.flush, 10.0)
        for _ in range(100):
            if events[0].message.refcount == 0:
                break
            await asyncio.sleep(0.01)
        assert sorted(client.inserted) == ["shipment_events"]
        assert events[0].message.refcount == 0
        assert events[0].message.acks[-1] is runtime.topology.app.consumer
    finally:
        await runtime.close()


async def test_dead_letter_of_a_large_invalid_value_still_fits_one_kafka_request(
    harness: Harness,
) -> None:
    raw = b'{"event_id":"' + b"x" * 750_000 + b'"}'
    event = harness.event("clicks", raw)
    await process_clicks(harness.runtime, [event])
    [record] = harness.deadletters
    del record["key"]
    assert len(orjson.dumps(record)) <= 1_000_000


async def test_concurrent_first_use_of_a_partition_shares_one_engine(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The payments and labels agents may both ask for a partition's engine first; labels
    # queued in one engine while the other replaced it would be lost.
    async def slow_load(app_id: str, partition: int) -> bytes | None:
        await asyncio.sleep(0.01)
        return None

    monkeypatch.setattr(harness.redis, "load_checkpoint", slow_load)
    first, second = await asyncio.gather(
        harness.runtime.fraud_engine(5), harness.runtime.fraud_engine(5)
    )
    assert first is second is harness.runtime.fraud_engines[5]


async def test_fraud_checkpoint_rounds_are_paced_by_their_cost(harness: Harness) -> None:
    runtime = harness.runtime
    events = [harness.event("payments", payment("u1", T0), partition=1)]
    await process_payments(runtime, events)
    await harness.settle()
    held = events[0].message.refcount
    pacer = runtime.checkpoint_pacers["fraud"]
    pacer.spent(3600.0, now=time.monotonic())  # as if the last round had pickled for an hour
    assert await runtime.checkpoint_fraud_engines() == 0  # the timer's round waits
    assert pacer.skipped == 1 and events[0].message.refcount == held  # offsets still held
    # A round asked for by partition (a rebalance) is never skipped.
    assert await runtime.checkpoint_fraud_engines([1]) == 1
    assert events[0].message.refcount == held - 1
    assert pacer.last_spent_s < 3600.0
