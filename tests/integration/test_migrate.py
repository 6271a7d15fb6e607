"""Migrations against the real ClickHouse of the local stack, in an isolated database."""

from __future__ import annotations

from typing import Any

import pytest

import infra.migrate
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
            "fraud_label_events",
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


LABEL_COLUMNS = (
    "txn_id, user_id, label, ts, ts_ms, source, ingested_at, src_partition, src_next_offset"
)
JAN, FEB = 1_767_225_600, 1_769_904_000  # 2026-01-01, 2026-02-01 (UTC)


def label_rollups(client: Any) -> list[int]:
    return [
        client.execute(f"SELECT sum(events) FROM {table} WHERE topic = 'fraud-labels'")[0][0]
        for table in ("events_per_minute", "events_per_hour", "activity_per_minute",
                      "activity_per_hour")
    ]  # fmt: skip


def test_label_history_keeps_the_old_labels_and_survives_a_rerun(
    isolated_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0008 on a database that has labels in the old ReplacingMergeTree table: they are copied
    once into fraud_label_events, the rollups do not count them again, fraud_labels becomes the
    latest-label view, and the file can be re-run after a crash at any point."""
    everything = load_migrations()
    (history,) = [m for m in everything if m.name == "label_history"]
    before = [m for m in everything if m.version < history.version]
    monkeypatch.setattr(infra.migrate, "load_migrations", lambda: before)
    migrate(isolated_settings)
    client = clickhouse_client(isolated_settings, isolated_settings.clickhouse_database)
    try:
        # The old table: t1 settled in January and charged back in February (ingested
        # first), t2 charged back; positions as 0006 wrote them.
        client.execute(
            f"INSERT INTO fraud_labels ({LABEL_COLUMNS}) VALUES",
            [
                ("t1", "u1", "legit", JAN, JAN * 1000, "settlement", 100, 0, 5),
                ("t2", "u2", "fraud", JAN, JAN * 1000, "chargeback", 100, 1, 9),
                ("t1", "u1", "fraud", FEB, FEB * 1000, "chargeback", 50, 0, 7),
            ],
        )
        assert label_rollups(client) == [3, 3, 3, 3]

        monkeypatch.setattr(infra.migrate, "load_migrations", lambda: everything)
        assert migrate(isolated_settings)[0] == f"{history.version:04d}_{history.name}"
        events = client.execute(
            "SELECT event_id, txn_id, label, ts_ms, src_partition, src_next_offset "
            "FROM fraud_label_events ORDER BY txn_id, ts_ms"
        )
        assert events == [
            ("", "t1", "legit", JAN * 1000, 0, 5),
            ("", "t1", "fraud", FEB * 1000, 0, 7),
            ("", "t2", "fraud", JAN * 1000, 1, 9),
        ]
        latest = "SELECT txn_id, label, ts_ms, label_events FROM fraud_labels ORDER BY txn_id"
        expected = [("t1", "fraud", FEB * 1000, 2), ("t2", "fraud", JAN * 1000, 1)]
        assert client.execute(latest) == expected
        assert label_rollups(client) == [3, 3, 3, 3]  # the copy was not counted again

        # Re-runs: complete (fraud_labels is the view), and after a crash between the DROP of
        # the old table and the CREATE of the view (no fraud_labels at all).
        for crash in ("", "DROP TABLE fraud_labels"):
            if crash:
                client.execute(crash)
            for statement in history.statements():
                client.execute(statement)
            assert client.execute("SELECT count() FROM fraud_label_events") == [(3,)]
            assert client.execute(latest) == expected
            ((engine,),) = client.execute(
                "SELECT engine FROM system.tables WHERE database = currentDatabase() "
                "AND name = 'fraud_labels'"
            )
            assert engine == "View"

        # New label events go to the history; a later label by label time wins although it
        # was ingested first, also after a merge; the rollups count every event.
        client.execute(
            f"INSERT INTO fraud_label_events (event_id, {LABEL_COLUMNS}) VALUES",
            [
                ("e2", "t2", "u2", "legit", FEB, FEB * 1000, "manual_review", 10, 1, 10),
                ("e1", "t2", "u2", "fraud", JAN, JAN * 1000 + 1, "chargeback", 20, 1, 11),
            ],
        )
        client.execute("OPTIMIZE TABLE fraud_label_events FINAL")
        assert client.execute(latest) == [
            ("t1", "fraud", FEB * 1000, 2),
            ("t2", "legit", FEB * 1000, 3),
        ]
        assert label_rollups(client) == [5, 5, 5, 5]
    finally:
        client.disconnect()
