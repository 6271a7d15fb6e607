"""Decoding raw message values: one object, arrays of objects, and everything malformed."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.decode import MAX_MESSAGE_BYTES, Rejected, decode_message
from schemas.events import ClickEvent, FraudLabelEvent, PaymentEvent

T0 = 1_767_225_600_000


def label(event_id: str = "l1", **overrides: object) -> dict[str, object]:
    value: dict[str, object] = {
        "event_id": event_id,
        "ts": T0,
        "user_id": "u1",
        "txn_id": f"t-{event_id}",
        "label": "fraud",
    }
    value.update(overrides)
    return value


def test_single_object_decodes_to_one_event() -> None:
    ok, bad = decode_message(FraudLabelEvent, orjson.dumps(label()))
    assert bad == []
    assert [(e.event_id, e.txn_id, e.ts) for e in ok] == [("l1", "t-l1", T0)]


def test_leading_whitespace_is_allowed() -> None:
    ok, bad = decode_message(FraudLabelEvent, b" \n\t" + orjson.dumps(label()))
    assert len(ok) == 1 and bad == []
    ok, bad = decode_message(FraudLabelEvent, b"  \n" + orjson.dumps([label()]))
    assert len(ok) == 1 and bad == []


def test_invalid_single_object_is_rejected_with_its_field_and_original_bytes() -> None:
    raw = orjson.dumps(label(label="maybe"))
    ok, bad = decode_message(FraudLabelEvent, raw)
    assert ok == []
    assert len(bad) == 1
    assert bad[0].payload == raw
    assert bad[0].index is None
    assert bad[0].error.startswith("label:")


def test_all_failing_fields_are_named() -> None:
    raw = orjson.dumps({"event_id": "", "user_id": "u"})
    [rejected] = decode_message(FraudLabelEvent, raw)[1]
    fields = {part.split(":")[0] for part in rejected.error.split("; ")}
    assert fields == {"event_id", "ts", "txn_id", "label"}


def test_array_keeps_good_elements_and_rejects_bad_ones_with_index_and_reason() -> None:
    items = [
        label("a"),
        label("b", ts="2026-01-01T00:00:00"),  # naive timestamp
        label("c"),
        label("d", txn_id=""),
        label("e"),
    ]
    ok, bad = decode_message(FraudLabelEvent, orjson.dumps(items))
    assert [e.event_id for e in ok] == ["a", "c", "e"]
    assert [r.index for r in bad] == [1, 3]
    assert bad[0].error.startswith("ts:") and "timezone" in bad[0].error
    assert bad[1].error.startswith("txn_id:")
    # Each rejection carries its own element, not the whole batch.
    assert orjson.loads(bad[0].payload) == items[1]
    assert orjson.loads(bad[1].payload) == items[3]


def test_array_elements_that_are_not_objects_are_rejected_one_by_one() -> None:
    items: list[object] = [1, "x", None, [label("nested")], label("ok"), True]
    ok, bad = decode_message(FraudLabelEvent, orjson.dumps(items))
    assert [e.event_id for e in ok] == ["ok"]
    assert [r.index for r in bad] == [0, 1, 2, 3, 5]
    assert all(r.error == "array element is not a JSON object" for r in bad)
    assert [orjson.loads(r.payload) for r in bad] == [1, "x", None, [label("nested")], True]


def test_empty_array_gives_nothing() -> None:
    assert decode_message(FraudLabelEvent, b"[]") == ([], [])


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1,", b'{"event_id": "x",}', b"not json", b"\xff\xfe", b"[\xff]", b"nul", b"   "],
)
def test_invalid_json_is_rejected_with_the_original_bytes(raw: bytes) -> None:
    ok, bad = decode_message(ClickEvent, raw)
    assert ok == []
    assert len(bad) == 1
    assert bad[0].payload == raw
    assert bad[0].index is None
    assert bad[0].error


@pytest.mark.parametrize("raw", [b"null", b"42", b'"text"', b"true"])
def test_json_that_is_not_an_object_is_rejected(raw: bytes) -> None:
    ok, bad = decode_message(ClickEvent, raw)
    assert (ok, [r.payload for r in bad]) == ([], [raw])


@pytest.mark.parametrize("raw", [b"", None])
def test_empty_value_is_rejected(raw: bytes | None) -> None:
    ok, bad = decode_message(ClickEvent, raw)
    assert ok == []
    assert bad == [Rejected("empty message value", b"")]


def test_oversized_value_is_rejected_before_parsing() -> None:
    # Valid JSON, but bigger than any legitimate event: refused on its size alone.
    padding = "x" * MAX_MESSAGE_BYTES
    raw = orjson.dumps([label(source=padding)])
    ok, bad = decode_message(FraudLabelEvent, raw)
    assert ok == []
    assert len(bad) == 1
    assert bad[0].payload == raw
    assert "exceeds" in bad[0].error and str(len(raw)) in bad[0].error


def test_value_at_the_size_limit_is_still_parsed() -> None:
    raw = orjson.dumps(label())
    raw = raw + b" " * (MAX_MESSAGE_BYTES - len(raw))
    assert len(raw) == MAX_MESSAGE_BYTES
    ok, bad = decode_message(FraudLabelEvent, raw)
    assert (len(ok), bad) == (1, [])


def test_error_text_is_bounded() -> None:
    items = {f"f{i}": i for i in range(50)}
    ok, bad = decode_message(PaymentEvent, orjson.dumps(items))
    assert ok == []
    assert len(bad[0].error) <= 400


def test_decoded_events_do_not_depend_on_array_batching() -> None:
    items = [label(str(i)) for i in range(5)]
    one_by_one = [decode_message(FraudLabelEvent, orjson.dumps(i))[0][0] for i in items]
    batched, _ = decode_message(FraudLabelEvent, orjson.dumps(items))
    assert batched == one_by_one


def test_deeply_nested_array_element_is_rejected_not_raised() -> None:
    raw = b'[{"a":' + b"[" * 300 + b"]" * 300 + b"}]"  # 613 bytes, valid JSON
    ok, bad = decode_message(FraudLabelEvent, raw)
    assert ok == []
    assert [r.index for r in bad] == [0]


# -- property: never raises ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _dumps(value: object) -> bytes:
    # The standard library writes what orjson refuses to (huge ints, Infinity), so the
    # decoder also sees JSON-ish text that only some parsers accept.
    return json.dumps(value).encode()


def _label_like() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "event_id": st.text(max_size=5),
            "ts": st.one_of(st.integers(), st.text(max_size=30), st.floats()),
            "user_id": st.text(max_size=5),
            "txn_id": st.text(max_size=5),
            "label": st.sampled_from(["fraud", "legit", "other"]),
        },
    )


raw_values = st.one_of(
    st.binary(max_size=300),
    json_values.map(_dumps),
    _label_like().map(_dumps),
    st.lists(st.one_of(_label_like(), json_values), max_size=5).map(_dumps),
    st.builds(lambda a, b: a + b, st.sampled_from([b"[", b"{", b" [", b"\n{"]), st.binary()),
)


def _json_array(raw: bytes) -> list[object] | None:
    try:
        value = json.loads(raw)  # what the decoder reads arrays with when orjson refuses
    except (ValueError, RecursionError):
        return None
    if len(raw) > MAX_MESSAGE_BYTES or raw.lstrip()[:1] != b"[":
        return None
    return value if isinstance(value, list) else None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_values)
def test_decode_never_raises_and_accounts_for_every_input(raw: bytes) -> None:
    ok, bad = decode_message(FraudLabelEvent, raw)
    assert all(isinstance(e, FraudLabelEvent) for e in ok)
    assert all(isinstance(r, Rejected) and r.error for r in bad)
    items = _json_array(raw)
    if items is not None:
        # A JSON array: every element ends up exactly once, as an event or a rejection.
        assert len(ok) + len(bad) == len(items)
        indexes = [r.index for r in bad]
        assert all(i is not None and 0 <= i < len(items) for i in indexes)
        assert indexes == sorted(set(indexes))  # type: ignore[type-var]
    else:
        # Anything else is one event or one rejection carrying the exact original bytes.
        assert len(ok) + len(bad) == 1
        for rejected in bad:
            assert rejected.payload == raw
            assert rejected.index is None


@pytest.mark.parametrize(
    "poison",
    [
        b'{"ts":NaN}',
        b'{"ts":1e400}',
        b'{"ts":-Infinity}',
        b'{"source":"x \\ud83d"}',
        b'{"ts":1' + b"0" * 400 + b"}",
    ],
)
def test_one_unparsable_number_or_surrogate_does_not_cost_its_neighbours(poison: bytes) -> None:
    first, last = orjson.dumps(label("ok")), orjson.dumps(label("ok2"))
    raw = b"[" + first + b"," + poison + b"," + last + b"]"
    ok, bad = decode_message(FraudLabelEvent, raw)
    assert [e.event_id for e in ok] == ["ok", "ok2"]
    assert [r.index for r in bad] == [1]
