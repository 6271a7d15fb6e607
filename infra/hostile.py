"""Hostile input for the four input topics: a seeded generator of malformed, odd and repeated
events, each labelled with what the pipeline must do with it.

The pipeline's promise for hostile input (issue 7, "Hostile input"): it never crashes, every
rejected event reaches ``deadletter`` with its reason and original bytes, and the valid events
mixed with the garbage give exactly the results they give alone. A test needs an oracle for
that, so nothing here asks the pipeline what it thinks: every hostile input is built to be
rejected for one known reason (or to be accepted, for the odd-but-valid ones), and carries
that label.

What it produces, per input topic (``clicks``, ``payments``, ``fraud-labels``,
``logistics``):

* **rejected elements** (:func:`HostileGenerator.reject_element`): a plausible event of the
  topic with one defect - a missing field, a wrong type, an empty or 129-character id,
  ``"NaN"``/``"inf"``/negative/``1e300``/``true`` amounts, timestamps before 2000 or after
  2100 or without a timezone, enum values off by a case or a zero-width space, countries and
  currencies that are not ``[A-Z]{2}``/``[A-Z]{3}`` (lower case, full-width letters, a
  trailing newline, an RTL override), strings over their bound (up to ~0.4 MB), array
  elements that are not objects. Each names the field its dead letter's error must start
  with.
* **rejected messages** (:func:`HostileGenerator.reject_message`): values that can only be
  wrong as a whole: invalid JSON (truncated, concatenated, single quotes, comments, a BOM),
  invalid UTF-8 (overlong forms, encoded surrogates, code points past U+10FFFF, stray
  continuation bytes), unescaped NUL/control characters, lone-surrogate escapes, ``NaN``/
  ``Infinity``/``1e400`` literals and 5,000-digit integers (valid in a single object, where
  the field is named, fatal to a whole array, whose parser refuses them), nesting bombs,
  JSON scalars, empty and null values, and values over the 1,000,000-byte limit (10 MiB
  strings).
* **odd but valid events** (:func:`odd_workload`): a valid workload (e.g. from
  ``infra.generator``) rewritten consistently across topics - ids with NUL, zero-width, RTL
  and astral characters, free text at its length bound, unknown but well-formed currencies
  (``XYZ``, ``VND``) and countries (``ZZ``, ``XK``), amounts of 5e-324 and 999,999,999.99,
  prices of 0. These must be *accepted*; they are part of the "valid events" whose results
  are compared.
* **equivalent encodings** of a valid event (:func:`equivalent_encodings`): ISO timestamps in
  odd time zones, digit strings, floats, numeric strings, unknown fields (up to 50 KB),
  duplicate keys whose last value wins, ``\\u`` escapes, surrounding whitespace. Each must
  decode to exactly the event its plain encoding gives.
* **duplicates**: an earlier valid event sent again with the same key (a redelivery, or a
  tracker retrying). Accepted, and must change nothing.

:meth:`HostileGenerator.mix` packs all of it around one batch of valid events: the valid events
keep their order (each alone or inside a JSON array with rejected elements, as web trackers
batch), hostile-only arrays carry most of the volume cheaply, and every :class:`Message`
lists the dead letters it must cause (:class:`Reject`: case, expected error text, the exact
payload bytes, array index) and the event ids it must yield. Same seed, same bytes.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol

import orjson

from models.fx import USD_PER_UNIT
from models.shipments import STATUSES
from schemas.decode import MAX_MESSAGE_BYTES
from schemas.events import CLICKS, FRAUD_LABELS, LOGISTICS, MAX_TS_MS, MIN_TS_MS, PAYMENTS

INPUT_TOPICS = (CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS)
#: Default size of the oversized string values (the issue's "10 MB strings").
HUGE_BYTES = 10 * 1024 * 1024

# -- the contract, restated as an oracle (docs/contracts.md), not read from the models ------------


@dataclass(frozen=True)
class Shape:
    """What the contract says about one input topic's fields."""

    required: tuple[str, ...]
    ids: tuple[str, ...]  # strings of 1-128 characters (required or optional)
    times: tuple[str, ...]  # epoch ms or ISO-8601 with a timezone, 2000..2100
    money: tuple[str, ...]  # numbers > 0 and < 1e9
    prices: tuple[str, ...]  # numbers >= 0 and < 1e9
    enums: Mapping[str, tuple[str, ...]]
    countries: tuple[str, ...]
    currencies: tuple[str, ...]
    texts: Mapping[str, int]  # bounded strings: name -> max length
    bools: tuple[str, ...] = ()


