"""Replay parsing (JSONL envelopes, CSV), pacing, and the producer's failure reporting."""

from __future__ import annotations

import csv
import io
import socket
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from infra.generator import GenerationStats, GeneratorConfig, generate_to_list, write_jsonl
from infra.replay import (
    EventTimePacer,
    Record,
    TokenBucket,
    count_records,
    csv_row_value,
    pacing_offsets,
    parse_csv,
    parse_jsonl_line,
    read_records,
    replay_command,
)
from schemas.config import Settings
from schemas.errors import BorderflowError
from sinks.kafka import EventProducer, ensure_topics

TS = 1_767_225_600_000


# -- JSONL ------------------------------------------------------------------------------------


def test_envelope_keeps_value_ts_and_key() -> None:
    line = orjson.dumps({"topic": "payments", "key": "k9", "value": {"ts": TS, "user_id": "u1"}})
    record = parse_jsonl_line(line + b"\n", None, "f:1")
    assert record == Record("payments", "k9", orjson.dumps({"ts": TS, "user_id": "u1"}), TS)


def test_envelope_without_key_uses_user_id_and_iso_ts_is_read() -> None:
    value = {"ts": "2026-01-01T01:00:00+01:00", "user_id": "u7", "type": "view"}
    record = parse_jsonl_line(orjson.dumps({"topic": "clicks", "value": value}), None, "f:1")
    assert record is not None
    assert (record.key, record.ts) == ("u7", TS)
    assert orjson.loads(record.value)["ts"] == value["ts"]  # the value itself is untouched


def test_invalid_events_still_become_records() -> None:
    """Replay does not validate: the worker dead-letters what is wrong."""
    record = parse_jsonl_line(b'{"topic":"clicks","value":{"type":"nope"}}', None, "f:1")
    assert record == Record("clicks", None, b'{"type":"nope"}', None)
    raw = parse_jsonl_line(b"this is not json", "clicks", "f:2")
    assert raw == Record("clicks", None, b"this is not json", None)
    batch = parse_jsonl_line(b'{"topic":"clicks","key":"u1","value":[{"a":1}]}', None, "f:3")
    assert batch == Record("clicks", "u1", b'[{"a":1}]', None)


def test_bare_events_need_topic() -> None:
    line = b'{"event_id":"e","ts":1767225600000,"user_id":"u2"}'
    assert parse_jsonl_line(line, "logistics", "f:1") == Record("logistics", "u2", line, TS)
    with pytest.raises(BorderflowError, match="f:1: not an envelope"):
        parse_jsonl_line(line, None, "f:1")
    with pytest.raises(BorderflowError, match="f:4: not JSON"):
        parse_jsonl_line(b"{broken", None, "f:4")


def test_unknown_topic_is_a_readable_error() -> None:
    with pytest.raises(BorderflowError, match=r"^f:3: unknown topic 'click' \(expected one of"):
        parse_jsonl_line(b'{"topic":"click","value":{}}', None, "f:3")
    assert parse_jsonl_line(b"   \n", None, "f:5") is None


def test_generated_jsonl_round_trips(tmp_path: Path) -> None:
    events = generate_to_list(GeneratorConfig(users=20, days=2, seed=3))
    path = tmp_path / "g.jsonl"
    with path.open("wb") as handle:
        write_jsonl(iter(events), handle, GenerationStats())
    records = list(read_records([path], None))
    assert records == [Record(e.topic, e.key, orjson.dumps(e.value), e.ts) for e in events]
    assert count_records([path]) == len(events)


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=10,
)


@given(st.binary(max_size=200))
def test_any_line_is_sent_or_refused_readably(line: bytes) -> None:
    try:
        record = parse_jsonl_line(line, "clicks", "f:1")
    except BorderflowError:
        return  # an envelope naming an unknown topic
    assert record is None or record.topic in {"clicks", "payments", "fraud-labels", "logistics"}


