"""Decoding of raw Kafka message values into contract events.

A message value is either one JSON object or a JSON array of objects (web trackers send
batched payloads). Each object is validated on its own: one bad element is rejected with its
reason and position while its neighbours are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

#: Larger values are rejected before parsing: no legitimate event is this big.
MAX_MESSAGE_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input that failed to decode or validate, with the reason and the original bytes."""

    error: str
    payload: bytes
    index: int | None = None


def describe_validation_error(error: ValidationError, limit: int = 400) -> str:
    """One readable line: ``field: message; other.field: message``."""
    parts = []
    for detail in error.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in detail["loc"]) or "event"
        parts.append(f"{where}: {detail['msg']}")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_message(model: type[M], raw: bytes | None) -> tuple[list[M], list[Rejected]]:
    """Decode one message value into valid events and rejected inputs.

    >>> from schemas.events import FraudLabelEvent
    >>> ok, bad = decode_message(FraudLabelEvent, b'[{"event_id":"l1","ts":1767225600000,'
    ...     b'"user_id":"u","txn_id":"t","label":"fraud"},{"event_id":"l2"}]')
    >>> [e.txn_id for e in ok], [(r.index, r.error.split(":")[0]) for r in bad]
    (['t'], [(1, 'ts')])
    """
    if raw is None or not raw:
        return [], [Rejected("empty message value", raw or b"")]
    if len(raw) > MAX_MESSAGE_BYTES:
        return [], [Rejected(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}", raw)]
    if raw.lstrip()[:1] != b"[":
        try:
            return [model.model_validate_json(raw)], []
        except ValidationError as exc:
            return [], [Rejected(describe_validation_error(exc), raw)]
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN/Infinity, numbers beyond a double and lone-surrogate escapes
        # anywhere in the array; the standard library reads them, so that one such element
        # is rejected on its own instead of taking its valid neighbours along.
        items = _lenient_array(raw)
        if items is None:
            return [], [Rejected(f"invalid JSON array: {exc}", raw)]
    events: list[M] = []
    rejected: list[Rejected] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            rejected.append(
                Rejected("array element is not a JSON object", _element_bytes(item, raw), index)
            )
            continue
        if not _encodable(item):
            rejected.append(
                Rejected("array element has a lone surrogate escape (not UTF-8)", raw, index)
            )
            continue
        try:
            events.append(model.model_validate(item))
        except ValidationError as exc:
            rejected.append(
                Rejected(describe_validation_error(exc), _element_bytes(item, raw), index)
            )
    return events, rejected


def _element_bytes(item: object, message: bytes) -> bytes:
    """The element re-encoded; the whole message when it cannot be (orjson nests only 254
    levels deep when encoding but parses 1024)."""
    try:
        return orjson.dumps(item)
    except (TypeError, orjson.JSONEncodeError):
        return message


def _lenient_array(raw: bytes) -> list[object] | None:
    """``raw`` parsed by the standard library, if it is a JSON array there; else None."""
    try:
        # Strict UTF-8 first: bytes that are not UTF-8 make the whole message invalid JSON
        # (json.loads on bytes would let encoded surrogates through as text).
        items = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, 4,300+ digit ints
        return None
    return items if isinstance(items, list) else None


def _encodable(value: object) -> bool:
    """False when a string in ``value`` holds a lone surrogate (no UTF-8 form)."""
    try:
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, dict):
            return all(_encodable(k) and _encodable(v) for k, v in value.items())
        elif isinstance(value, list):
            return all(_encodable(v) for v in value)
    except (UnicodeEncodeError, RecursionError):
        return False
    return True
