"""Buffered, columnar ClickHouse writer running in its own thread.

ClickHouse wants few large inserts (about one per second per table), while the agents produce
small micro-batches many times a second, and clickhouse-driver is synchronous. So agents hand
rows to :class:`ClickHouseWriter` (a cheap, thread-safe append), and a background thread
inserts each table's buffer as one columnar block when it reaches ``flush_rows`` rows or
``flush_interval_s`` seconds of age.

Durability is reported back: ``add(..., on_durable=callback)`` calls ``callback`` once every
row added *before* it is stored. The Faust agents use that to hold back the commit of source
offsets until their rows are in ClickHouse (at-least-once). A failing insert is retried with
exponential backoff and nothing is dropped; the buffer is bounded and ``wait_for_capacity``
lets producers pause (backpressure) instead of growing without limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from clickhouse_driver import Client

from schemas.config import Settings
from sinks.pseudonym import IdKind, Pseudonymiser

log = logging.getLogger(__name__)

#: Where a fact row came from: its event's partition and the offset after it (fact tables).
SOURCE_COLUMNS = ("src_partition", "src_next_offset")

#: Column order of every table the pipeline writes (the contract in docs/contracts.md).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "click_events": (
        "event_id", "ts", "ts_ms", "user_id", "session_id", "click_type", "item_id", "category",
        "country", "amount_usd", "segment", "ingested_at", "origin_country", *SOURCE_COLUMNS,
    ),
    "fraud_scores": (
        "txn_id", "user_id", "card_id", "merchant_id", "ts", "ts_ms", "amount", "currency",
        "amount_usd", "score", "is_alert", "threshold", "reasons", "model_version",
        "billing_country", "shipping_country", "ip_country", "scored_at", "origin_country",
        *SOURCE_COLUMNS,
    ),
    "fraud_label_events": (
        "event_id", "txn_id", "user_id", "label", "ts", "ts_ms", "source", "ingested_at",
        *SOURCE_COLUMNS,
    ),
    "shipment_events": (
        "event_id", "order_id", "user_id", "carrier", "origin_country", "dest_country", "status",
        "ts", "ts_ms", "promised_ts_ms", "location", "ingested_at", *SOURCE_COLUMNS,
    ),
    "logistics_alerts": (
        "alert_id", "kind", "order_id", "user_id", "ts", "ts_ms", "carrier", "origin_country",
        "dest_country", "predicted_delivery_ts_ms", "promised_ts_ms", "reason", "ingested_at",
    ),
    "model_metrics": ("computed_at", "run_id", "model", "day", "metric", "value", "n"),
    "events_per_minute": ("minute", "topic", "event_type", "country", "events", "amount_usd"),
    "segment_mix_per_hour": ("hour", "country", "segment", "purchases", "revenue_usd"),
    "shipments": (
        "order_id", "user_id", "carrier", "origin_country", "dest_country", "created_ts",
        "completed_ts", "outcome", "transit_days", "has_promise", "on_time", "customs_hours",
        "failed_attempts", "returned", "invalid_transitions", "version", "ingested_at",
        *SOURCE_COLUMNS,
    ),
    "shipment_predictions": (
        "event_id", "order_id", "ts", "ts_ms", "status", "carrier", "origin_country",
        "dest_country", "predicted_delivery_ts_ms", "promised_ts_ms", "delay_risk", "ingested_at",
        *SOURCE_COLUMNS,
    ),
    "rec_predictions": (
        "event_id", "ts", "ts_ms", "user_id", "country", "click_type", "hit_rank", "recs_size",
        "personalised", "recs_age_ms", "ingested_at", *SOURCE_COLUMNS,
    ),
}  # fmt: skip

#: Columns holding personal identifiers: the writer replaces them with keyed pseudonyms
#: (sinks/pseudonym.py) before every insert, so raw user and card ids never reach ClickHouse.
PERSONAL_COLUMNS: dict[str, dict[str, IdKind]] = {
    "click_events": {"user_id": "user"},
    "fraud_scores": {"user_id": "user", "card_id": "card"},
    "fraud_label_events": {"user_id": "user"},
    "shipment_events": {"user_id": "user"},
    "shipments": {"user_id": "user"},
    "rec_predictions": {"user_id": "user"},
    "logistics_alerts": {"user_id": "user"},
}

#: The fact tables each input topic writes (they carry SOURCE_COLUMNS).
FACT_TABLES: dict[str, tuple[str, ...]] = {
    "clicks": ("click_events", "rec_predictions"),
    "payments": ("fraud_scores",),
    "fraud-labels": ("fraud_label_events",),
    "logistics": ("shipment_events", "shipment_predictions", "shipments"),
}


@dataclass
class _Pending:
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    count: int = 0
    first_added: float | None = None


class InsertObserver(Protocol):
    """Told about every insert (from the writer thread); the worker's metrics implement it."""

    def inserted(self, table: str, rows: int, seconds: float) -> None: ...

    def insert_failed(self, table: str, error: str) -> None: ...


