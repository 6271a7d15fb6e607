"""Exactly-once ClickHouse facts under at-least-once processing.

Faust commits a batch's offsets only once ClickHouse holds its rows, so after a crash the
worker processes again every event after the last commit, and some of them already have their
rows in ClickHouse. Every fact row therefore carries its event's Kafka position
(``src_partition``, ``src_next_offset`` = offset + 1), and before the first batch of a
partition the worker asks each fact table for ``max(src_next_offset)`` of that partition: the
*written position*. Rows of events below it are not written again.

Why that is exact: the ClickHouse writer inserts each table's rows in the order they were
added, and a worker adds a partition's rows in offset order, so what a table holds of a
partition is always a prefix of its offsets (an insert is atomic per block); an event below the
written position has all its rows in the table, an event at or above it has none. Rollups are
materialized views over the facts (migration 0006), so a fact written once is counted once.

Positions are read when a partition is (re)assigned, because another worker may have written
since; a worker losing partitions flushes its buffered rows first (``streams/app.py``), so the
next owner reads a position that includes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import faust
from clickhouse_driver.errors import NetworkError, SocketTimeoutError

from schemas.config import Settings
from sinks.clickhouse import FACT_TABLES, clickhouse_client

log = logging.getLogger(__name__)

#: ClickHouse not answering (stopped, restarting, network): the read is retried.
UNREACHABLE: tuple[type[BaseException], ...] = (NetworkError, SocketTimeoutError, OSError, EOFError)
READ_RETRY_INITIAL_S = 0.2
READ_RETRY_MAX_S = 5.0


class SinkPositions:
    """Written positions per (fact table, partition), read from ClickHouse on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._known: dict[tuple[str, int], int] = {}
        #: Rows not written again because ClickHouse already held them (operators, tests).
        self.skipped: dict[str, int] = defaultdict(int)

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions (re)assigned: their positions must be read again."""
        wanted = set(partitions)
        for key in [key for key in self._known if key[1] in wanted]:
            del self._known[key]

    async def rows_for(self, topic: str, events: Iterable[faust.EventT]) -> FactRows:
        """A row collector for one batch of ``topic`` (contract name)."""
        tables = FACT_TABLES[topic]
        partitions = {event.message.partition for event in events}
        missing = sorted(
            {p for p in partitions for table in tables if (table, p) not in self._known}
        )
        if missing:
            found = await self._read_until_answered(tables, missing)
            for table in tables:
                for partition in missing:
                    self._known[(table, partition)] = found.get((table, partition), 0)
        return FactRows(self, tables)

    async def _read_until_answered(
        self, tables: Iterable[str], partitions: list[int]
    ) -> dict[tuple[str, int], int]:
        """The positions, waiting (backoff up to ``READ_RETRY_MAX_S``) while ClickHouse is
        unreachable: a batch must not write facts without knowing them, nor fail."""
        delay = READ_RETRY_INITIAL_S
        warned = False
        while True:
            try:
                return await asyncio.to_thread(self._read, tables, partitions)
            except UNREACHABLE as exc:
                if not warned:
                    log.warning(
                        "ClickHouse unreachable for the written positions, retrying: %s", exc
                    )
                    warned = True
                await asyncio.sleep(delay)
                delay = min(READ_RETRY_MAX_S, delay * 2)

    def position(self, table: str, partition: int) -> int:
        return self._known.get((table, partition), 0)

    def _read(self, tables: Iterable[str], partitions: list[int]) -> dict[tuple[str, int], int]:
        client = clickhouse_client(self.settings, self.settings.clickhouse_database)
        try:
            found: dict[tuple[str, int], int] = {}
            for table in tables:
                rows = client.execute(
                    f"SELECT src_partition, max(src_next_offset) FROM {table} "
                    "WHERE src_partition IN %(partitions)s GROUP BY src_partition",
                    {"partitions": tuple(partitions)},
                )
                for partition, next_offset in rows:
                    found[(table, int(partition))] = int(next_offset)
            return found
        finally:
            client.disconnect()


class FactRows:
    """One batch's fact rows per table, each tagged with its event's position; rows of events
    the table already holds are dropped (see the module docstring)."""

    def __init__(self, positions: SinkPositions, tables: Iterable[str]) -> None:
        self.positions = positions
        self.rows: dict[str, list[tuple[Any, ...]]] = {table: [] for table in tables}

    def add(self, table: str, event: faust.EventT, row: tuple[Any, ...]) -> None:
        message = event.message
        next_offset = message.offset + 1
        if next_offset <= self.positions.position(table, message.partition):
            self.positions.skipped[table] += 1
            return
        self.rows[table].append((*row, message.partition, next_offset))
