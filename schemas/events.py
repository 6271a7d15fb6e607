"""The public event contract: the four input topics and the two output topics.

Inbound models are tolerant readers (unknown fields are ignored) but strict about what they
use: bounded strings, finite amounts, timezone-aware timestamps. Every timestamp is carried
as **epoch milliseconds (UTC)** inside borderflow; on the wire ``ts`` may be ISO-8601 with a
timezone or epoch milliseconds.

>>> ClickEvent.model_validate_json(
...     b'{"event_id":"e1","ts":"2026-01-01T00:00:00Z","user_id":"u1","session_id":"s1",'
...     b'"type":"view","item_id":"i9"}'
... ).ts
1767225600000
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

# Contract topic names (fixed). streams/topics.py binds them to Faust topics.
CLICKS = "clicks"
PAYMENTS = "payments"
FRAUD_LABELS = "fraud-labels"
LOGISTICS = "logistics"
FRAUD_ALERTS = "fraud-alerts"
LOGISTICS_ALERTS = "logistics-alerts"
DEADLETTER = "deadletter"
#: Control topic of ``borderflow forget``: keyed by user_id like the inputs (docs/privacy.md).
PRIVACY_REQUESTS = "privacy-requests"
#: Every topic of the contract: the four inputs, the outputs, then the control topic.
ALL_TOPICS = (
    CLICKS, PAYMENTS, FRAUD_LABELS, LOGISTICS, FRAUD_ALERTS, LOGISTICS_ALERTS, DEADLETTER,
    PRIVACY_REQUESTS,
)  # fmt: skip

#: Accepted event-time range: anything outside is a producer bug, not an event.
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z


def to_epoch_ms(value: Any) -> int:
    """Parse an event timestamp: epoch milliseconds or ISO-8601 *with* a timezone.

    >>> to_epoch_ms("2026-01-01T01:00:00+01:00")
    1767225600000
    >>> to_epoch_ms(1767225600000)
    1767225600000
    """
    if isinstance(value, bool):
        raise ValueError("timestamp must be epoch milliseconds or ISO-8601, not a boolean")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("timestamp must be finite")
        ms = int(value)
    elif isinstance(value, str):
        if len(value) > 64:
            raise ValueError("timestamp string too long")
        if value.isascii() and value.isdigit():
            ms = int(value)
        elif not (value.isascii() and value.isprintable()):
            # ISO-8601 is printable ASCII; CPython's parser would also stop at a NUL and
            # accept '2026-01-01T00:00:00\x00+05:00' as 05:00 local time.
            raise ValueError(f"timestamp {value[:40]!r} is not ISO-8601")
        else:
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"timestamp {value[:40]!r} is not ISO-8601") from None
            if parsed.tzinfo is None:
                raise ValueError("ISO-8601 timestamp needs a timezone (e.g. 'Z' or '+00:00')")
            ms = round(parsed.timestamp() * 1000)
    else:
        raise ValueError("timestamp must be epoch milliseconds or an ISO-8601 string")
    if not MIN_TS_MS <= ms < MAX_TS_MS:
        raise ValueError(f"timestamp {ms} ms is outside 2000-01-01..2100-01-01")
    return ms


def not_boolean(value: Any) -> Any:
    """Refuse JSON ``true``/``false`` where a number is due (lax mode reads them as 1 and 0).

    >>> not_boolean(2.5)
    2.5
    """
    if isinstance(value, bool):
        raise ValueError("a number is required, not a boolean")
    return value


EpochMs = Annotated[int, BeforeValidator(to_epoch_ms)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
Money = Annotated[float, BeforeValidator(not_boolean), Field(gt=0, lt=1e9, allow_inf_nan=False)]
Price = Annotated[float, BeforeValidator(not_boolean), Field(ge=0, lt=1e9, allow_inf_nan=False)]


class InboundEvent(BaseModel):
    """Base of every input event: frozen, tolerant of unknown fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = SCHEMA_VERSION
    event_id: Id
    ts: EpochMs
    user_id: Id


ClickType = Literal["view", "search", "add_to_cart", "remove_from_cart", "purchase"]


class ClickEvent(InboundEvent):
    """Topic ``clicks``: one storefront interaction."""

    session_id: Id
    type: ClickType
    item_id: Id | None = None
    category: ShortText | None = None
    price: Price | None = None
    currency: Currency | None = None
    country: Country | None = None
    #: Where the item ships from (its seller's country): drives logistics-aware ranking.
    origin_country: Country | None = None
    device: ShortText | None = None
    query: Annotated[str, StringConstraints(max_length=1024)] | None = None
    lang: Annotated[str, StringConstraints(max_length=16)] | None = None
    #: False when the user or market forbids profile-based personalisation.
    personalisation: bool = True

    @model_validator(mode="after")
    def _item_required(self) -> ClickEvent:
        if self.type != "search" and self.item_id is None:
            raise ValueError(f"item_id is required for a {self.type!r} click")
        return self


