"""``borderflow retention``: drop ClickHouse data older than a cutoff.

Tables partitioned by month (``PARTITION BY toYYYYMM(...)``) lose whole partitions whose
month ends before the cutoff (``ALTER TABLE ... DROP PARTITION``: instant, no rewrite). The
few small unpartitioned tables are cleaned with a mutation on their time column
(``ALTER TABLE ... DELETE WHERE``; both run on ClickHouse 18.16 and 24+). Views have no data
of their own, and ``schema_migrations`` is never touched.

The cutoff is a calendar date: ``--keep-days N`` counts back from today (retention is an
operational task, so wall-clock time is the right clock), ``--before DATE`` names it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import click

from infra.migrate import clickhouse_client
from schemas.config import Settings
from schemas.errors import BorderflowError

#: Unpartitioned tables, the column that dates their rows, and its type (18.16 compares a
#: DateTime with a Date as plain numbers, so the cutoff literal must have the column's type).
UNPARTITIONED_TIME_COLUMNS = {
    "shipments": ("completed_ts", "DateTime"),
    "model_metrics": ("day", "Date"),
}
NEVER_TOUCHED = frozenset({"schema_migrations"})


@dataclass(frozen=True)
class RetentionAction:
    table: str
    sql: str
    what: str  # human-readable: which partition or how many rows


def plan_retention(client: Any, database: str, cutoff: date) -> list[RetentionAction]:
    """What would be removed to keep only data from ``cutoff`` on (nothing is changed)."""
    cutoff_month = cutoff.year * 100 + cutoff.month
    actions = []
    rows = client.execute(
        "SELECT table, partition, sum(rows) FROM system.parts "
        "WHERE database = %(db)s AND active GROUP BY table, partition ORDER BY table, partition",
        {"db": database},
    )
    for table, partition, n_rows in rows:
        if table in NEVER_TOUCHED or table in UNPARTITIONED_TIME_COLUMNS:
            continue
        if partition.isdigit() and len(partition) == 6 and int(partition) < cutoff_month:
            actions.append(
                RetentionAction(
                    table,
                    f"ALTER TABLE {database}.{table} DROP PARTITION {partition}",
                    f"partition {partition} ({n_rows:,} rows)",
                )
            )
    existing = {name for (name,) in client.execute(f"SHOW TABLES FROM {database}")}
    for table, (column, kind) in UNPARTITIONED_TIME_COLUMNS.items():
        if table not in existing:
            continue
        literal = (
            f"toDateTime('{cutoff.isoformat()} 00:00:00', 'UTC')"
            if kind == "DateTime"
            else f"toDate('{cutoff.isoformat()}')"
        )
        condition = f"{column} < {literal}"
        [(n_rows,)] = client.execute(f"SELECT count() FROM {database}.{table} WHERE {condition}")
        if n_rows:
            actions.append(
                RetentionAction(
                    table,
                    f"ALTER TABLE {database}.{table} DELETE WHERE {condition}",
                    f"{n_rows:,} rows before {cutoff.isoformat()}",
                )
            )
    return actions


def run_retention(settings: Settings, cutoff: date, *, dry_run: bool) -> list[RetentionAction]:
    database = settings.clickhouse_database
    try:
        client = clickhouse_client(settings, database)
        try:
            actions = plan_retention(client, database, cutoff)
            if not dry_run:
                for action in actions:
                    client.execute(action.sql)
                wait_for_mutations(client, database)
        finally:
            client.disconnect()
    except BorderflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - one readable line for the CLI
        raise BorderflowError(f"retention failed on ClickHouse: {exc}".splitlines()[0]) from None
    return actions


def wait_for_mutations(
    client: Any, database: str, timeout_s: float = 60.0, what: str = "retention deletes"
) -> None:
    """Deletes are mutations, applied in the background: return once they are done (also
    used by ``borderflow forget``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        [(pending,)] = client.execute(
            "SELECT count() FROM system.mutations WHERE database = %(db)s AND is_done = 0",
            {"db": database},
        )
        if not pending:
            return
        time.sleep(0.2)
    raise BorderflowError(f"{what} still running after {timeout_s:.0f} s")


@click.command("retention")
@click.option(
    "--keep-days",
    type=click.IntRange(min=1),
    default=400,
    show_default=True,
    help="Keep data from this many days ago on (whole months older than that are dropped).",
)
@click.option(
    "--before",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="Cutoff date instead of --keep-days: remove data before it.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_obj
def retention_command(
    settings: Settings, keep_days: int, before: datetime | None, dry_run: bool
) -> None:
    """Drop ClickHouse partitions (and rows of unpartitioned tables) older than a cutoff."""
    cutoff = before.date() if before else datetime.now(UTC).date() - timedelta(days=keep_days)
    actions = run_retention(settings, cutoff, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    if not actions:
        click.echo(f"nothing before {cutoff.isoformat()} in {settings.clickhouse_database}")
    for action in actions:
        click.echo(f"{verb} {action.table}: {action.what}")
