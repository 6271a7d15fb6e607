"""``borderflow retention`` on the real ClickHouse: old months go, recent data stays."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from infra.cli import cli
from infra.migrate import clickhouse_client, migrate
from schemas.config import Settings
from sinks.clickhouse import TABLE_COLUMNS

pytestmark = pytest.mark.integration

OLD = 1_736_035_200  # 2025-01-05T00:00:00Z
NEW = 1_767_225_600  # 2026-01-01T00:00:00Z


@pytest.fixture
def database(stack: Settings) -> Iterator[Settings]:
    settings = stack.model_copy(update={"clickhouse_database": f"bf_ret_{uuid.uuid4().hex[:8]}"})
    migrate(settings)
    yield settings
    admin = clickhouse_client(settings)
    admin.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    admin.disconnect()


def counts(settings: Settings) -> dict[str, int]:
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        return {
            table: client.execute(f"SELECT count() FROM {table}")[0][0]
            for table in (
                "click_events",
                "events_per_minute",
                "events_per_hour",
                "shipments",
                "schema_migrations",
            )
        }
    finally:
        client.disconnect()


def test_retention_drops_old_months_and_keeps_recent_data(database: Settings) -> None:
    client = clickhouse_client(database, database.clickhouse_database)
    try:
        for n, ts in enumerate((OLD, NEW)):  # the rollups are views over click_events
            client.execute(
                f"INSERT INTO click_events ({', '.join(TABLE_COLUMNS['click_events'])}) VALUES",
                [(f"e{n}", ts, ts * 1000, "u1", "s1", "view", "i1", "shoes", "DE", 0.0, "",
                  ts, "CN", 0, n + 1)],
            )  # fmt: skip
        for order, completed in (("old", OLD), ("new", NEW)):
            client.execute(
                "INSERT INTO shipments VALUES",
                [(order, "u1", "dhl", "CN", "DE", completed - 86400, completed, "delivered",
                  1.0, 1, 1, 0.0, 0, 0, 0, completed * 1000, completed, 0, 0)],
            )  # fmt: skip
    finally:
        client.disconnect()
    before = counts(database)
    assert before["events_per_minute"] == 2 and before["events_per_hour"] == 2
    assert before["shipments"] == 2

    runner = CliRunner()
    dry = runner.invoke(cli, ["retention", "--before", "2025-06-01", "--dry-run"], obj=database)
    assert dry.exit_code == 0, dry.output
    assert "would remove events_per_minute: partition 202501 (1 rows)" in dry.output
    assert "would remove shipments: 1 rows before 2025-06-01" in dry.output
    assert counts(database) == before  # a dry run changes nothing

    done = runner.invoke(cli, ["retention", "--before", "2025-06-01"], obj=database)
    assert done.exit_code == 0, done.output
    assert "removed events_per_hour: partition 202501" in done.output
    after = counts(database)
    assert after["click_events"] == 1
    assert after["events_per_minute"] == 1 and after["events_per_hour"] == 1
    assert after["shipments"] == 1  # the mutation runs synchronously on a small table
    assert after["schema_migrations"] == before["schema_migrations"]
    again = runner.invoke(cli, ["retention", "--before", "2025-06-01"], obj=database)
    assert "nothing before 2025-06-01" in again.output
