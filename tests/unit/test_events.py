"""The inbound event contract: timestamps, required fields, bounds and tolerance."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from schemas.events import (
    MAX_TS_MS,
    MIN_TS_MS,
    ClickEvent,
    FraudLabelEvent,
    LogisticsEvent,
    PaymentEvent,
    to_epoch_ms,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def click(**overrides: object) -> dict[str, object]:
    value: dict[str, object] = {
        "event_id": "e1",
        "ts": T0,
        "user_id": "u1",
        "session_id": "s1",
        "type": "view",
        "item_id": "i1",
    }
    value.update(overrides)
    return value


def payment(**overrides: object) -> dict[str, object]:
    value: dict[str, object] = {
        "event_id": "t1",
        "ts": T0,
        "user_id": "u1",
        "card_id": "c1",
        "merchant_id": "m1",
        "amount": 10.0,
        "currency": "EUR",
    }
    value.update(overrides)
    return value


def error_fields(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.value.errors()}


# -- timestamps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00+00:00",
        "2026-01-01T01:00:00+01:00",
        "2025-12-31T19:00:00-05:00",
        "2026-01-01T00:00:00.000Z",
        T0,
        str(T0),
        float(T0),
    ],
)
def test_ts_forms_that_denote_the_same_instant(raw: object) -> None:
    assert ClickEvent.model_validate(click(ts=raw)).ts == T0


def test_iso_ts_in_json_and_offsets_are_converted_to_utc_epoch_ms() -> None:
    raw = b'{"event_id":"e","ts":"2026-01-01T05:30:00.250+05:30","user_id":"u",'
    raw += b'"session_id":"s","type":"search"}'
    assert ClickEvent.model_validate_json(raw).ts == T0 + 250


def test_epoch_ms_is_not_mistaken_for_seconds() -> None:
    # 1_767_225_600 would be 2026 in *seconds*; as milliseconds it is January 1970.
    with pytest.raises(ValueError, match="outside"):
        to_epoch_ms(1_767_225_600)


@pytest.mark.parametrize(
    "raw",
    ["2026-01-01T00:00:00", "2026-01-01", "2026-01-01 00:00:00"],
)
def test_naive_iso_ts_is_rejected(raw: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(click(ts=raw))
    assert error_fields(exc) == {"ts"}
    assert "timezone" in str(exc.value)


@pytest.mark.parametrize("raw", [True, False])
def test_bool_ts_is_rejected_although_bool_is_an_int(raw: bool) -> None:
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(click(ts=raw))
    assert "boolean" in str(exc.value)


def test_bool_ts_in_json_is_rejected() -> None:
    raw = b'{"event_id":"e","ts":true,"user_id":"u","session_id":"s","type":"search"}'
    with pytest.raises(ValidationError):
        ClickEvent.model_validate_json(raw)


@pytest.mark.parametrize(
    "raw",
    [
        MIN_TS_MS - 1,
        MAX_TS_MS,
        0,
        -1,
        10**30,
        "1999-12-31T23:59:59Z",
        "2100-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        str(MAX_TS_MS),
    ],
)
def test_out_of_range_ts_is_rejected(raw: object) -> None:
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(click(ts=raw))
    assert error_fields(exc) == {"ts"}


def test_range_bounds_are_inclusive_below_and_exclusive_above() -> None:
    assert to_epoch_ms(MIN_TS_MS) == MIN_TS_MS
    assert to_epoch_ms(MAX_TS_MS - 1) == MAX_TS_MS - 1
    assert to_epoch_ms("2000-01-01T00:00:00Z") == MIN_TS_MS


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf])
def test_non_finite_ts_is_rejected(raw: float) -> None:
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(click(ts=raw))
    assert "finite" in str(exc.value)


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_ts_in_json_is_rejected(token: bytes) -> None:
    raw = b'{"event_id":"e","ts":' + token + b',"user_id":"u","session_id":"s","type":"search"}'
    with pytest.raises(ValidationError):
        ClickEvent.model_validate_json(raw)


@pytest.mark.parametrize(
    "raw",
    ["", "yesterday", "1767225600000.0", "-1767225600000", "x" * 65, None, [T0], {"ms": T0}],
)
def test_garbage_ts_is_rejected(raw: object) -> None:
    with pytest.raises(ValidationError):
        ClickEvent.model_validate(click(ts=raw))


def test_ts_is_required() -> None:
    value = click()
    del value["ts"]
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(value)
    assert error_fields(exc) == {"ts"}


def test_logistics_promised_ts_uses_the_same_parser() -> None:
    scan = LogisticsEvent.model_validate(
        {
            "event_id": "s1",
            "ts": T0,
            "user_id": "u1",
            "order_id": "o1",
            "carrier": "dhl",
            "origin_country": "CN",
            "dest_country": "DE",
            "status": "departed",
            "promised_ts": "2026-01-08T00:00:00Z",
        }
    )
    assert scan.promised_ts == T0 + 7 * 86_400_000
    with pytest.raises(ValidationError):
        LogisticsEvent.model_validate({**scan.model_dump(), "promised_ts": "2026-01-08T00:00:00"})


# -- clicks: item_id ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["view", "add_to_cart", "remove_from_cart", "purchase"])
def test_item_id_is_required_for_every_click_but_search(kind: str) -> None:
    value = click(type=kind)
    del value["item_id"]
    with pytest.raises(ValidationError, match="item_id is required"):
        ClickEvent.model_validate(value)


def test_search_click_needs_no_item_id() -> None:
    value = click(type="search", query="red shoes")
    del value["item_id"]
    event = ClickEvent.model_validate(value)
    assert event.item_id is None
    assert event.query == "red shoes"


def test_unknown_click_type_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(click(type="like"))
    assert error_fields(exc) == {"type"}


# -- tolerant reader, frozen models -----------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    event = ClickEvent.model_validate(click(new_field={"nested": [1, 2]}, another="x"))
    assert not hasattr(event, "new_field")
    assert "new_field" not in event.model_dump()
    label = FraudLabelEvent.model_validate_json(
        b'{"event_id":"l","ts":1767225600000,"user_id":"u","txn_id":"t","label":"fraud",'
        b'"future_field":123}'
    )
    assert label.txn_id == "t"


@pytest.mark.parametrize(
    ("model", "value", "field", "new"),
    [
        (ClickEvent, click(), "user_id", "u2"),
        (PaymentEvent, payment(), "amount", 1.0),
    ],
)
def test_models_are_frozen(model: type, value: dict[str, object], field: str, new: object) -> None:
    event = model.model_validate(value)
    with pytest.raises(ValidationError):
        setattr(event, field, new)
    assert getattr(event, field) == value[field]


def test_payment_txn_id_is_its_event_id() -> None:
    assert PaymentEvent.model_validate(payment(event_id="tx-42")).txn_id == "tx-42"


# -- amounts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0, 0.0, -0.01, -5, math.nan, math.inf, -math.inf, 1e9, 1e12])
def test_invalid_payment_amounts_are_rejected(amount: float) -> None:
    with pytest.raises(ValidationError) as exc:
        PaymentEvent.model_validate(payment(amount=amount))
    assert error_fields(exc) == {"amount"}


@pytest.mark.parametrize("amount", [0.01, 1, 999_999_999.99])
def test_valid_payment_amounts_are_kept(amount: float) -> None:
    assert PaymentEvent.model_validate(payment(amount=amount)).amount == amount


def test_nan_amount_in_json_is_rejected() -> None:
    raw = (
        b'{"event_id":"t","ts":1767225600000,"user_id":"u","card_id":"c","merchant_id":"m",'
        b'"amount":NaN,"currency":"EUR"}'
    )
    with pytest.raises(ValidationError):
        PaymentEvent.model_validate_json(raw)


def test_click_price_may_be_zero_but_not_negative_or_infinite() -> None:
    assert ClickEvent.model_validate(click(price=0)).price == 0
    for bad in (-1.0, math.inf, math.nan, 1e12):
        with pytest.raises(ValidationError):
            ClickEvent.model_validate(click(price=bad))


# -- countries, currencies, strings -------------------------------------------------------------


@pytest.mark.parametrize("country", ["de", "DEU", "D", "", "D1", "DE\n", " DE", "ÄB"])
def test_country_must_be_two_upper_case_letters(country: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PaymentEvent.model_validate(payment(billing_country=country))
    assert error_fields(exc) == {"billing_country"}


@pytest.mark.parametrize("currency", ["eur", "EU", "EURO", "", "EU1", "EUR\n"])
def test_currency_must_be_three_upper_case_letters(currency: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PaymentEvent.model_validate(payment(currency=currency))
    assert error_fields(exc) == {"currency"}


def test_valid_country_and_currency_are_kept() -> None:
    event = PaymentEvent.model_validate(
        payment(currency="JPY", billing_country="JP", shipping_country="DE", ip_country="US")
    )
    assert (event.currency, event.billing_country, event.shipping_country) == ("JPY", "JP", "DE")


def test_ten_megabyte_string_field_is_rejected() -> None:
    huge = "x" * (10 * 1024 * 1024)
    for field in ("category", "device", "query"):
        with pytest.raises(ValidationError) as exc:
            ClickEvent.model_validate(click(**{field: huge}))
        assert error_fields(exc) == {field}
    with pytest.raises(ValidationError):
        ClickEvent.model_validate(click(user_id=huge))


@pytest.mark.parametrize(
    ("field", "limit"), [("event_id", 128), ("user_id", 128), ("item_id", 128), ("category", 256)]
)
def test_string_length_bounds(field: str, limit: int) -> None:
    assert getattr(ClickEvent.model_validate(click(**{field: "a" * limit})), field) == "a" * limit
    with pytest.raises(ValidationError):
        ClickEvent.model_validate(click(**{field: "a" * (limit + 1)}))


@pytest.mark.parametrize("field", ["event_id", "user_id", "session_id", "item_id"])
def test_ids_must_not_be_empty(field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ClickEvent.model_validate(click(**{field: ""}))
    assert error_fields(exc) == {field}


# -- personalisation --------------------------------------------------------------------------


def test_personalisation_defaults_to_true_and_can_be_turned_off() -> None:
    assert ClickEvent.model_validate(click()).personalisation is True
    assert ClickEvent.model_validate(click(personalisation=False)).personalisation is False


def test_fraud_label_must_be_fraud_or_legit() -> None:
    base = {"event_id": "l", "ts": T0, "user_id": "u", "txn_id": "t"}
    assert FraudLabelEvent.model_validate({**base, "label": "legit"}).label == "legit"
    with pytest.raises(ValidationError):
        FraudLabelEvent.model_validate({**base, "label": "chargeback"})