@given(st.dictionaries(text, json_values, max_size=6), st.one_of(st.none(), text))
def test_envelope_values_round_trip(value: dict, key: str | None) -> None:
    line = orjson.dumps({"topic": "payments", "key": key, "value": value})
    record = parse_jsonl_line(line, None, "f:1")
    assert record is not None and orjson.loads(record.value) == value


# -- CSV --------------------------------------------------------------------------------------


def test_csv_row_value_drops_empty_cells_and_converts_numbers() -> None:
    row = {
        "topic": "payments",
        "ts": "1767225600000",
        "amount": "12.50",
        "price": "abc",
        "event_id": "007",
        "device_id": "",
        None: ["surplus"],
        "order_id": None,
    }
    assert csv_row_value(row) == {"ts": TS, "amount": 12.5, "price": "abc", "event_id": "007"}
    assert csv_row_value({"ts": "2026-01-01T00:00:00Z"}) == {"ts": "2026-01-01T00:00:00Z"}


def test_csv_with_topic_column() -> None:
    lines = [
        "topic,event_id,ts,user_id,txn_id,label\n",
        "fraud-labels,l1,1767225600000,u1,t1,fraud\n",
        "clicks,c1,1767225600001,u2,,\n",
    ]
    records = list(parse_csv(lines, None, "x.csv"))
    assert [(r.topic, r.key, r.ts) for r in records] == [
        ("fraud-labels", "u1", TS),
        ("clicks", "u2", TS + 1),
    ]
    assert orjson.loads(records[1].value) == {"event_id": "c1", "ts": TS + 1, "user_id": "u2"}


def test_csv_with_topic_option_and_semicolons() -> None:
    lines = ["session_id;user_id;item_id;ts\n", "s1;u5;i9;1767225600000\n"]
    (record,) = parse_csv(lines, "clicks", "d.csv")
    assert record.topic == "clicks" and record.key == "u5"
    assert orjson.loads(record.value) == {
        "session_id": "s1",
        "user_id": "u5",
        "item_id": "i9",
        "ts": TS,
    }


def test_csv_errors_name_file_and_line() -> None:
    with pytest.raises(BorderflowError, match="no 'topic' column"):
        list(parse_csv(["a,b\n", "1,2\n"], None, "n.csv"))
    lines = ["topic,user_id\n", "clicks,u1\n", "payment,u1\n"]
    with pytest.raises(BorderflowError, match=r"^b.csv:3: unknown topic 'payment'"):
        list(parse_csv(lines, None, "b.csv"))
    with pytest.raises(BorderflowError, match=r"^e.csv:2: no topic"):
        list(parse_csv(["topic,user_id\n", ",u1\n"], None, "e.csv"))


cell = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=12)


@given(
    st.lists(
        st.fixed_dictionaries({"user_id": cell, "ts": cell, "amount": cell, "q": cell}),
        min_size=1,
        max_size=5,
    )
)
def test_csv_rows_round_trip_through_the_csv_module(rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["user_id", "ts", "amount", "q"])
    writer.writeheader()
    writer.writerows(rows)
    records = list(parse_csv(buffer.getvalue().splitlines(keepends=True), "clicks", "h.csv"))
    assert [orjson.loads(r.value) for r in records] == [
        orjson.loads(orjson.dumps(csv_row_value({**row}))) for row in rows
    ]


def test_read_records_handles_bom_and_file_types(tmp_path: Path) -> None:
    csv_path = tmp_path / "rows.csv"
    csv_path.write_bytes("\ufefftopic,user_id,amount\npayments,u1,3\n".encode())
    jsonl_path = tmp_path / "rows.jsonl"
    jsonl_path.write_bytes(b'{"topic":"payments","value":{"user_id":"u2"}}\n\n')
    records = list(read_records([csv_path, jsonl_path], None))
    assert [(r.topic, r.key) for r in records] == [("payments", "u1"), ("payments", "u2")]
    assert orjson.loads(records[0].value) == {"user_id": "u1", "amount": 3.0}
    assert count_records([csv_path, jsonl_path]) == 3  # an upper bound: blank lines count
    with pytest.raises(BorderflowError, match="cannot read"):
        list(read_records([tmp_path / "missing.jsonl"], None))