_BASE = ("event_id", "ts", "user_id")
SHAPES: dict[str, Shape] = {
    CLICKS: Shape(
        required=(*_BASE, "session_id", "type"),
        ids=("event_id", "user_id", "session_id", "item_id"),
        times=("ts",),
        money=(),
        prices=("price",),
        enums={"type": ("view", "search", "add_to_cart", "remove_from_cart", "purchase")},
        countries=("country", "origin_country"),
        currencies=("currency",),
        texts={"category": 256, "device": 256, "query": 1024, "lang": 16},
        bools=("personalisation",),
    ),
    PAYMENTS: Shape(
        required=(*_BASE, "card_id", "merchant_id", "amount", "currency"),
        ids=("event_id", "user_id", "card_id", "merchant_id", "device_id", "order_id"),
        times=("ts",),
        money=("amount",),
        prices=(),
        enums={},
        countries=("billing_country", "shipping_country", "ip_country", "origin_country"),
        currencies=("currency",),
        texts={},
    ),
    FRAUD_LABELS: Shape(
        required=(*_BASE, "txn_id", "label"),
        ids=("event_id", "user_id", "txn_id"),
        times=("ts",),
        money=(),
        prices=(),
        enums={"label": ("fraud", "legit")},
        countries=(),
        currencies=(),
        texts={"source": 256},
    ),
    LOGISTICS: Shape(
        required=(*_BASE, "order_id", "carrier", "origin_country", "dest_country", "status"),
        ids=("event_id", "user_id", "order_id", "carrier"),
        times=("ts", "promised_ts"),
        money=(),
        prices=(),
        enums={"status": STATUSES},
        countries=("origin_country", "dest_country"),
        currencies=(),
        texts={"location": 256},
    ),
}

T_REF = 1_767_225_600_000  # 2026-01-01T00:00:00Z: templates' time before any real event

#: A valid event per topic, for defects when no real event of the topic was seen yet.
TEMPLATES: dict[str, dict[str, Any]] = {
    CLICKS: {
        "event_id": "h-c",
        "ts": T_REF,
        "user_id": "h-user",
        "session_id": "h-s",
        "type": "view",
        "item_id": "h-i",
        "category": "shoes",
        "price": 10.0,
        "currency": "EUR",
        "country": "DE",
        "origin_country": "CN",
        "device": "ios",
        "query": "q",
        "lang": "de",
        "personalisation": True,
    },  # fmt: skip
    PAYMENTS: {
        "event_id": "h-p",
        "ts": T_REF,
        "user_id": "h-user",
        "card_id": "h-card",
        "merchant_id": "m1",
        "amount": 25.0,
        "currency": "EUR",
        "billing_country": "DE",
        "shipping_country": "DE",
        "ip_country": "DE",
        "device_id": "h-dev",
        "order_id": "h-o",
        "origin_country": "CN",
    },  # fmt: skip
    FRAUD_LABELS: {
        "event_id": "h-l",
        "ts": T_REF,
        "user_id": "h-user",
        "txn_id": "h-p",
        "label": "fraud",
        "source": "chargeback",
    },  # fmt: skip
    LOGISTICS: {
        "event_id": "h-s",
        "ts": T_REF,
        "user_id": "h-user",
        "order_id": "h-o",
        "carrier": "dhl",
        "origin_country": "CN",
        "dest_country": "DE",
        "status": "created",
        "promised_ts": T_REF + 86_400_000,
        "location": "Shenzhen, CN",
    },  # fmt: skip
}

# -- the values that must be refused, per kind of field -------------------------------------------

