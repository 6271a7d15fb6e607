"""The whole pipeline on the real local stack: one worker process, events in, contract out.

One worker serves the module (its start-up, a consumer-group join, costs seconds); each test
uses its own user ids, so tests do not see each other's results.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from infra.cli import cli
from infra.migrate import clickhouse_client, migrate
from infra.processes import WorkerProcess, isolated, start_worker, wait_processed
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import EventProducer, TopicReader, ensure_topics
from sinks.pseudonym import Pseudonymiser
from sinks.redis_store import RedisStore
from sinks.storefront_client import StorefrontClient

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TOPICS = list(ALL_TOPICS)


@pytest.fixture(scope="module")
def pipeline(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = isolated(
        stack,
        "pipe",
        clickhouse_database=f"bf_pipe_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.2,
    )
    migrate(settings)
    ensure_topics(settings, TOPICS)
    worker: WorkerProcess = start_worker(settings, tmp_path_factory.mktemp("worker"), "worker")
    try:
        # A first event proves the worker joined its group and processes.
        send(settings, "clicks", click(f"warm-{uuid.uuid4().hex[:6]}", "warm", 0))
        wait_processed(settings, 1, worker, timeout_s=90)
        yield settings
    finally:
        worker.stop()
        client = clickhouse_client(settings)
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")


def send(settings: Settings, topic: str, *values: dict[str, Any] | bytes) -> None:
    with EventProducer(settings) as producer:
        for value in values:
            raw = value if isinstance(value, bytes) else orjson.dumps(value)
            key = "bad-key" if isinstance(value, bytes) else str(value["user_id"])
            producer.send(settings.topic(topic), key, raw)
        producer.flush(10)


def click(user: str, event_id: str, minute: int, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "ts": T0 + minute * 60_000,
        "user_id": user,
        "session_id": f"s-{user}",
        "type": "view",
        "item_id": "i1",
        "category": "shoes",
        "country": "DE",
        "currency": "EUR",
        "device": "ios",
        "lang": "de",
        **fields,
    }


def payment(user: str, txn: str, minute: float, amount: float, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": txn,
        "ts": int(T0 + minute * 60_000),
        "user_id": user,
        "card_id": f"card-{user}",
        "merchant_id": "m1",
        "amount": amount,
        "currency": "USD",
        "billing_country": "US",
        "shipping_country": "US",
        "ip_country": "US",
        "device_id": f"dev-{user}",
        **fields,
    }


def wait_until(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def redis_read(settings: Settings, method: str, *args: Any) -> Any:
    async def read() -> Any:
        store = RedisStore(settings)
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.aclose()

    return asyncio.run(read())


def pseudonym(settings: Settings, user_id: str) -> str:
    """How ``user_id`` appears in ClickHouse."""
    return Pseudonymiser.from_settings(settings).pseudonym(user_id, "user")


def query(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        return client.execute(sql)
    finally:
        client.disconnect()


def read_topic(settings: Settings, topic: str) -> list[Any]:
    with TopicReader(settings, settings.topic(topic)) as reader:
        return reader.read_until_idle(idle_s=1.0)


def test_clicks_update_profile_recs_and_meta(pipeline: Settings) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    other = f"u-{uuid.uuid4().hex[:8]}"
    # Another user's session teaches the recommender that i2 follows i1.
    send(
        pipeline,
        "clicks",
        click(other, f"{other}-1", 0, item_id="i1"),
        click(other, f"{other}-2", 1, item_id="i2"),
        click(user, f"{user}-1", 2, item_id="i1", type="view"),
        click(user, f"{user}-2", 3, item_id="i9", type="purchase", price=80.0),
    )
    meta = wait_until(
        lambda: (
            redis_read(pipeline, "read_meta", user).get("last_event_id") == f"{user}-2"
            and redis_read(pipeline, "read_meta", user)
        ),
        what="recs meta",
    )
    assert int(meta["last_event_ts"]) == T0 + 3 * 60_000
    profile = redis_read(pipeline, "read_profile", user)
    assert profile["country"] == "DE"
    assert profile["frequency_purchases"] == "1"
    assert float(profile["monetary_usd"]) == pytest.approx(80 * 1.08)
    assert "shoes" in profile["top_categories"]
    assert profile["segment"] in {"high-value", "dynamic", "growth"}
    recs = [item for item, _ in redis_read(pipeline, "read_recs", user, 20)]
    assert "i2" in recs  # i1's neighbour
    assert "i9" not in recs  # just bought


def test_recs_change_after_the_users_click(pipeline: Settings) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    teacher = f"u-{uuid.uuid4().hex[:8]}"
    send(
        pipeline,
        "clicks",
        click(teacher, f"{teacher}-1", 0, item_id="x-camera"),
        click(teacher, f"{teacher}-2", 1, item_id="x-tripod"),
        click(user, f"{user}-1", 2, item_id="x-book", category="books"),
    )
    wait_until(
        lambda: redis_read(pipeline, "read_meta", user).get("last_event_id") == f"{user}-1",
        what="first recs",
    )
    before = redis_read(pipeline, "read_recs", user, 20)
    send(pipeline, "clicks", click(user, f"{user}-2", 3, item_id="x-camera"))
    wait_until(
        lambda: redis_read(pipeline, "read_meta", user).get("last_event_id") == f"{user}-2",
        what="updated recs",
    )
    after = redis_read(pipeline, "read_recs", user, 20)
    assert after != before
    assert after[0][0] == "x-tripod"
    meta = redis_read(pipeline, "read_meta", user)
    assert (meta["last_event_ts"], meta["basis"]) == (str(T0 + 3 * 60_000), "session")


def test_storefront_client_reads_recs_profile_bought_together_and_fallbacks(
    pipeline: Settings,
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    user_pid = pseudonym(pipeline, user)  # how ClickHouse holds it
    teacher = f"u-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    phone, case, charger = f"{tag}-phone", f"{tag}-case", f"{tag}-charger"
    send(
        pipeline,
        "clicks",
        click(teacher, f"{teacher}-1", 0, item_id=phone, origin_country="CN"),
        click(teacher, f"{teacher}-2", 1, item_id=case, origin_country="DE"),
        click(user, f"{user}-1", 2, item_id=phone, origin_country="CN"),
    )
    wait_until(
        lambda: redis_read(pipeline, "read_meta", user).get("last_event_id") == f"{user}-1",
        what="first recs",
    )
    with StorefrontClient.from_settings(pipeline) as shop:
        recs = shop.recommendations(user, 5)
        assert recs.item_ids[0] == case  # what followed the phone in the teacher's session
        assert (recs.basis, recs.personalised) == ("session", True)
        assert (recs.event_id, recs.event_ts) == (f"{user}-1", T0 + 2 * 60_000)

        # The user clicks the case (a hit at rank 1), buys phone and charger in the session,
        # and a shipment is delivered 3 days after it was created.
        price = {"price": 40.0, "currency": "EUR"}
        send(
            pipeline,
            "clicks",
            click(user, f"{user}-2", 3, item_id=case),
            click(user, f"{user}-3", 4, item_id=phone, type="purchase", **price),
            click(user, f"{user}-4", 5, item_id=charger, type="purchase", **price),
        )
        scans = [
            {
                "event_id": f"{user}-scan-{status}",
                "ts": T0 + day * 86_400_000,
                "user_id": user,
                "order_id": f"{user}-o1",
                "carrier": "dhl",
                "origin_country": "CN",
                "dest_country": "DE",
                "status": status,
                "promised_ts": T0 + 2 * 86_400_000,
            }
            for day, status in ((0, "created"), (3, "delivered"))
        ]
        send(pipeline, "logistics", *scans)
        profile = wait_until(
            lambda: (p := shop.profile(user)) and p["deliveries"] == 1 and p, what="deliveries"
        )
        assert profile["avg_delivery_days"] == pytest.approx(3.0)
        assert profile["late_delivery_share"] == pytest.approx(1.0)
        assert profile["frequency_purchases"] == 2 and profile["price_band"] == "mid"
        assert profile["top_categories"][0][0] == "shoes"
        assert profile["last_event_ts"] == T0 + 3 * 86_400_000  # the delivery is the newest
        assert shop.recommendations(user).event_id == f"{user}-scan-delivered"
        assert phone not in shop.recommendations(user).item_ids  # just bought
        assert [item for item, _ in shop.bought_together(phone)] == [charger]
        assert shop.bought_together(charger)[0] == (phone, 1.0)

        # Someone the storefront has never seen gets the country's trending items.
        stranger = shop.recommendations(f"u-{uuid.uuid4().hex[:8]}", 5, country="DE")
        assert stranger.basis == "popular-country" and not stranger.personalised
        assert stranger.item_ids and stranger.event_id is None
        assert shop.recommendations("nobody", 5, country="ZZ").basis == "popular-global"
        assert shop.profile("nobody") is None

    # Online quality: the case click was the first of the recs served before it.
    rows = wait_until(
        lambda: query(
            pipeline,
            f"SELECT event_id, hit_rank FROM rec_predictions FINAL WHERE user_id = '{user_pid}' "
            "ORDER BY ts_ms",
        ),
        what="rec_predictions rows",
    )
    assert rows[0] == (f"{user}-2", 1)
    minute = query(
        pipeline,
        "SELECT predictions, hits_20, hit_rate_20, mrr_20, precision_5 FROM rec_quality "
        f"WHERE minute = toDateTime({(T0 + 3 * 60_000) // 1000})",
    )
    assert minute and minute[0][0] >= 1 and minute[0][1] >= 1
    predictions, hits, hit_rate, mrr, precision_5 = minute[0]
    assert hit_rate == pytest.approx(hits / predictions)
    assert 0 < mrr <= hit_rate and precision_5 <= hit_rate / 5 + 1e-9


def test_payments_are_scored_and_card_testing_raises_an_alert(pipeline: Settings) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    user_pid = pseudonym(pipeline, user)  # how ClickHouse holds it
    # Card testing: tiny authorisations within minutes, then a large charge on the same card.
    probes = [payment(user, f"{user}-t{i}", 600 + i * 0.5, 1.0) for i in range(5)]
    big = payment(user, f"{user}-big", 604, 900.0)
    normal = payment(user, f"{user}-normal", 10, 25.0)
    send(pipeline, "payments", normal, *probes, big)
    rows = wait_until(
        lambda: (
            query(
                pipeline,
                f"SELECT txn_id, score, is_alert, reasons FROM fraud_scores FINAL "
                f"WHERE user_id = '{user_pid}' ORDER BY ts_ms",
            )
            if len(
                query(
                    pipeline,
                    f"SELECT txn_id FROM fraud_scores WHERE user_id = '{user_pid}'",
                )
            )
            >= 7
            else None
        ),
        what="fraud_scores rows",
    )
    by_txn = {txn: (score, alert, reasons) for txn, score, alert, reasons in rows}
    assert set(by_txn) == {normal["event_id"], big["event_id"]} | {p["event_id"] for p in probes}
    assert by_txn[normal["event_id"]][1] == 0
    assert by_txn[big["event_id"]][1] == 1
    assert any("card testing" in reason for reason in by_txn[big["event_id"]][2])

    # ClickHouse holds keyed pseudonyms only: neither the raw user nor the card id.
    raw = query(
        pipeline,
        f"SELECT count() FROM fraud_scores WHERE user_id = '{user}' OR card_id = 'card-{user}'",
    )
    assert raw == [(0,)]
    [(card,)] = query(
        pipeline, f"SELECT any(card_id) FROM fraud_scores WHERE txn_id = '{big['event_id']}'"
    )
    assert card == Pseudonymiser.from_settings(pipeline).pseudonym(f"card-{user}", "card")
    # The fraud alert is in the `alerts` view too, with the same pseudonym.
    assert query(
        pipeline, f"SELECT kind, user_id FROM alerts WHERE ref_id = '{big['event_id']}'"
    ) == [("fraud", pseudonym(pipeline, user))]

    alerts = [orjson.loads(m.value()) for m in read_topic(pipeline, "fraud-alerts")]
    mine = [a for a in alerts if a["user_id"] == user]
    assert [a["txn_id"] for a in mine].count(big["event_id"]) == 1
    alert = next(a for a in mine if a["txn_id"] == big["event_id"])
    assert alert["score"] >= alert["threshold"]
    assert alert["reasons"] and alert["card_id"] == f"card-{user}"
    assert alert["model_version"]

    # Risk teams can follow the same alerts in the terminal (Redis stream bf:alerts).
    tail = CliRunner().invoke(
        cli, ["alerts", "tail", "--from-start", "--idle-exit", "2"], obj=pipeline
    )
    assert tail.exit_code == 0, tail.output
    line = next(line for line in tail.output.splitlines() if big["event_id"] in line)
    assert f"user {user}" in line and "card testing" in line


def test_labels_and_shipments_reach_clickhouse(pipeline: Settings) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    user_pid = pseudonym(pipeline, user)  # how ClickHouse holds it
    send(pipeline, "payments", payment(user, f"{user}-p", 5, 30.0, order_id=f"{user}-o"))
    send(
        pipeline,
        "fraud-labels",
        {
            "event_id": f"{user}-l",
            "ts": T0 + 3 * 86_400_000,
            "user_id": user,
            "txn_id": f"{user}-p",
            "label": "fraud",
            "source": "chargeback",
        },
    )
    statuses = ["created", "picked", "departed", "delivered"]
    send(
        pipeline,
        "logistics",
        *[
            {
                "event_id": f"{user}-s{i}",
                "ts": T0 + (i + 1) * 3_600_000,
                "user_id": user,
                "order_id": f"{user}-o",
                "carrier": "dhl",
                "origin_country": "CN",
                "dest_country": "DE",
                "status": status,
                "promised_ts": T0 + 7 * 86_400_000,
            }
            for i, status in enumerate(statuses)
        ],
    )
    labels = wait_until(
        lambda: query(
            pipeline,
            f"SELECT txn_id, label, source FROM fraud_labels WHERE user_id = '{user_pid}'",
        ),
        what="fraud_labels row",
    )
    assert labels == [(f"{user}-p", "fraud", "chargeback")]
    scans = wait_until(
        lambda: (
            rows
            if len(
                rows := query(
                    pipeline,
                    f"SELECT status, carrier, dest_country, promised_ts_ms FROM shipment_events "
                    f"WHERE user_id = '{user_pid}' ORDER BY ts_ms",
                )
            )
            == 4
            else None
        ),
        what="shipment_events rows",
    )
    assert [s[0] for s in scans] == statuses
    assert {(s[1], s[2], s[3]) for s in scans} == {("dhl", "DE", T0 + 7 * 86_400_000)}

    # Each table's buffer is inserted on its own: the rollup rows may land a flush later.
    def rollup() -> dict[str, int] | None:
        counted = dict(
            query(
                pipeline,
                "SELECT topic, sum(events) FROM events_per_minute "
                "WHERE topic IN ('logistics', 'fraud-labels') GROUP BY topic",
            )
        )
        return counted if counted.get("logistics", 0) >= 4 else None

    counted = wait_until(rollup, what="events_per_minute rows")
    assert counted["logistics"] >= 4 and counted["fraud-labels"] >= 1


def test_malformed_events_are_dead_lettered_and_valid_ones_keep_flowing(
    pipeline: Settings,
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    user_pid = pseudonym(pipeline, user)  # how ClickHouse holds it
    not_json = b"{this is not json"
    missing_amount = orjson.dumps({k: v for k, v in payment(user, "x1", 1, 1.0).items()
                                   if k != "amount"})  # fmt: skip
    batch = orjson.dumps(
        [payment(user, f"{user}-ok", 2, 12.0), {**payment(user, "x2", 3, 5.0), "amount": "NaN"}]
    )
    send(pipeline, "payments", not_json, missing_amount, batch)
    send(pipeline, "payments", payment(user, f"{user}-after", 4, 20.0))

    rows = wait_until(
        lambda: (
            rows
            if len(
                rows := query(
                    pipeline,
                    f"SELECT txn_id FROM fraud_scores FINAL WHERE user_id = '{user_pid}' "
                    "ORDER BY txn_id",
                )
            )
            == 2
            else None
        ),
        what="valid payments scored",
    )
    assert [r[0] for r in rows] == [f"{user}-after", f"{user}-ok"]

    letters = [orjson.loads(m.value()) for m in read_topic(pipeline, "deadletter")]
    by_payload = {base64.b64decode(d["payload_b64"]): d for d in letters}
    assert by_payload[not_json]["source_topic"] == pipeline.topic("payments")
    assert "JSON" in by_payload[not_json]["error"] or "json" in by_payload[not_json]["error"]
    assert "amount" in by_payload[missing_amount]["error"]
    array_element = next(d for d in letters if d["index"] == 1 and '"x2"' in d["payload"])
    assert "amount" in array_element["error"]
    assert all(d["offset"] >= 0 and d["partition"] >= 0 for d in letters)
