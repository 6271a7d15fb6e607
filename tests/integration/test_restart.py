"""A worker killed with SIGKILL loses nothing and doubles nothing after a restart.

Profiles come back from the table's changelog, offsets whose ClickHouse rows were still
buffered are processed again, and the idempotent sinks absorb the repeats.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated, start_worker, wait_processed
from schemas.config import Settings
from sinks.kafka import ensure_topics
from sinks.redis_store import RedisStore
from tests.integration.test_pipeline import TOPICS, click, payment, send, wait_until

pytestmark = pytest.mark.integration


def profile_of(settings: Settings, user: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        store = RedisStore(settings)
        try:
            return await store.read_profile(user)
        finally:
            await store.aclose()

    return asyncio.run(read())


def test_sigkill_and_restart_lose_and_double_nothing(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(
        stack,
        "kill",
        clickhouse_database=f"bf_kill_{uuid.uuid4().hex[:8]}",
        clickhouse_flush_interval_s=5.0,  # rows still buffered when the worker dies
    )
    migrate(settings)
    ensure_topics(settings, TOPICS)
    user = f"u-{uuid.uuid4().hex[:8]}"
    clicks = [click(user, f"{user}-c{i}", i, item_id=f"i{i % 3}") for i in range(5)]
    payments = [payment(user, f"{user}-p{i}", 100 + i * 30, 20.0 + i) for i in range(40)]

    first = start_worker(settings, tmp_path, "first")
    try:
        send(settings, "clicks", *clicks)
        send(settings, "payments", *payments)
        wait_processed(settings, len(clicks) + len(payments), first, timeout_s=120)
        assert profile_of(settings, user)["events"] == "5"
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)

    second = start_worker(settings, tmp_path, "second")
    try:
        send(settings, "clicks", click(user, f"{user}-c5", 5, item_id="i9"))
        wait_until(
            lambda: profile_of(settings, user).get("events") == "6",
            timeout_s=90,
            what="the profile to continue from its restored state",
        )
        client = clickhouse_client(settings, settings.clickhouse_database)
        rows = wait_until(
            lambda: (
                rows
                if (rows := client.execute("SELECT count(), uniqExact(txn_id) FROM fraud_scores"))
                and rows[0][1] == len(payments)
                else None
            ),
            timeout_s=60,
            what="every payment scored",
        )
        distinct = rows[0][1]
        assert distinct == len(payments)
        exact = client.execute("SELECT count() FROM fraud_scores FINAL")[0][0]
        assert exact == len(payments)
        client.execute(f"DROP DATABASE {settings.clickhouse_database}")
    finally:
        second.stop()
