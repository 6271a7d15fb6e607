"""Decoding of raw Kafka message values into contract events.

A message value is either one JSON object or a JSON array of objects (web trackers send
batched payloads). Each object is validated on its own: one bad element is rejected with its
reason and position while its neighbours are kept.
"""

from __future__ import annotations

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
        return [], [Rejected(f"invalid JSON array: {exc}", raw)]
    events: list[M] = []
    rejected: list[Rejected] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            rejected.append(
                Rejected("array element is not a JSON object", _element_bytes(item, raw), index)
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
