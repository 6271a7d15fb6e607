"""Migrations against the real ClickHouse of the local stack, in an isolated database."""

from __future__ import annotations

import pytest

from infra.migrate import clickhouse_client, load_migrations, migrate
from schemas.config import Settings
from schemas.errors import BorderflowError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_migrate_is_idempotent_and_records_versions(isolated_settings: Settings) -> None:
    expected = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert migrate(isolated_settings) == expected
    assert migrate(isolated_settings) == []

    client = clickhouse_client(isolated_settings, isolated_settings.clickhouse_database)
    try:
        rows = client.execute(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
        )
        assert rows == [(m.version, m.name, m.checksum) for m in load_migrations()]
        tables = {name for (name,) in client.execute("SHOW TABLES")}
        assert {
            "fraud_scores",
            "fraud_labels",
            "shipment_events",
            "events_per_minute",
            "events_per_hour",
            "events_per_hour_clicks_mv",
            "click_events",
            "schema_migrations",
        } <= tables
        assert "events_per_hour_mv" not in tables  # replaced by views over the facts (0006)
    finally:
        client.disconnect()


def test_changed_checksum_of_an_applied_migration_is_refused(isolated_settings: Settings) -> None:
    migrate(isolated_settings)
    client = clickhouse_client(isolated_settings, isolated_settings.clickhouse_database)
    try:
        first = load_migrations()[0]
        client.execute("TRUNCATE TABLE schema_migrations")
        client.execute(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES",
            [(first.version, first.name, "0000000000000000", 0)],
        )
    finally:
        client.disconnect()
    with pytest.raises(BorderflowError) as exc:
        migrate(isolated_settings)
    message = str(exc.value)
    assert f"{first.version:04d}_{first.name} changed after it was applied" in message
    assert "\n" not in message
