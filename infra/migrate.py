"""Versioned, idempotent ClickHouse migrations.

Migrations are the files ``infra/migrations/NNNN_name.sql`` applied in order. Each applied
version is recorded in ``schema_migrations`` with the file's checksum; re-running applies only
what is missing, and a changed checksum of an applied file is an error (migrations are
append-only). Every statement also uses ``IF NOT EXISTS`` so a half-applied file can be
re-run safely after a crash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from clickhouse_driver import Client
from clickhouse_driver.errors import Error as ClickHouseError

from schemas.config import Settings
from schemas.errors import BorderflowError
from sinks.clickhouse import clickhouse_client as sinks_clickhouse_client

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        """Split on ';' at line ends; comments are dropped (18.16 rejects some of them)."""
        lines = [line for line in self.sql.splitlines() if not line.strip().startswith("--")]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise BorderflowError(f"migration file {path.name} is not named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise BorderflowError("two migration files share a version number")
    return migrations


def clickhouse_client(settings: Settings, database: str | None = None) -> Client:
    """A client on ``database``, or on ``default`` (which always exists) when not given."""
    return sinks_clickhouse_client(settings, database or "default")


#: ClickHouse's "Cannot add column: column with this name already exists".
_COLUMN_EXISTS = 44


def _execute_idempotently(client: Client, statement: str) -> None:
    """Run one statement; an ``ADD COLUMN`` that already happened is done, not an error.

    18.16 has no ``ADD COLUMN IF NOT EXISTS``: without this, a migration interrupted after
    its ALTER could never be re-run.
    """
    try:
        client.execute(statement)
    except ClickHouseError as exc:
        is_add_column = re.match(r"\s*ALTER\s+TABLE\b.*\bADD\s+COLUMN\b", statement, re.I | re.S)
        if not (is_add_column and getattr(exc, "code", None) == _COLUMN_EXISTS):
            raise


def migrate(settings: Settings) -> list[str]:
    """Apply missing migrations; return the names applied (empty when up to date)."""
    database = settings.clickhouse_database
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise BorderflowError(f"invalid ClickHouse database name {database!r}")
    try:
        admin = clickhouse_client(settings)
        admin.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
        admin.disconnect()
        client = clickhouse_client(settings, database)
        client.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version UInt32, name String, checksum String, applied_at DateTime('UTC')) "
            "ENGINE = MergeTree ORDER BY version"
        )
        applied = {
            version: checksum
            for version, checksum in client.execute(
                "SELECT version, checksum FROM schema_migrations"
            )
        }
        done = []
        for migration in load_migrations():
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise BorderflowError(
                        f"migration {migration.version:04d}_{migration.name} changed after it "
                        "was applied; add a new migration instead of editing an old one"
                    )
                continue
            for statement in migration.statements():
                _execute_idempotently(client, statement)
            client.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES",
                [(migration.version, migration.name, migration.checksum, datetime.now(UTC))],
            )
            done.append(f"{migration.version:04d}_{migration.name}")
        client.disconnect()
        return done
    except ClickHouseError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise BorderflowError(
            f"ClickHouse at {settings.clickhouse_host}:{settings.clickhouse_port}: {first_line}"
        ) from exc
    except OSError as exc:
        raise BorderflowError(
            f"cannot reach ClickHouse at {settings.clickhouse_host}:{settings.clickhouse_port}: "
            f"{exc}"
        ) from exc