class ClickHouseWriter:
    """Thread-backed batch writer. ``client_factory`` exists so unit tests can fake the driver."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_factory: Callable[[], Any] | None = None,
        max_buffered_rows: int | None = None,
        observer: InsertObserver | None = None,
    ) -> None:
        self._settings = settings
        self._pseudonymiser = Pseudonymiser.from_settings(settings)
        self._observer = observer
        self._client_factory = client_factory or (lambda: _connect(settings))
        self._flush_rows = settings.clickhouse_flush_rows
        self._flush_interval = settings.clickhouse_flush_interval_s
        self._max_buffered = max_buffered_rows or 20 * settings.clickhouse_flush_rows
        self._pending = _Pending()
        self._in_flight_rows = 0
        self._cond = threading.Condition()
        self._closing = False
        self._flush_requested = False
        self._flushed_generation = 0
        self._generation = 0
        self.rows_written = 0
        self.inserts = 0
        self.failures = 0
        self.last_error: str | None = None
        #: True from a failed insert until the retry succeeds (the health check reads it).
        self.retrying = False
        self._thread = threading.Thread(target=self._run, name="clickhouse-writer", daemon=True)
        self._thread.start()

    # -- producer side (event loop) --------------------------------------------------------
    def add(
        self,
        table: str,
        rows: Sequence[tuple[Any, ...]],
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``rows`` (tuples in TABLE_COLUMNS order) for ``table``; never blocks."""
        if table not in TABLE_COLUMNS:
            raise KeyError(f"unknown ClickHouse table {table!r}")
        with self._cond:
            if self._closing:
                raise RuntimeError("ClickHouseWriter is closed")
            if rows:
                self._pending.rows.setdefault(table, []).extend(rows)
                self._pending.count += len(rows)
                if self._pending.first_added is None:
                    self._pending.first_added = time.monotonic()
            if on_durable is not None:
                self._pending.callbacks.append(on_durable)
            if self._pending.count >= self._flush_rows:
                self._cond.notify_all()

    def add_callback(self, on_durable: Callable[[], None]) -> None:
        """Call ``on_durable`` once everything added so far is stored."""
        with self._cond:
            self._pending.callbacks.append(on_durable)
            if self._pending.first_added is None:
                self._pending.first_added = time.monotonic()

    @property
    def buffered_rows(self) -> int:
        with self._cond:
            return self._pending.count + self._in_flight_rows

    def has_capacity(self) -> bool:
        return self.buffered_rows < self._max_buffered

    def wait_for_capacity(self, timeout: float | None = None) -> bool:
        """Block (call it via ``asyncio.to_thread``) until the buffer is below its bound."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending.count + self._in_flight_rows >= self._max_buffered:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def flush(self, timeout: float = 60.0) -> bool:
        """Block until every row added before this call is stored; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._generation + 1
            self._flush_requested = True
            self._cond.notify_all()
            while self._flushed_generation < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is buffered and stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- writer thread ---------------------------------------------------------------------
    def _due(self) -> bool:
        pending = self._pending
        if self._flush_requested or self._closing:
            return True
        if pending.count >= self._flush_rows:
            return True
        return (
            pending.first_added is not None
            and time.monotonic() - pending.first_added >= self._flush_interval
        )

    def _run(self) -> None:
        client = None
        backoff = 0.2
        while True:
            with self._cond:
                while not self._due():
                    wait = self._flush_interval
                    if self._pending.first_added is not None:
                        wait = max(0.0, self._pending.first_added + wait - time.monotonic())
                    self._cond.wait(wait)
                if self._closing and not self._pending.rows and not self._pending.callbacks:
                    self._flushed_generation = self._generation + 1
                    self._cond.notify_all()
                    return
                batch, self._pending = self._pending, _Pending()
                self._in_flight_rows = batch.count
                self._flush_requested = False
                self._generation += 1
                generation = self._generation
            while True:
                current = next(iter(batch.rows), "")
                try:
                    if client is None:
                        client = self._client_factory()
                    # A table leaves the batch once stored, so a retry after a failure
                    # re-sends only what is not stored yet (no double counts).
                    for table in list(batch.rows):
                        current = table
                        rows = batch.rows[table]
                        started = time.perf_counter()
                        _insert_columnar(client, table, rows, self._pseudonymiser)
                        elapsed = time.perf_counter() - started
                        del batch.rows[table]
                        self.inserts += 1
                        self.rows_written += len(rows)
                        if self._observer is not None:
                            self._observer.inserted(table, len(rows), elapsed)
                    break
                except Exception as exc:  # retried forever: dropping rows is never an option
                    self.failures += 1
                    self.retrying = True
                    self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    if self._observer is not None:
                        self._observer.insert_failed(current, self.last_error)
                    log.warning(
                        "ClickHouse insert failed (retry in %.1fs): %s", backoff, self.last_error
                    )
                    if client is not None:
                        try:
                            client.disconnect()
                        except Exception:  # noqa: S110 - the connection is already broken
                            pass
                    client = None
                    time.sleep(backoff)
                    # Capped low: after an outage the first insert waits at most this long.
                    backoff = min(backoff * 2, 5.0)
            backoff = 0.2
            self.retrying = False
            for callback in batch.callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("ClickHouse durability callback failed")
            with self._cond:
                self._in_flight_rows = 0
                self._flushed_generation = generation
                self._cond.notify_all()


def clickhouse_client(
    settings: Settings, database: str | None = None, *, timeout_s: float = 60
) -> Client:
    """A native-protocol client for ``settings`` (the settings' database unless given)."""
    return Client(
        host=settings.clickhouse_host,
        port=settings.clickhouse_port,
        user=settings.clickhouse_user,
        password=settings.clickhouse_password.get_secret_value(),
        database=database or settings.clickhouse_database,
        connect_timeout=5,
        send_receive_timeout=timeout_s,
    )


def _connect(settings: Settings) -> Client:
    return clickhouse_client(settings)


def _insert_columnar(
    client: Any, table: str, rows: list[tuple[Any, ...]], pseudonymiser: Pseudonymiser
) -> None:
    columns = TABLE_COLUMNS[table]
    data = [list(column) for column in zip(*rows, strict=True)]
    for name, kind in PERSONAL_COLUMNS.get(table, {}).items():
        index = columns.index(name)
        pseudonym = pseudonymiser.pseudonym
        data[index] = [pseudonym(value, kind) for value in data[index]]
    client.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", data, columnar=True)