ZW = "\u200b"  # zero-width space
RLO = "\u202e"  # right-to-left override
BAD_IDS: tuple[Any, ...] = (
    "", "x" * 129, ZW * 129, "é" * 129, 123, 0, 1.5, True, False, ["a"], {"id": "a"},
)  # fmt: skip
BAD_TIMES: tuple[Any, ...] = (
    0, -1, MIN_TS_MS - 1, MAX_TS_MS, MAX_TS_MS * 1000, 2**63 - 1, -(2**63), 2**64 - 1,
    1e300, -1e300, 946_684_799_999.9, "0", "-1767225600000", "9" * 64, "9" * 65,
    "1970-01-01T00:00:00Z", "1999-12-31T23:59:59.999Z", "2100-01-01T00:00:00Z",
    "9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-14:00", "2026-01-01T00:00:00",
    "2026-01-01", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "yesterday", "", "NaN",
    "inf", "1767225600000 ", " 1767225600000", "1767225600000.5", "١٧٦٧٢٢٥٦٠٠٠٠٠",
    "2026-01-01T00:00:00Z" + ZW, RLO + "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z\u0000",
    True, False, [T_REF], {"ms": T_REF},
)  # fmt: skip
BAD_MONEY: tuple[Any, ...] = (
    "NaN", "nan", "-NaN", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-1e999", 0,
    0.0, -0.0, "-0.0", -1, -0.01, -1e-300, 1e9, 1e9 + 1, 1e300, 2**63, "1e9", "12abc", "",
    "0x10", "€5", "5" + ZW, True, False, [], [5.0], {"amount": 5.0},
)  # fmt: skip
BAD_PRICES: tuple[Any, ...] = (
    "NaN", "inf", "-inf", -0.01, -1, 1e9, 1e300, "cheap", "", True, False, [], {"v": 1},
)  # fmt: skip
BAD_COUNTRIES: tuple[Any, ...] = (
    "de", "De", "DEU", "D", "", " DE", "DE ", "DE\n", "D" + ZW + "E", RLO + "ED", "ＤＥ",
    "D3", "Ü", "ÄÖ", "\u0000\u0000", 49, True, ["DE"], {"c": "DE"},
)  # fmt: skip
BAD_CURRENCIES: tuple[Any, ...] = (
    "eur", "Eur", "EURO", "EU", "", "€", "EUR\n", "E" + ZW + "UR", "ＥＵＲ", "E1R", "$$$",
    978, True, ["EUR"],
)  # fmt: skip
#: Well-formed ISO 4217 codes (or look-alikes) the FX table lacks: a payment in one is rejected,
#: a priced click is kept (valued at USD 0).
UNRATED_CURRENCIES: tuple[str, ...] = tuple(
    code for code in ("XYZ", "VND", "XXX", "ZZZ", "IRR") if code not in USD_PER_UNIT
)
#: Every currency the FX table rates, for payments in less common currencies.
RATED_CURRENCIES: tuple[str, ...] = tuple(sorted(USD_PER_UNIT))
BAD_BOOLS: tuple[Any, ...] = ("maybe", "ja", "oui", 2, -1, 0.5, [], {}, "", None)

#: Relative frequency of each kind of defective element.
_KIND_WEIGHTS = {
    "not-object": 4, "missing": 12, "bad-id": 12, "bad-time": 16, "bad-amount": 12,
    "bad-enum": 8, "bad-country": 8, "bad-currency": 6, "bad-text": 8, "bad-bool": 4,
    "no-item": 4, "all-wrong": 2,
}  # fmt: skip


def _element_kinds(topic: str) -> tuple[tuple[str, bool], ...]:
    """The kinds of defect that apply to ``topic``, each with "also outside an array"."""
    shape = SHAPES[topic]
    applies = {
        "bad-amount": bool(shape.money or shape.prices),
        "bad-enum": bool(shape.enums),
        "bad-country": bool(shape.countries),
        "bad-currency": bool(shape.currencies),
        "bad-text": bool(shape.texts),
        "bad-bool": bool(shape.bools),
        "no-item": topic == CLICKS,
    }
    # Only an array element can be a non-object on its own (a whole message is a scalar).
    return tuple((kind, kind != "not-object") for kind in _KIND_WEIGHTS if applies.get(kind, True))


_ELEMENT_KINDS = {topic: _element_kinds(topic) for topic in SHAPES}


def _bad_enum_values(good: tuple[str, ...], rng: random.Random) -> list[Any]:
    word = rng.choice(good)
    return [
        word.upper(), word.capitalize(), f" {word}", f"{word} ", f"{word}\n", f"{word}\u0000",
        word[:1] + ZW + word[1:], RLO + word, word + "s", "", "unknown", 1, 0, True, None,
        [word], {"v": word},
    ]  # fmt: skip


def _too_long(limit: int, rng: random.Random) -> str:
    """A string one character over ``limit``, made of odd but valid characters."""
    alphabet = "aé漢𝄞" + ZW + RLO + "\u0000\u200fمرحبا"
    return "".join(rng.choice(alphabet) for _ in range(limit + 1))


# -- labels ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reject:
    """One dead letter the pipeline must write."""

    #: The hostile case, e.g. ``amount=str`` or ``msg:invalid-utf8`` (for reports).
    case: str
    #: Text the dead letter's ``error`` must contain (compared case-insensitively).
    expect: str
    #: The bytes the dead letter must carry in ``payload_b64`` (before its 600,000-byte cut):
    #: the whole value, or the array element re-encoded.
    payload: bytes
    #: Position in a JSON-array message; None for a whole message.
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message of the hostile stream, with what the pipeline must do with it."""

    topic: str  # contract topic name
    key: bytes | None
    value: bytes | None
    rejects: tuple[Reject, ...] = ()
    #: Event ids this message must yield as valid events, in order (duplicates included).
    accepted: tuple[str, ...] = ()
    #: How many of ``accepted`` repeat an event sent before.
    duplicates: int = 0

    @property
    def hostile_events(self) -> int:
        """Hostile events in this message: rejected inputs plus repeated events."""
        return len(self.rejects) + self.duplicates


class ValidEvent(Protocol):
    """A valid workload event: ``infra.generator.GeneratedEvent`` fits."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def value(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Event:
    """A valid event: contract topic, key (user id) and value."""

    topic: str
    key: str
    value: dict[str, Any]


