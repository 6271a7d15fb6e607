"""Migration files: loading, ordering, statement splitting, checksums, unreachable server."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.migrate import MIGRATIONS_DIR, Migration, load_migrations, migrate
from schemas.config import Settings
from schemas.errors import BorderflowError


def test_shipped_migrations_load_in_version_order() -> None:
    migrations = load_migrations()
    assert migrations, "no migration files found"
    versions = [m.version for m in migrations]
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    assert (migrations[0].version, migrations[0].name) == (1, "initial")
    assert len(migrations) == len(list(MIGRATIONS_DIR.glob("*.sql")))


def test_files_are_ordered_by_version_not_by_creation(tmp_path: Path) -> None:
    for name in ("0010_ten.sql", "0002_two.sql", "0001_one.sql"):
        (tmp_path / name).write_text("SELECT 1;\n")
    assert [(m.version, m.name) for m in load_migrations(tmp_path)] == [
        (1, "one"),
        (2, "two"),
        (10, "ten"),
    ]


@pytest.mark.parametrize("bad", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql", "abcd_x.sql"])
def test_badly_named_file_is_an_error(tmp_path: Path, bad: str) -> None:
    (tmp_path / bad).write_text("SELECT 1;")
    with pytest.raises(BorderflowError, match="NNNN_name.sql"):
        load_migrations(tmp_path)


def test_duplicate_version_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(BorderflowError, match="share a version"):
        load_migrations(tmp_path)


def test_shipped_statements_are_complete_and_carry_no_comments() -> None:
    statements = [s for m in load_migrations() for s in m.statements()]
    assert statements
    for statement in statements:
        assert "--" not in statement
        assert ";" not in statement
        assert statement == statement.strip()
        assert statement.count("(") == statement.count(")")
        # Safe to re-run after a half-applied file: CREATE/DROP ... IF (NOT) EXISTS, ADD
        # COLUMN (18.16 has no IF NOT EXISTS there; migrate() treats "already exists" as
        # done), and INSERT ... SELECT only while its target is still empty (a one-off copy).
        verb = statement.split()[0]
        if verb == "CREATE":
            assert "IF NOT EXISTS" in statement
        elif verb == "DROP":
            assert "IF EXISTS" in statement
        elif verb == "INSERT":
            target = statement.split()[2]
            assert statement.rstrip().endswith(f"WHERE (SELECT count() FROM {target}) = 0"), (
                statement
            )
        else:
            assert verb == "ALTER" and "ADD COLUMN" in statement, statement
    created = {s.split("IF NOT EXISTS")[1].split()[0] for s in statements if "IF NOT EXISTS" in s}
    assert {
        "fraud_scores",
        "fraud_labels",
        "fraud_label_events",
        "shipment_events",
        "events_per_minute",
    } <= created


def test_label_history_replaces_the_replacing_label_table() -> None:
    """0008: label events into a MergeTree, copied once, rollups moved, the old table a view."""
    (label_history,) = [m for m in load_migrations() if m.name == "label_history"]
    statements = [" ".join(s.split()) for s in label_history.statements()]

    def index(prefix: str) -> int:
        (found,) = [i for i, s in enumerate(statements) if s.startswith(prefix)]
        return found

    create_events = index("CREATE TABLE IF NOT EXISTS fraud_label_events")
    engine = "ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (txn_id, ts_ms, event_id)"
    assert engine in statements[create_events]
    copy = index("INSERT INTO fraud_label_events")
    drop_table = index("DROP TABLE IF EXISTS fraud_labels")
    view = index("CREATE VIEW IF NOT EXISTS fraud_labels AS")
    assert create_events < copy < drop_table < view
    # A re-run after a crash between the DROP and the view finds a stand-in to copy from.
    assert index("CREATE TABLE IF NOT EXISTS fraud_labels") < copy
    assert "FROM fraud_labels WHERE" in statements[copy]
    for name in (
        "events_per_minute_labels_mv",
        "events_per_hour_labels_mv",
        "activity_per_minute_labels_mv",
        "activity_per_hour_labels_mv",
    ):
        # Recreated after the copy (the copied events are already in the rollups).
        assert copy < index(f"DROP TABLE IF EXISTS {name}")
        created = statements[index(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}")]
        assert "FROM fraud_label_events" in created
    assert "argMax(" in statements[view] and "(ts_ms, event_id)" in statements[view]
    assert "count() AS label_events" in statements[view]


def test_statement_splitting() -> None:
    sql = (
        "-- header comment; with a semicolon\n"
        "CREATE TABLE a\n(\n    x UInt8\n)\nENGINE = Memory;\n"
        "\n   -- indented comment\n"
        "CREATE TABLE b (y UInt8) ENGINE = Memory;\n"
        ";\n"
        "SELECT 1\n"
    )
    statements = Migration(1, "t", sql).statements()
    assert statements == [
        "CREATE TABLE a\n(\n    x UInt8\n)\nENGINE = Memory",
        "CREATE TABLE b (y UInt8) ENGINE = Memory",
        "SELECT 1",
    ]


def test_checksum_is_stable_and_changes_with_the_content() -> None:
    a = Migration(1, "x", "CREATE TABLE t (a UInt8) ENGINE = Memory;")
    assert a.checksum == Migration(1, "x", a.sql).checksum
    assert len(a.checksum) == 16 and int(a.checksum, 16) >= 0
    assert Migration(1, "x", a.sql + " ").checksum != a.checksum
    assert Migration(2, "y", a.sql).checksum == a.checksum  # content only
    first = load_migrations()[0]
    assert first.checksum == load_migrations()[0].checksum


def test_migrate_against_a_closed_port_is_one_readable_line() -> None:
    settings = Settings(clickhouse_host="127.0.0.1", clickhouse_port=1)
    with pytest.raises(BorderflowError) as exc:
        migrate(settings)
    message = str(exc.value)
    assert "\n" not in message
    assert "127.0.0.1:1" in message


@pytest.mark.parametrize("name", ["bad-name", "x; DROP DATABASE y", "1abc", ""])
def test_invalid_database_name_is_refused_before_connecting(name: str) -> None:
    settings = Settings(clickhouse_port=1, clickhouse_database=name)
    with pytest.raises(BorderflowError, match="invalid ClickHouse database name"):
        migrate(settings)
