"""``borderflow forget`` on the real local stack: a worker, two users, one of them erased.

What must be gone for the forgotten user: the Redis keys (profile, recs, meta, shipment hash,
alert stream entries), every ClickHouse row under the user's pseudonym (and the predictions
of the user's orders), and the Faust table entries (a new click starts a fresh profile). The
other user keeps everything. Without a worker the workers' part is reported as pending, and
a worker that starts later applies the waiting request.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from infra.cli import cli
from infra.migrate import clickhouse_client, migrate
from infra.privacy import EXIT_PENDING
from infra.processes import WorkerProcess, isolated, start_worker, wait_processed
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.kafka import ensure_topics
from tests.integration.test_pipeline import (
    T0,
    click,
    payment,
    pseudonym,
    query,
    redis_read,
    send,
    wait_until,
)

pytestmark = pytest.mark.integration

DAY = 86_400_000
#: Tables holding the user's rows in this test (logistics_alerts and shipment_predictions
#: may have none: they need a delay or a learned lane).
USER_TABLES = ("click_events", "rec_predictions", "fraud_scores", "fraud_label_events",
               "shipment_events", "shipments")  # fmt: skip


def _settings(stack: Settings, label: str) -> Settings:
    settings = isolated(
        stack,
        label,
        clickhouse_database=f"bf_{label}_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=0.2,
    )
    migrate(settings)
    ensure_topics(settings, list(ALL_TOPICS))
    return settings


def _drop(settings: Settings) -> None:
    client = clickhouse_client(settings)
    try:
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    finally:
        client.disconnect()


def _start(settings: Settings, log_dir: Path) -> WorkerProcess:
    worker = start_worker(settings, log_dir, "worker")
    send(settings, "clicks", click(f"warm-{uuid.uuid4().hex[:6]}", f"warm-{uuid.uuid4()}", 0))
    wait_processed(settings, 1, worker, timeout_s=120)
    return worker


@pytest.fixture(scope="module")
def forgetting(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = _settings(stack, "forget")
    worker = _start(settings, tmp_path_factory.mktemp("forget-worker"))
    try:
        yield settings
    finally:
        worker.stop()
        _drop(settings)


def journey(user: str) -> dict[str, list[dict[str, Any]]]:
    """Clicks (a second round is scored against the first round's recs), payments with a
    card-testing alert, a label and a delivered shipment."""
    probes = [payment(user, f"{user}-t{i}", 600 + i * 0.5, 1.0) for i in range(5)]
    big = payment(user, f"{user}-big", 604, 900.0)
    scans = [
        {
            "event_id": f"{user}-scan-{status}", "ts": T0 + day * DAY, "user_id": user,
            "order_id": f"{user}-o1", "carrier": "dhl", "origin_country": "CN",
            "dest_country": "DE", "status": status, "promised_ts": T0 + 5 * DAY,
        }
        for day, status in ((0, "created"), (3, "delivered"))
    ]  # fmt: skip
    label = {
        "event_id": f"{user}-label", "ts": T0 + 2 * DAY, "txn_id": big["event_id"],
        "user_id": user, "label": "fraud", "source": "chargeback",
    }  # fmt: skip
    return {
        "first": [
            click(user, f"{user}-c1", 1, item_id="i1"),
            click(user, f"{user}-c2", 2, item_id="i2"),
        ],
        "second": [click(user, f"{user}-c3", 3, item_id="i1", type="purchase", price=30.0)],
        "payments": [payment(user, f"{user}-n", 10, 25.0), *probes, big],
        "fraud-labels": [label],
        "logistics": scans,
    }


def rows_of(settings: Settings, user: str) -> dict[str, int]:
    pid = pseudonym(settings, user)
    return {
        table: query(settings, f"SELECT count() FROM {table} WHERE user_id = '{pid}'")[0][0]
        for table in USER_TABLES
    }


def alert_users(settings: Settings) -> list[str]:
    import orjson

    return [orjson.loads(doc)["user_id"] for _, doc in redis_read(settings, "read_alerts")]


def test_forget_erases_one_user_everywhere_and_says_what_went(forgetting: Settings) -> None:
    settings = forgetting
    gone, stays = (f"u-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for round_ in ("first", "second"):
        for user in (gone, stays):
            send(settings, "clicks", *journey(user)[round_])
        for user in (gone, stays):
            last = journey(user)[round_][-1]["event_id"]
            wait_until(
                lambda u=user, e=last: (
                    redis_read(settings, "read_meta", u).get("last_event_id") == e
                ),
                what=f"recs of {user} after the {round_} clicks",
            )
    for topic in ("payments", "fraud-labels", "logistics"):
        for user in (gone, stays):
            send(settings, topic, *journey(user)[topic])
    for user in (gone, stays):
        wait_until(
            lambda u=user: all(rows_of(settings, u).values()),
            timeout_s=60,
            what=f"ClickHouse rows of {user}",
        )
        wait_until(
            lambda u=user: (
                redis_read(settings, "read_shipment", f"{u}-o1").get("status") == "delivered"
            ),
            what=f"shipment hash of {user}",
        )
    assert gone in alert_users(settings) and stays in alert_users(settings)
    before, before_stays = rows_of(settings, gone), rows_of(settings, stays)
    gone_pid = pseudonym(settings, gone)

    result = CliRunner().invoke(cli, ["forget", gone, "--wait", "90"], obj=settings)

    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"forget {gone} (request ")
    assert f"ClickHouse pseudonym {gone_pid}" in out
    for table, count in before.items():
        assert f"{table} {count}" in out, (table, out)
    assert "redis       removed: profile 1, recs keys 2, shipment hashes 1, alert entries 1" in out
    workers = re.search(r"workers +removed on partition (\d+): (.*)", out)
    assert workers is not None, out
    assert "user_profiles entry 1, user_shipments entry 1, orders 1" in workers.group(2)
    assert "fraud user state 1, card states 1, device states 1, payment snapshots 7" in out
    assert "pending" not in out

    # Redis: the user's keys and alerts are gone, the other user's are all there.
    for method, key in (("read_profile", gone), ("read_meta", gone),
                        ("read_shipment", f"{gone}-o1")):  # fmt: skip
        assert redis_read(settings, method, key) == {}
    assert redis_read(settings, "read_recs", gone, 20) == []
    assert redis_read(settings, "read_profile", stays)["events"] == "3"
    assert redis_read(settings, "read_shipment", f"{stays}-o1")["user_id"] == stays
    assert gone not in alert_users(settings) and stays in alert_users(settings)

    # ClickHouse: no row under the user's pseudonym (nor of the user's order); the other
    # user's rows are all kept.
    assert rows_of(settings, gone) == dict.fromkeys(USER_TABLES, 0)
    assert rows_of(settings, stays) == before_stays
    orders = query(
        settings,
        f"SELECT count() FROM shipment_predictions WHERE order_id = '{gone}-o1'",
    )
    assert orders == [(0,)]
    pending = query(
        settings,
        "SELECT count() FROM system.mutations "
        f"WHERE database = '{settings.clickhouse_database}' AND is_done = 0",
    )
    assert pending == [(0,)]

    # Faust tables: the forgotten user's next click starts a new profile; the other user's
    # profile goes on from where it was.
    send(settings, "clicks", click(gone, f"{gone}-c9", 60), click(stays, f"{stays}-c9", 60))
    for user, events in ((gone, "1"), (stays, "4")):
        wait_until(
            lambda u=user, n=events: redis_read(settings, "read_profile", u).get("events") == n,
            what=f"the profile of {user} after the later click",
        )
    fresh = redis_read(settings, "read_profile", gone)
    assert (fresh["events"], fresh["first_event_ts"], fresh["frequency_purchases"]) == (
        "1", str(T0 + 60 * 60_000), "0",
    )  # fmt: skip
    assert fresh["deliveries"] == "0" and fresh["open_shipments"] == "0"
    kept = redis_read(settings, "read_profile", stays)
    assert (kept["events"], kept["frequency_purchases"], kept["deliveries"]) == ("4", "1", "1")

    # Running it again finds only what came after (and is how a pending erasure is confirmed).
    wait_until(lambda: rows_of(settings, gone)["click_events"] == 1, what="the later click row")
    again = CliRunner().invoke(cli, ["forget", gone, "--dry-run"], obj=settings)
    assert again.exit_code == 0, again.output
    assert "clickhouse  would remove: click_events 1" in again.output  # the later click only


def test_without_a_worker_the_request_waits_until_one_starts(
    stack: Settings, tmp_path: Path
) -> None:
    settings = _settings(stack, "forgetpending")
    worker: WorkerProcess | None = None
    try:
        result = CliRunner().invoke(cli, ["forget", "someone", "--wait", "1"], obj=settings)
        assert result.exit_code == EXIT_PENDING, result.output
        assert "workers     pending" in result.output and "privacy-requests" in result.output
        request_id = re.search(r"\(request ([0-9a-f]+)\)", result.output)
        assert request_id is not None
        worker = _start(settings, tmp_path)
        receipt = wait_until(
            lambda: redis_read(settings, "read_privacy_receipt", request_id.group(1)),
            timeout_s=60,
            what="the receipt of the waiting request",
        )
        assert receipt["status"] == "done" and receipt["table_user_profiles"] == "0"
    finally:
        if worker is not None:
            worker.stop()
        _drop(settings)