def plain_bytes(event: ValidEvent) -> bytes:
    """The event as one JSON object: what a well-behaved producer sends."""
    return orjson.dumps(event.value)


# -- odd but valid workloads -----------------------------------------------------------------------

#: Suffixes that keep an id valid (<= 128 characters) but stress every layer that handles it:
#: NUL, zero-width and bidi controls, a BOM, combining marks, astral characters, Arabic text.
ODD_ID_SUFFIXES = (
    "\u0000", ZW, RLO, "\u200f", "\ufeff", "e\u0301", "𝄞", "\U0001f600", "مستخدم",
    "\u2028", "漢字", "\\", '"', "%s", "{0}", "'; DROP TABLE x; --", "..", "*",
)  # fmt: skip
ODD_TEXTS = ("Ｓｈｏｅｓ", "ملابس", RLO + "shoes", "sh" + ZW + "oes", "shoes\u0000", "\U0001f45f")
ID_FIELDS = frozenset(
    name for shape in SHAPES.values() for name in shape.ids if name not in {"carrier"}
) | {"txn_id"}


def odd_workload(events: Iterable[ValidEvent], seed: int = 0, share: float = 0.15) -> list[Event]:
    """``events`` rewritten into odd but valid ones, consistently across topics.

    About ``share`` of all ids (users, events, sessions, items, cards, orders, ...) get an odd
    suffix, the same one wherever the id appears (a payment's ``event_id`` and its label's
    ``txn_id`` stay equal); some free texts get odd Unicode at their length bound; some
    payments any currency of the FX table, priced clicks an unrated one, some countries ``ZZ`` or
    ``XK``; a few amounts are 5e-324 or 999,999,999.99 and a few prices 0. Deterministic in
    ``seed``; the keys follow the user ids.
    """
    rng = random.Random(seed)
    mapped: dict[str, str] = {}

    def odd_id(value: str) -> str:
        new = mapped.get(value)
        if new is None:
            draw = random.Random(f"{seed}:{value}")
            new = value
            if draw.random() < share:
                new = (value + draw.choice(ODD_ID_SUFFIXES))[:128]
            mapped[value] = new
        return new

    out = []
    for event in events:
        value = dict(event.value)
        for name in ID_FIELDS:
            if isinstance(value.get(name), str):
                value[name] = odd_id(value[name])
        topic = event.topic
        roll = rng.random()
        if topic == PAYMENTS:
            if roll < 0.04:
                value["currency"] = rng.choice(RATED_CURRENCIES)
            elif roll < 0.06:
                value["amount"] = rng.choice((5e-324, 1e-6, 999_999_999.99))
            for name in ("billing_country", "ip_country"):
                if rng.random() < 0.03:
                    value[name] = rng.choice(("ZZ", "XK", "AA", "QQ"))
        elif topic == CLICKS:
            if roll < 0.03 and value.get("price"):
                value["currency"] = rng.choice(UNRATED_CURRENCIES)
            elif roll < 0.04 and "price" in value:
                value["price"] = 0.0
            elif roll < 0.06 and value.get("country"):
                value["country"] = rng.choice(("ZZ", "XK"))
            elif roll < 0.09 and value.get("category"):
                value["category"] = rng.choice(ODD_TEXTS)
            elif roll < 0.10 and value.get("type") == "search":
                value["query"] = (rng.choice(ODD_TEXTS) * 200)[:1024]
        elif topic == LOGISTICS:
            if roll < 0.05 and value.get("location"):
                value["location"] = (value["location"] + " " + rng.choice(ODD_TEXTS) * 60)[:256]
        elif topic == FRAUD_LABELS and roll < 0.05:
            value["source"] = rng.choice(ODD_TEXTS)
        out.append(Event(topic, str(value.get("user_id", event.key)), value))
    return out


def _iso(ts_ms: int, offset_minutes: int) -> str:
    """``ts_ms`` as ISO-8601 in another time zone, to the exact millisecond."""
    zone = timezone(timedelta(minutes=offset_minutes))
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts_ms)
    return moment.astimezone(zone).isoformat(timespec="milliseconds")


