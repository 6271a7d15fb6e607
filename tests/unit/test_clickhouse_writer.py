"""The buffered ClickHouse writer with a fake driver: columnar inserts, durability, retries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from schemas.config import Settings
from sinks.clickhouse import PERSONAL_COLUMNS, TABLE_COLUMNS, ClickHouseWriter
from sinks.pseudonym import Pseudonymiser

pytestmark = pytest.mark.timeout(20)

WAIT = 10.0  # upper bound for any single wait; a bug fails the test instead of hanging


class FakeClient:
    """Records ``execute`` calls; can be told to fail its next N calls or to block."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.disconnected = False

    def execute(self, query: str, data: Any = None, columnar: bool = False) -> None:
        log = self.log
        log.entered.set()
        log.gate.wait(WAIT)
        with log.lock:
            log.attempts += 1
            if log.attempts in log.fail_attempts:
                raise ConnectionError(f"lost during insert attempt {log.attempts}")
            if log.fail_next > 0:
                log.fail_next -= 1
                raise ConnectionError("ClickHouse went away\nsecond line")
            log.calls.append((query, data, columnar))

    def disconnect(self) -> None:
        self.disconnected = True


class FakeLog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any, bool]] = []
        self.attempts = 0
        self.fail_next = 0
        #: 1-based numbers of ``execute`` calls that fail.
        self.fail_attempts: set[int] = set()
        self.clients: list[FakeClient] = []
        #: Set when an insert starts; clear ``gate`` to hold inserts until it is set again.
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def factory(self) -> FakeClient:
        client = FakeClient(self)
        self.clients.append(client)
        return client

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Rows stored for ``table``, rebuilt from the columnar inserts."""
        rows: list[tuple[Any, ...]] = []
        for query, data, _ in self.calls:
            if query.startswith(f"INSERT INTO {table} "):
                rows.extend(zip(*data, strict=True))
        return rows


def settings(flush_rows: int = 1000, interval: float = 60.0) -> Settings:
    return Settings(clickhouse_flush_rows=flush_rows, clickhouse_flush_interval_s=interval)


@pytest.fixture
def fake() -> FakeLog:
    return FakeLog()


@pytest.fixture
def make_writer(fake: FakeLog) -> Iterator[Any]:
    writers: list[ClickHouseWriter] = []

    def make(**kwargs: Any) -> ClickHouseWriter:
        config = kwargs.pop("settings", settings())
        writer = ClickHouseWriter(config, client_factory=fake.factory, **kwargs)
        writers.append(writer)
        return writer

    yield make
    fake.gate.set()
    fake.fail_next = 0
    for writer in writers:
        if not writer._closing:
            writer.close(timeout=WAIT)


def label_row(i: int, user_id: str = "") -> tuple[Any, ...]:
    # No user id by default: an empty id is stored as it is, and the pseudonym tests below
    # cover the personal columns.
    return (
        f"l{i}",
        f"t{i}",
        user_id,
        "fraud",
        1_767_225_600 + i,
        1_767_225_600_000 + i,
        "bank",
        1,
        0,
        i + 1,
    )


def minute_row(i: int) -> tuple[Any, ...]:
    return (1_767_225_600 + 60 * i, "clicks", "view", "DE", i + 1, 0.5)


def test_rows_are_inserted_columnar_per_table_in_contract_order(
    fake: FakeLog, make_writer: Any
) -> None:
    writer = make_writer()
    writer.add("fraud_label_events", [label_row(0), label_row(1)])
    writer.add("events_per_minute", [minute_row(0)])
    writer.add("fraud_label_events", [label_row(2)])
    assert writer.flush(WAIT)

    by_table = {query.split()[2]: (query, data, columnar) for query, data, columnar in fake.calls}
    assert set(by_table) == {"fraud_label_events", "events_per_minute"}
    assert len(fake.calls) == 2  # one block per table
    query, data, columnar = by_table["fraud_label_events"]
    assert columnar is True
    columns = TABLE_COLUMNS["fraud_label_events"]
    assert query == f"INSERT INTO fraud_label_events ({', '.join(columns)}) VALUES"
    assert len(data) == len(columns)
    assert data[0] == ["l0", "l1", "l2"]  # event_id column, rows in the order added
    assert data[1] == ["t0", "t1", "t2"]
    assert data[5] == [1_767_225_600_000, 1_767_225_600_001, 1_767_225_600_002]
    assert fake.rows("events_per_minute") == [minute_row(0)]
    assert (writer.rows_written, writer.inserts) == (4, 2)


def test_unknown_table_is_refused_at_add() -> None:
    writer = ClickHouseWriter(settings(), client_factory=FakeLog().factory)
    try:
        with pytest.raises(KeyError, match="unknown ClickHouse table"):
            writer.add("no_such_table", [(1,)])
    finally:
        writer.close(WAIT)


def test_nothing_is_inserted_before_size_or_age_is_reached(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(settings=settings(flush_rows=100, interval=60.0))
    writer.add("fraud_label_events", [label_row(i) for i in range(10)])
    assert fake.calls == []
    assert writer.buffered_rows == 10
    assert writer.flush(WAIT)
    assert len(fake.rows("fraud_label_events")) == 10
    assert writer.buffered_rows == 0


def test_full_buffer_is_inserted_without_an_explicit_flush(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(settings=settings(flush_rows=5, interval=60.0))
    done = threading.Event()
    writer.add("fraud_label_events", [label_row(i) for i in range(5)], on_durable=done.set)
    assert done.wait(WAIT)
    assert len(fake.rows("fraud_label_events")) == 5


def test_old_rows_are_inserted_after_the_flush_interval(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(settings=settings(flush_rows=1000, interval=0.05))
    done = threading.Event()
    writer.add("fraud_label_events", [label_row(0)], on_durable=done.set)
    assert done.wait(WAIT)
    assert fake.rows("fraud_label_events") == [label_row(0)]


def test_flush_waits_for_everything_added_before_it(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(settings=settings(flush_rows=3, interval=60.0))
    for i in range(20):
        writer.add("fraud_label_events", [label_row(i)])
        writer.add("events_per_minute", [minute_row(i)])
    assert writer.flush(WAIT)
    assert fake.rows("fraud_label_events") == [label_row(i) for i in range(20)]
    assert fake.rows("events_per_minute") == [minute_row(i) for i in range(20)]


def test_flush_returns_false_when_clickhouse_stays_down(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer()
    fake.fail_next = 10**9
    writer.add("fraud_label_events", [label_row(0)])
    assert writer.flush(timeout=0.5) is False
    assert writer.failures >= 1
    assert writer.last_error == "ConnectionError: ClickHouse went away"  # first line only
    fake.fail_next = 0
    assert writer.flush(WAIT)
    assert fake.rows("fraud_label_events") == [label_row(0)]


def test_callbacks_run_only_after_the_rows_they_cover_are_stored(
    fake: FakeLog, make_writer: Any
) -> None:
    writer = make_writer()
    seen_at_callback: list[int] = []
    fired = threading.Event()

    def on_durable() -> None:
        seen_at_callback.append(len(fake.rows("fraud_label_events")))
        fired.set()

    fake.gate.clear()  # the insert will block until we open the gate
    writer.add("fraud_label_events", [label_row(0), label_row(1)], on_durable=on_durable)
    writer.add_callback(on_durable)
    flusher = threading.Thread(target=writer.flush, args=(WAIT,))
    flusher.start()
    assert fake.entered.wait(WAIT)  # the insert has started and is held at the gate
    assert not fired.is_set()
    assert seen_at_callback == []
    fake.gate.set()
    flusher.join(WAIT)
    assert fired.wait(WAIT)
    assert seen_at_callback == [2, 2]


def test_callback_without_rows_still_fires_on_its_own(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(settings=settings(interval=0.05))
    fired = threading.Event()
    writer.add_callback(fired.set)  # no flush: the age of the callback triggers it
    assert fired.wait(WAIT)
    assert fake.calls == []


def test_callback_for_later_rows_waits_for_them(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer()
    order: list[str] = []
    writer.add("fraud_label_events", [label_row(0)], on_durable=lambda: order.append("first"))
    assert writer.flush(WAIT)
    fake.fail_next = 2
    writer.add("fraud_label_events", [label_row(1)], on_durable=lambda: order.append("second"))
    assert order == ["first"]
    assert writer.flush(WAIT)
    assert order == ["first", "second"]
    assert fake.rows("fraud_label_events") == [label_row(0), label_row(1)]


def test_failing_insert_is_retried_and_no_row_is_lost_or_duplicated(
    fake: FakeLog, make_writer: Any
) -> None:
    writer = make_writer()
    fake.fail_next = 3
    durable = threading.Event()
    writer.add("fraud_label_events", [label_row(i) for i in range(50)], on_durable=durable.set)
    assert writer.flush(WAIT)
    assert durable.is_set()
    assert fake.rows("fraud_label_events") == [label_row(i) for i in range(50)]
    assert writer.failures == 3
    assert writer.rows_written == 50
    # A broken connection is dropped and a new one made.
    assert len(fake.clients) >= 2
    assert all(c.disconnected for c in fake.clients[:-1])


def test_failure_on_the_second_table_does_not_duplicate_the_first(
    fake: FakeLog, make_writer: Any
) -> None:
    writer = make_writer()
    writer.add("fraud_label_events", [label_row(0)])
    writer.add("events_per_minute", [minute_row(0)])
    fake.fail_attempts = {2}  # the first table goes in, the second fails once
    assert writer.flush(WAIT)
    assert fake.rows("events_per_minute") == [minute_row(0)]
    assert fake.rows("fraud_label_events") == [label_row(0)]


def test_rows_added_while_an_insert_is_retried_are_not_lost(
    fake: FakeLog, make_writer: Any
) -> None:
    writer = make_writer()
    fake.fail_next = 2
    writer.add("fraud_label_events", [label_row(0)])
    flusher = threading.Thread(target=writer.flush, args=(WAIT,))
    flusher.start()
    writer.add("fraud_label_events", [label_row(1)])
    flusher.join(WAIT)
    assert writer.flush(WAIT)
    assert sorted(fake.rows("fraud_label_events")) == [label_row(0), label_row(1)]


# -- backpressure -------------------------------------------------------------------------------


def test_capacity_is_bounded_and_freed_by_a_flush(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(max_buffered_rows=5)
    writer.add("fraud_label_events", [label_row(i) for i in range(4)])
    assert writer.has_capacity()
    assert writer.wait_for_capacity(timeout=0.01) is True
    writer.add("fraud_label_events", [label_row(4)])
    assert not writer.has_capacity()
    assert writer.wait_for_capacity(timeout=0.1) is False
    assert writer.flush(WAIT)
    assert writer.has_capacity()
    assert writer.wait_for_capacity(timeout=WAIT) is True


def test_rows_being_inserted_still_count_against_capacity(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(max_buffered_rows=5)
    fake.gate.clear()
    writer.add("fraud_label_events", [label_row(i) for i in range(5)])
    flusher = threading.Thread(target=writer.flush, args=(WAIT,))
    flusher.start()
    assert fake.entered.wait(WAIT)  # the batch left the buffer and is being inserted
    assert writer._pending.count == 0
    assert writer.buffered_rows == 5  # ...but still counts until it is stored
    assert not writer.has_capacity()
    assert writer.wait_for_capacity(timeout=0.05) is False

    released: list[bool] = []
    waiter = threading.Thread(target=lambda: released.append(writer.wait_for_capacity(WAIT)))
    waiter.start()
    fake.gate.set()
    waiter.join(WAIT)
    flusher.join(WAIT)
    assert released == [True]
    assert writer.buffered_rows == 0


def test_add_never_blocks_even_beyond_capacity(fake: FakeLog, make_writer: Any) -> None:
    writer = make_writer(max_buffered_rows=2)
    writer.add("fraud_label_events", [label_row(i) for i in range(10)])
    assert writer.buffered_rows == 10
    assert writer.flush(WAIT)
    assert len(fake.rows("fraud_label_events")) == 10


# -- pseudonyms ---------------------------------------------------------------------------------


def test_personal_ids_reach_clickhouse_only_as_keyed_pseudonyms(
    fake: FakeLog, make_writer: Any
) -> None:
    writer = make_writer()
    writer.add(
        "fraud_label_events", [label_row(0, "alice"), label_row(1, "bob"), label_row(2, "alice")]
    )
    assert writer.flush(WAIT)
    stored = [row[2] for row in fake.rows("fraud_label_events")]
    assert "alice" not in stored and "bob" not in stored
    assert stored[0] == stored[2] != stored[1]  # stable per user, so counts and joins hold
    pseudonyms = Pseudonymiser.from_settings(settings())
    assert stored[0] == pseudonyms.pseudonym("alice", "user")


def test_every_personal_column_is_a_column_of_its_table() -> None:
    for table, columns in PERSONAL_COLUMNS.items():
        assert set(columns) <= set(TABLE_COLUMNS[table]), table
    # Every table with a user or card id column is covered.
    for table, columns in TABLE_COLUMNS.items():
        for name in ("user_id", "card_id"):
            if name in columns:
                assert name in PERSONAL_COLUMNS.get(table, {}), (table, name)


# -- close --------------------------------------------------------------------------------------


def test_close_flushes_and_stops(fake: FakeLog) -> None:
    writer = ClickHouseWriter(settings(), client_factory=fake.factory)
    fired = threading.Event()
    writer.add("fraud_label_events", [label_row(0)], on_durable=fired.set)
    writer.close(timeout=WAIT)
    assert fired.is_set()
    assert fake.rows("fraud_label_events") == [label_row(0)]
    assert not writer._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add("fraud_label_events", [label_row(1)])