# -- pacing -----------------------------------------------------------------------------------


def test_pacing_offsets_follow_event_time() -> None:
    assert pacing_offsets([TS, TS + 1000, TS + 4000], speed=1.0) == [0.0, 1.0, 4.0]
    assert pacing_offsets([TS, TS + 60_000], speed=60.0) == [0.0, 1.0]
    # Late and ts-less events go out at once; the clock never runs backwards.
    assert pacing_offsets([None, TS, TS + 2000, TS + 1000, None, TS + 3000], 2.0) == [
        0.0, 0.0, 1.0, 1.0, 1.0, 1.5,
    ]  # fmt: skip


def test_event_time_pacer_delay_uses_the_wall_clock() -> None:
    pacer = EventTimePacer(speed=10.0)
    assert pacer.delay(TS, now=100.0) == 0.0
    assert pacer.delay(TS + 5_000, now=100.1) == pytest.approx(0.4)
    assert pacer.delay(TS + 6_000, now=105.0) == 0.0  # running behind: no wait
    with pytest.raises(ValueError):
        EventTimePacer(0)


def test_token_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(rate=100.0, burst=5)
    now, sent = 0.0, 0
    while now < 10.0:
        now += bucket.delay(now)  # the caller waits exactly as told
        sent += 1
    assert 1000 <= sent <= 1000 + 5 + 1


def test_token_bucket_debt_is_repaid_by_later_waits() -> None:
    """Skipped short waits are not lost: the next wait covers them."""
    bucket = TokenBucket(rate=1000.0, burst=1)
    waits = [bucket.delay(0.0) for _ in range(11)]
    assert waits[0] == 0.0
    assert waits[-1] == pytest.approx(0.010)


def test_token_bucket_refills_after_idle_time_up_to_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    for _ in range(3):
        assert bucket.delay(0.0) == 0.0
    assert bucket.delay(0.0) == pytest.approx(0.1)
    assert bucket.delay(100.0) == 0.0  # refilled, but only to the burst size
    assert bucket.delay(100.0) == 0.0 and bucket.delay(100.0) == 0.0
    assert bucket.delay(100.0) > 0


# -- command errors (no broker needed: they are raised before any connection) ----------------


def test_replay_command_errors_are_borderflow_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(replay_command, [str(tmp_path / "nope.jsonl")], obj=Settings())
    assert isinstance(result.exception, BorderflowError)
    assert str(result.exception) == f"no such file: {tmp_path / 'nope.jsonl'}"
    existing = tmp_path / "a.jsonl"
    existing.write_bytes(b"")
    result = runner.invoke(replay_command, [str(existing), "--topic", "alerts"], obj=Settings())
    assert isinstance(result.exception, BorderflowError) and "unknown topic" in str(
        result.exception
    )
    result = runner.invoke(
        replay_command, [str(existing), "--rate", "5", "--speed", "2"], obj=Settings()
    )
    assert isinstance(result.exception, BorderflowError)


# -- producer failures without a broker ----------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_broker_is_one_readable_error() -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{closed_port()}")
    with pytest.raises(BorderflowError, match="cannot reach Kafka"):
        ensure_topics(settings, ["clicks"], timeout_s=1.0)
    producer = EventProducer(settings, extra_config={"message.timeout.ms": 500, "log_level": 0})
    producer.send("clicks", "u1", b"{}", TS)
    with pytest.raises(BorderflowError, match="1 messages could not be delivered"):
        producer.flush(5.0)
    producer.flush(1.0)  # reported once