class PaymentEvent(InboundEvent):
    """Topic ``payments``: one card authorisation; ``event_id`` is the transaction id."""

    card_id: Id
    merchant_id: Id
    amount: Money
    currency: Currency
    billing_country: Country | None = None
    shipping_country: Country | None = None
    ip_country: Country | None = None
    device_id: Id | None = None
    order_id: Id | None = None
    #: Where the order ships from (the merchant's country): with ``shipping_country`` it names
    #: the payment's cross-border corridor in the analytics tables.
    origin_country: Country | None = None

    @field_validator("currency")
    @classmethod
    def _currency_has_a_rate(cls, currency: str) -> str:
        # A payment must be valued in USD (fraud features, revenue); valuing an unknown
        # currency at face value would make 2.5M VND (about 100 USD) a 2.5M USD payment.
        # Dead-lettered instead: loud, and replayable once the rates file has the currency.
        from models.fx import FX_RATES_VERSION, USD_PER_UNIT

        if currency not in USD_PER_UNIT:
            raise ValueError(f"currency {currency} is not in the FX rates table {FX_RATES_VERSION}")
        return currency

    @property
    def txn_id(self) -> str:
        return self.event_id


class FraudLabelEvent(InboundEvent):
    """Topic ``fraud-labels``: the truth about a transaction, known at ``ts``."""

    txn_id: Id
    label: Literal["fraud", "legit"]
    source: ShortText | None = None


ShipmentStatus = Literal[
    "created",
    "picked",
    "departed",
    "arrived_hub",
    "customs_hold",
    "customs_cleared",
    "out_for_delivery",
    "delivered",
    "failed_attempt",
    "returned",
]


class LogisticsEvent(InboundEvent):
    """Topic ``logistics``: one tracking scan of an order's shipment."""

    order_id: Id
    carrier: Id
    origin_country: Country
    dest_country: Country
    status: ShipmentStatus
    promised_ts: EpochMs | None = None
    location: ShortText | None = None


#: Input topic -> the model its values must validate against.
INPUT_MODELS: dict[str, type[InboundEvent]] = {
    CLICKS: ClickEvent,
    PAYMENTS: PaymentEvent,
    FRAUD_LABELS: FraudLabelEvent,
    LOGISTICS: LogisticsEvent,
}


class PrivacyRequest(BaseModel):
    """Topic ``privacy-requests`` (key user_id): erase one user (``borderflow forget``).

    Keyed and partitioned like the input topics, so it reaches the worker that owns the
    user's state; that worker erases it and writes the receipt ``privacy:{request_id}``.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = SCHEMA_VERSION
    request_id: Id
    user_id: Id
    requested_at: EpochMs


class FraudAlert(BaseModel):
    """Topic ``fraud-alerts``: a payment whose score crossed the alert threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    alert_id: str
    txn_id: str
    user_id: str
    card_id: str
    merchant_id: str
    ts: int  # the payment's event time, epoch ms
    amount: float
    currency: str
    score: float
    threshold: float
    reasons: list[str]
    model_version: str


class DeadLetter(BaseModel):
    """Topic ``deadletter``: an input message that could not be decoded or validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    source_topic: str
    partition: int
    offset: int
    error: str
    #: The original message value (first 16 KiB), decoded as UTF-8 with invalid bytes
    #: replaced; the exact bytes are kept base64-encoded in ``payload_b64``.
    payload: str
    payload_b64: str
    #: Size of the original value; ``truncated`` when more than 600,000 bytes (the dead
    #: letter then keeps the first 600,000, and the original stays at partition/offset).
    payload_bytes: int
    truncated: bool = False
    #: For a JSON-array message: the position of the rejected element, else None.
    index: int | None = None


class LogisticsAlert(BaseModel):
    """Topic ``logistics-alerts``: a shipment predicted late, or held in customs too long.

    ``alert_id`` is ``{order_id}:{kind}``: each kind fires at most once per shipment, so a
    redelivered alert is recognisable. Times are epoch ms; ``ts`` is the event time of the
    scan (or watermark) that raised it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    alert_id: str
    order_id: str
    user_id: str
    kind: Literal["predicted_late", "customs_delay"]
    reason: str
    ts: int
    predicted_delivery_ts: int | None = None
    promised_ts: int | None = None
    carrier: str
    origin_country: str
    dest_country: str