def equivalent_values(value: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """``value`` written differently but meaning the same event (fits a JSON array)."""
    new = dict(value)
    choice = rng.randrange(6)
    if choice == 0 and isinstance(new.get("ts"), int):
        new["ts"] = _iso(new["ts"], rng.choice((-720, -570, 0, 330, 345, 525, 840)))
    elif choice == 1 and isinstance(new.get("ts"), int):
        new["ts"] = str(new["ts"])
    elif choice == 2 and isinstance(new.get("ts"), int):
        new["ts"] = float(new["ts"])
    elif choice == 3:
        for name in ("amount", "price"):
            if isinstance(new.get(name), float) and new[name] >= 1e-3:
                new[name] = repr(new[name])  # a numeric string: lax, but accepted
    elif choice == 4:
        new["x-trace"] = {"id": "t" * 40, "hops": [1, 2, {"deep": [[[]]]}], "rtl": RLO}
        new["unknown" + ZW] = None
        new["padding"] = "p" * rng.choice((10, 1000, 50_000))
    items = list(new.items())
    rng.shuffle(items)  # key order means nothing
    return dict(items)


def equivalent_encodings(value: Mapping[str, Any], rng: random.Random) -> bytes:
    """One JSON object, encoded oddly, that must decode to exactly the event ``value`` is."""
    choice = rng.randrange(5)
    if choice == 0:
        return b" \n\t" + orjson.dumps(equivalent_values(value, rng)) + b"\r\n "
    if choice == 1:  # every non-ASCII character as a \u escape (astral ones as pairs)
        return json.dumps(value, ensure_ascii=True).encode()
    if choice == 2:  # duplicate keys: the last one wins, in both parsers
        name = rng.choice(sorted(value))
        junk = orjson.dumps({name: rng.choice(("junk", None, -1, [1], {"x": 1}))})
        return junk[:-1] + b"," + orjson.dumps(value)[1:]
    if choice == 3:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2)
    return orjson.dumps(equivalent_values(value, rng))


# -- the generator ---------------------------------------------------------------------------------


@dataclass
class Mix:
    """Shares of a hostile batch (see :meth:`HostileGenerator.mix`)."""

    #: Valid events sent alone (the rest ride in arrays with rejected elements).
    single_valid: float = 0.5
    #: Valid events sent again later (duplicates), on ``duplicate_topics`` (None: all).
    duplicate: float = 0.1
    duplicate_topics: tuple[str, ...] | None = None
    #: Of the hostile-only messages: whole-message rejects and single-element rejects (the
    #: rest are arrays of rejected elements).
    whole_message: float = 0.35
    single_element: float = 0.35
    #: Largest hostile-only array.
    array_size: int = 400


@dataclass
class HostileGenerator:
    """A seeded source of labelled hostile messages (see the module docstring)."""

    seed: int = 0
    mix_shares: Mix = field(default_factory=Mix)
    #: Size of the oversized string values; 0 leaves them out.
    huge_bytes: int = HUGE_BYTES
    #: Recently sent valid events per topic: templates for defects, sources of duplicates.
    history_size: int = 200

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._history: dict[str, deque[Event]] = {
            t: deque(maxlen=self.history_size) for t in SHAPES
        }
        self._huge_left = {t: 1 for t in SHAPES}  # one 10 MiB value per topic and stream
        self._serial = 0

    # -- one hostile element (an object, or not) ---------------------------------------------------
    def _template(self, topic: str) -> dict[str, Any]:
        history = self._history[topic]
        if history and self.rng.random() < 0.8:
            return dict(self.rng.choice(history).value)
        return dict(TEMPLATES[topic])

    def reject_element(self, topic: str, *, in_array: bool = True) -> tuple[Any, str, str]:
        """A JSON value that must be rejected on its own: (value, case, expected error text).

        Values that are not objects, for arrays only (``in_array``): as a whole message they
        are :meth:`reject_message`'s. Strings of 100-400 kB only outside arrays (``in_array``
        False), so that arrays stay under the message size limit.
        """
        rng = self.rng
        shape = SHAPES[topic]
        value = self._template(topic)
        self._serial += 1
        value["event_id"] = f"bad-{topic[:3]}-{self._serial}"  # never a valid event's id
        if rng.random() < 0.2:  # odd but valid characters elsewhere change nothing
            value["user_id"] = (str(value.get("user_id", "u")) + rng.choice(ODD_ID_SUFFIXES))[:128]
        kinds = [k for k, outside in _ELEMENT_KINDS[topic] if outside or in_array]
        kind = rng.choices(kinds, weights=[_KIND_WEIGHTS[k] for k in kinds])[0]
        if kind == "not-object":
            return rng.choice([1, "x", None, [], True, 1.5, [value]]), kind, "JSON object"
        if kind == "missing":
            name = rng.choice(shape.required)
            del value[name]
            if topic == CLICKS and name == "type":
                value["item_id"] = value.get("item_id") or "i"
            return value, f"{name}=missing", f"{name}:"
        if kind == "bad-id":
            name = rng.choice(shape.ids)
            value[name] = rng.choice(BAD_IDS)
        elif kind == "bad-time":
            name = rng.choice(shape.times)
            value[name] = rng.choice(BAD_TIMES)
        elif kind == "bad-amount":
            name = rng.choice(shape.money + shape.prices)
            value[name] = rng.choice(BAD_MONEY if name in shape.money else BAD_PRICES)
        elif kind == "bad-enum":
            name = rng.choice(sorted(shape.enums))
            value[name] = rng.choice(_bad_enum_values(shape.enums[name], rng))
            if topic == CLICKS:
                value["item_id"] = value.get("item_id") or "i"
        elif kind == "bad-country":
            name = rng.choice(shape.countries)
            value[name] = rng.choice(BAD_COUNTRIES)
        elif kind == "bad-currency":
            name = rng.choice(shape.currencies)
            if topic == PAYMENTS and rng.random() < 0.3:
                # Well-formed but without a rate: a payment must be valued in USD.
                value[name] = rng.choice(UNRATED_CURRENCIES)
                return value, f"{name}=unrated", "not in the FX rates table"
            value[name] = rng.choice(BAD_CURRENCIES)
        elif kind == "bad-text":
            name = rng.choice(sorted(shape.texts))
            if not in_array and rng.random() < 0.05:  # 100-400 kB: still under the 1 MB limit
                value[name] = "x" * rng.randrange(100_000, 400_000)
            elif rng.random() < 0.5:
                value[name] = _too_long(shape.texts[name], rng)
            else:
                value[name] = rng.choice((12, True, ["x"], {"x": 1}))
        elif kind == "bad-bool":
            name = rng.choice(shape.bools)
            value[name] = rng.choice(BAD_BOOLS)
        elif kind == "no-item":
            value["type"] = rng.choice(("view", "add_to_cart", "remove_from_cart", "purchase"))
            value.pop("item_id", None)
            if rng.random() < 0.5:
                value["item_id"] = None
            return value, "item_id=missing-for-type", "item_id is required"
        else:  # everything wrong at once: the error names the first field in model order
            value = {"event_id": rng.choice(BAD_IDS), "ts": rng.choice(BAD_TIMES), "user_id": None}
            return value, "all-wrong", "event_id:"
        return value, f"{name}={kind}", f"{name}:"

    # -- one hostile message that is wrong as a whole ------------------------------------------
    def reject_message(self, topic: str) -> tuple[bytes | None, tuple[Reject, ...]]:
        """A message value that must be rejected as a whole (index None), but for one case:
        an array whose only element is too deeply nested to re-encode (index 0)."""
        rng = self.rng
        raw: bytes | None
        value = self._template(topic)
        self._serial += 1
        value["event_id"] = f"bad-{topic[:3]}-{self._serial}"
        plain = orjson.dumps(value)
        array = orjson.dumps([value, value])
        kind = rng.randrange(24)
        if self.huge_bytes and self._huge_left[topic] and rng.random() < 0.05:
            self._huge_left[topic] -= 1
            big = dict(
                value, **{rng.choice(("event_id", "user_id", "x")): "Ω" * (self.huge_bytes // 2)}
            )
            huge = orjson.dumps([big] if rng.random() < 0.5 else big)
            return huge, (Reject("msg:huge", "exceeds", huge),)
        case, expect = "", "Invalid JSON"
        if kind == 0:
            raw, case, expect = b"", "msg:empty", "empty message value"
        elif kind == 1:
            raw, case, expect = None, "msg:null-value", "empty message value"
        elif kind == 2:
            raw, case = rng.choice((b" ", b"\n\t ", b"\x00", b"\x00" * 64)), "msg:blank"
        elif kind == 3:
            raw, case = plain[: rng.randrange(1, len(plain) - 1)], "msg:truncated"
        elif kind == 4:
            raw, case = array[: rng.randrange(1, len(array) - 1)], "msg:truncated-array"
            expect = "invalid JSON array"
        elif kind == 5:
            raw = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 300)))
            raw, case = b"\xff" + raw, "msg:binary"
        elif kind == 6:
            raw = rng.choice((
                b"{this is not json", b"hello world", b"undefined", b"{'event_id': 'x'}",
                b'{"event_id": "x",}', b"// comment\n" + plain, b"<event/>", b"{}}", b"{{}",
                b'{"a" "b"}', b"True", b"None", b'{"event_id": x}', b"\xef\xbb\xbf" + plain,
            ))  # fmt: skip
            case = "msg:garbage"
        elif kind == 7:
            raw, case = plain + rng.choice((plain, b"{}", b"x", b"]", b",")), "msg:trailing"
        elif kind in (8, 9):  # invalid UTF-8 inside a string
            bad = rng.choice((
                b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xed\xa0\x80",
                b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xff", b"\xfe",
                b"\x80", b"\xbf\xbf", b"\xe2\x82", b"\xf0\x9f\x98",
            ))  # fmt: skip
            raw = plain.replace(b'"bad-', b'"' + bad + b"bad-", 1)
            case = "msg:invalid-utf8"
            if kind == 9:
                raw = b"[" + raw + b"]"
                case, expect = "msg:invalid-utf8-array", "invalid JSON array"
        elif kind in (10, 11):  # unescaped control characters inside a string
            raw = plain.replace(
                b'"bad-', b'"' + rng.choice((b"\x00", b"\x01", b"\n", b"\x1f")) + b"bad-", 1
            )
            case = "msg:raw-control-char"
            if kind == 11:
                raw = b"[" + raw + b"]"
                case, expect = "msg:raw-control-char-array", "invalid JSON array"
        elif kind in (12, 13):  # lone surrogate escapes: no Python str can hold them safely
            escape = rng.choice((b"\\ud800", b"\\udfff", b"\\udbff\\u0041", b"\\ud83d"))
            raw = plain.replace(b'"bad-', b'"' + escape + b"bad-", 1)
            case = "msg:lone-surrogate"
            if kind == 13:
                # In an array the element is rejected on its own (its dead letter carries the
                # whole message: the element has no UTF-8 form), and so is its neighbour.
                neighbour, neighbour_case, neighbour_expect = self.reject_element(topic)
                raw = b"[" + raw + b"," + orjson.dumps(neighbour) + b"]"
                return raw, (
                    Reject("msg:lone-surrogate-array", "lone surrogate", raw, 0),
                    Reject(neighbour_case, neighbour_expect, orjson.dumps(neighbour), 1),
                )
        elif kind in (14, 15):  # non-standard numbers: fine in one object, fatal to an array
            literal = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"))
            name = rng.choice(SHAPES[topic].money + SHAPES[topic].prices + ("ts",))
            value[name] = "__NUM__"
            raw = orjson.dumps(value).replace(b'"__NUM__"', literal)
            case, expect = f"msg:{name}={literal.decode()}", f"{name}:"
            if kind == 15:
                # In an array the element is read by the lenient parser and rejected on its
                # own; its dead letter carries it re-encoded (orjson writes NaN/inf as null).
                raw = b"[" + raw + b"]"
                element = orjson.dumps(json.loads(raw)[0])
                return raw, (Reject(f"{case}-array", expect, element, 0),)
        elif kind == 16:
            value["ts"] = "__NUM__"
            raw = orjson.dumps(value).replace(b'"__NUM__"', b"1" + b"7" * 5000)
            case = "msg:huge-integer"
            if rng.random() < 0.5:
                raw, expect = b"[" + raw + b"]", "invalid JSON array"
        elif kind == 17:
            depth = rng.choice((1100, 5000, 50_000))
            raw = b'{"event_id":"x","nested":' + b"[" * depth + b"]" * depth + b"}"
            case = "msg:nesting-bomb"
            if rng.random() < 0.5:
                raw, expect = b"[" * depth + b"]" * depth, "invalid JSON array"
        elif kind in (18, 19):
            raw = rng.choice((b"null", b"42", b"-0", b"1e400", b'"text"', b"true", b"false",
                              b'"' + plain.replace(b'"', b'\\"') + b'"'))  # fmt: skip
            case, expect = "msg:json-scalar", "event:"
        elif kind == 20:
            raw = rng.choice((b"[", b"[{", b"[1,", b"[]]", b"[,]", b"[{}]]", b"[" + plain + b",]"))
            case, expect = "msg:bad-array", "invalid JSON array"
        elif kind == 21:  # just over the size limit, without a 10 MiB allocation
            raw = orjson.dumps([value]) + b" " * MAX_MESSAGE_BYTES
            case, expect = "msg:over-limit", "exceeds"
        elif kind == 22 and rng.random() < 0.3:
            # Parsed (under 1,024 levels) but too deep to re-encode (254): the dead letter of
            # element 0 carries the whole message.
            raw = b'[{"event_id":"x","d":' + b"[" * 300 + b"]" * 300 + b"}]"
            return raw, (Reject("msg:deep-element", "ts:", raw, 0),)
        else:  # one defective object alone: named like an array element, whole message
            element, case, expect = self.reject_element(topic, in_array=False)
            raw = (b" " if rng.random() < 0.1 else b"") + orjson.dumps(element)
            case = "single:" + case
        return raw, (Reject(case, expect, raw or b""),)

    # -- mixing ---------------------------------------------------------------------------------
    def array(
        self,
        topic: str,
        key: bytes | None,
        carried: Sequence[tuple[Any, str, bool]],
        n_rejects: int,
    ) -> Message:
        """A JSON-array message: ``carried`` elements that must be accepted, as (value,
        event_id, is_duplicate) in order, with ``n_rejects`` rejected elements at random
        places between them."""
        rng = self.rng
        bad = [self.reject_element(topic) for _ in range(n_rejects)]
        total = len(carried) + len(bad)
        bad_at = set(rng.sample(range(total), len(bad)))
        elements: list[Any] = []
        rejects: list[Reject] = []
        accepted: list[str] = []
        duplicates = 0
        bad_iter, carried_iter = iter(bad), iter(carried)
        for position in range(total):
            if position in bad_at:
                value, case, expect = next(bad_iter)
                rejects.append(Reject(case, expect, orjson.dumps(value), position))
                elements.append(value)
            else:
                value, event_id, duplicate = next(carried_iter)
                elements.append(value)
                accepted.append(event_id)
                duplicates += duplicate
        raw = orjson.dumps(elements)
        if len(raw) > MAX_MESSAGE_BYTES:
            if carried:  # valid events must get through: fewer rejects around them
                return self.array(topic, key, carried, n_rejects // 2)
            return Message(topic, key, raw, (Reject("array:over-limit", "exceeds", raw),))
        return Message(topic, key, raw, tuple(rejects), tuple(accepted), duplicates)

    def mix(
        self,
        topic: str,
        valid: Sequence[ValidEvent],
        hostile: int,
        *,
        encode_valid: bool = True,
    ) -> list[Message]:
        """Messages carrying every event of ``valid`` (in order) and ``hostile`` hostile
        events of ``topic`` (rejects of every kind, duplicates of earlier valid events).

        A valid event goes alone or inside an array of rejected elements, keyed by its user;
        with ``encode_valid`` it is written in one of its equivalent odd encodings, otherwise
        plainly. A duplicate repeats a recent valid event with the original's key. The other
        hostile messages are inserted at random places, keyed by a known user, no key, or an
        odd key.
        """
        rng = self.rng
        shares = self.mix_shares
        history = self._history[topic]
        out: list[Message] = []
        budget = hostile
        duplicate_share = shares.duplicate
        if shares.duplicate_topics is not None and topic not in shares.duplicate_topics:
            duplicate_share = 0.0
        for event in valid:
            key = event.key.encode()
            value = event.value
            event_id = str(value["event_id"])
            if budget <= 0 or rng.random() < shares.single_valid:
                alone = equivalent_encodings(value, rng) if encode_valid else plain_bytes(event)
                out.append(Message(topic, key, alone, accepted=(event_id,)))
            else:
                n = min(budget, rng.randrange(1, 20))
                budget -= n
                element = equivalent_values(value, rng) if encode_valid else dict(value)
                out.append(self.array(topic, key, [(element, event_id, False)], n))
            history.append(Event(topic, event.key, dict(value)))
            if budget > 0 and rng.random() < duplicate_share:
                original = rng.choice(list(history)[-50:])
                original_id = str(original.value["event_id"])
                okey = original.key.encode()
                budget -= 1
                if rng.random() < 0.5:  # a retry of the same bytes
                    again = plain_bytes(original)
                    out.append(Message(topic, okey, again, accepted=(original_id,), duplicates=1))
                else:  # a tracker batch that repeats it
                    n = min(budget, rng.randrange(0, 10))
                    budget -= n
                    out.append(self.array(topic, okey, [(original.value, original_id, True)], n))
        hostile_only: list[Message] = []
        while budget > 0:
            roll = rng.random()
            odd_key = self._hostile_key(topic)
            if roll < shares.whole_message:
                raw_value, rejects = self.reject_message(topic)
                hostile_only.append(Message(topic, odd_key, raw_value, rejects=rejects))
                budget -= len(rejects)
            elif roll < shares.whole_message + shares.single_element:
                value, case, expect = self.reject_element(topic, in_array=False)
                single = orjson.dumps(value)
                reject = Reject(case, expect, single)
                hostile_only.append(Message(topic, odd_key, single, (reject,)))
                budget -= 1
            else:
                n = min(budget, rng.randrange(1, shares.array_size + 1))
                budget -= n
                hostile_only.append(self.array(topic, odd_key, [], n))
        for message in hostile_only:
            out.insert(rng.randrange(len(out) + 1), message)
        return out

    def _hostile_key(self, topic: str) -> bytes | None:
        roll = self.rng.random()
        history = self._history[topic]
        if roll < 0.7 and history:
            return self.rng.choice(history).key.encode()
        if roll < 0.85:
            return None
        return self.rng.choice((b"", b"\xff\xfe\x00", "ключ\u202e".encode(), b"k" * 300))


def partition_for(key: bytes | None, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``; 0 for no key
    (the harness's choice; a real producer spreads keyless messages)."""
    if key is None:
        return 0
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def stream_stats(messages: Iterable[Message]) -> dict[str, int]:
    """Counts of a hostile stream: messages, hostile events, rejects, valid, duplicates."""
    stats = {"messages": 0, "hostile_events": 0, "rejects": 0, "accepted": 0, "duplicates": 0}
    for message in messages:
        stats["messages"] += 1
        stats["hostile_events"] += message.hostile_events
        stats["rejects"] += len(message.rejects)
        stats["accepted"] += len(message.accepted)
        stats["duplicates"] += message.duplicates
    return stats


def iter_rejects(messages: Iterable[Message]) -> Iterator[tuple[Message, Reject]]:
    for message in messages:
        for reject in message.rejects:
            yield message, reject
