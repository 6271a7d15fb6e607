"""Shipment state machine and book: order, duplicates, invalid transitions, bounds, texts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson
import pytest

from infra import generator
from models import shipments
from models.profile import DeliveryExperience
from models.shipments import (
    MAX_COMPLETED,
    MAX_DONE,
    MAX_OPEN,
    MAX_SCANS,
    SHIPMENT_TRANSITIONS,
    STATUS_TEXT,
    STATUSES,
    ShipmentBook,
    is_valid_transition,
    status_text,
)
from schemas.events import LogisticsEvent

T0 = 1_767_225_600_000
H = 3_600_000
JOURNEY = ("created", "picked", "departed", "arrived_hub", "customs_cleared", "out_for_delivery")


def scan(eid: str, status: str, hours: float, order: str = "o1", **extra: Any) -> LogisticsEvent:
    value: dict[str, Any] = {
        "event_id": eid,
        "ts": T0 + int(hours * H),
        "user_id": "u1",
        "order_id": order,
        "carrier": "cainiao",
        "origin_country": "CN",
        "dest_country": "BR",
        "status": status,
        "promised_ts": T0 + 10 * 24 * H,
        "location": f"{status} place",
    }
    return LogisticsEvent.model_validate(value | extra)


def test_generator_uses_the_one_transition_graph() -> None:
    assert generator.SHIPMENT_TRANSITIONS is shipments.SHIPMENT_TRANSITIONS
    assert set(SHIPMENT_TRANSITIONS) == set(STATUSES)


def test_transition_rules() -> None:
    assert is_valid_transition("created", "picked")
    assert is_valid_transition("picked", "arrived_hub")  # a missed scan is no error
    assert is_valid_transition("arrived_hub", "arrived_hub")  # a second hub
    assert is_valid_transition("failed_attempt", "out_for_delivery")
    assert is_valid_transition("delivered", "returned")
    assert not is_valid_transition("delivered", "picked")
    assert not is_valid_transition("customs_cleared", "customs_hold")
    assert not is_valid_transition("picked", "created")
    assert not is_valid_transition("returned", "delivered")


def test_a_valid_journey_ends_delivered_and_completed() -> None:
    book = ShipmentBook("u1")
    for i, status in enumerate((*JOURNEY, "delivered")):
        shipment, outcome = book.apply(scan(f"s{i}", status, i * 10))
        assert outcome.applied and not outcome.out_of_order and outcome.invalid_transition is None
        assert shipment.status == status and shipment.status_ts == T0 + i * 10 * H
    assert outcome.completed_now
    assert shipment.delivered_ts == T0 + 60 * H and shipment.completed
    assert shipment.created_ts == T0 and shipment.promised_ts == T0 + 240 * H
    assert shipment.location == "delivered place"
    assert [row[1] for row in shipment.scans] == [*JOURNEY, "delivered"]
    assert book.open == {} and list(book.completed) == ["o1"]
    # A return after delivery still applies to the completed shipment.
    shipment, outcome = book.apply(scan("r", "returned", 200))
    assert outcome.applied and not outcome.completed_now and shipment.returned
    assert shipment.status == "returned"


def test_out_of_order_scan_goes_to_its_place_and_does_not_move_the_status() -> None:
    book = ShipmentBook("u1")
    book.apply(scan("a", "created", 0))
    book.apply(scan("c", "departed", 20))
    shipment, outcome = book.apply(scan("b", "picked", 10))
    assert outcome.applied and outcome.out_of_order and outcome.invalid_transition is None
    assert shipment.status == "departed" and shipment.status_ts == T0 + 20 * H
    assert shipment.location == "departed place"  # the newest scan's location
    assert [row[2] for row in shipment.scans] == ["a", "b", "c"]
    assert shipment.invalid_transitions == 0
    # An earlier first scan moves the shipment's start.
    shipment, _ = book.apply(scan("z", "created", -5))
    assert shipment.created_ts == T0 - 5 * H


def test_duplicate_scan_is_harmless() -> None:
    book = ShipmentBook("u1")
    book.apply(scan("a", "created", 0))
    book.apply(scan("b", "picked", 10))
    before = book.to_bytes()
    shipment, outcome = book.apply(scan("a", "created", 0))
    assert not outcome.applied and not outcome.stale
    assert book.to_bytes() == before
    assert shipment.status == "picked"


def test_a_held_scan_reports_where_it_was_applied() -> None:
    book = ShipmentBook("u1")
    book.apply(scan("a", "created", 0), (2, 40))
    book.apply(scan("b", "picked", 10), (2, 41))
    book.apply(scan("c", "departed", 20))  # no position known
    # The agent tells a replay (same position) from a duplicate (another one) by seen_at.
    again = ShipmentBook.from_bytes(book.to_bytes())
    assert again.apply(scan("a", "created", 0), (2, 99))[1].seen_at == (2, 40)
    assert again.apply(scan("b", "picked", 10), (2, 41))[1].seen_at == (2, 41)
    assert again.apply(scan("c", "departed", 20), (2, 42))[1].seen_at is None
    # A book stored before positions were kept: its scans' positions are unknown.
    data = orjson.loads(book.to_bytes())
    for row in data["open"][0]["scans"]:
        del row[3:]
    old = ShipmentBook.from_bytes(orjson.dumps(data))
    shipment, outcome = old.apply(scan("a", "created", 0), (2, 40))
    assert not outcome.applied and outcome.seen_at is None
    shipment, outcome = old.apply(scan("d", "delivered", 30), (2, 43))
    assert outcome.applied and outcome.completed_now and shipment.status == "delivered"
    assert [row[2:] for row in shipment.scans] == [["a"], ["b"], ["c"], ["d", 2, 43]]


def test_invalid_transition_is_counted_and_reported_never_fatal() -> None:
    book = ShipmentBook("u1")
    for i, status in enumerate(("created", "picked", "departed", "delivered")):
        book.apply(scan(f"s{i}", status, i * 10))
    shipment, outcome = book.apply(scan("late-picked", "picked", 50))
    assert outcome.applied and outcome.invalid_transition == "delivered -> picked"
    assert shipment.invalid_transitions == 1
    assert shipment.status == "picked"  # the latest scan by event time, as documented
    assert shipment.delivered_ts == T0 + 30 * H  # delivery is not undone
    # Inserted between two scans, the edge to its successor is checked too.
    _, outcome = book.apply(scan("odd", "arrived_hub", 15))  # picked -> it is fine
    assert outcome.invalid_transition == "arrived_hub -> departed"
    assert shipment.invalid_transitions == 2


def test_customs_hold_accounting_in_event_time() -> None:
    book = ShipmentBook("u1")
    for i, status in enumerate(("created", "picked", "departed", "arrived_hub")):
        book.apply(scan(f"s{i}", status, i * 10))
    shipment, _ = book.apply(scan("h", "customs_hold", 40))
    assert shipment.in_customs_hold and shipment.hold_start_ts == T0 + 40 * H
    assert shipment.customs_ms_at(T0 + 50 * H) == 10 * H
    shipment, _ = book.apply(scan("c", "customs_cleared", 70))
    assert not shipment.in_customs_hold and shipment.customs_holds == 1
    assert shipment.customs_ms == 30 * H and shipment.hold_durations() == [30 * H]


def test_failed_attempts_counted() -> None:
    book = ShipmentBook("u1")
    statuses = ("created", "out_for_delivery", "failed_attempt", "out_for_delivery")
    for i, status in enumerate(statuses):
        shipment, outcome = book.apply(scan(f"s{i}", status, i))
        assert outcome.invalid_transition is None
    assert shipment.failed_attempts == 1 and not shipment.completed


def test_book_round_trips_through_json_bytes() -> None:
    book = ShipmentBook("u1")
    for i, status in enumerate((*JOURNEY, "delivered")):
        book.apply(scan(f"s{i}", status, i, order="done"))
    book.apply(scan("x1", "created", 0, order="open"))
    book.apply(scan("x2", "customs_hold", 5, order="open"))
    book.open["open"].snapshots.append([T0, "created", 0, 0, 0, 0, 0, -1.0, 12.5])
    book.open["open"].alerted.append("customs_delay")
    book.experience = DeliveryExperience(deliveries=1, delivery_days_total=2.5)
    raw = book.to_bytes()
    # Every field of every shipment, as ``dataclasses.asdict`` gives them.
    assert orjson.loads(raw) == {
        "user_id": "u1",
        "open": [asdict(s) for s in book.open.values()],
        "completed": [asdict(s) for s in book.completed.values()],
        "done": book.done,
        "experience": asdict(book.experience),
    }
    again = ShipmentBook.from_bytes(raw)
    assert again.experience == book.experience
    assert again.to_bytes() == raw
    assert again.open["open"].in_customs_hold and again.completed["done"].delivered_ts
    # The restored book keeps working: duplicates are still recognised.
    assert not again.apply(scan("x2", "customs_hold", 5, order="open"))[1].applied


def test_book_memory_is_bounded() -> None:
    book = ShipmentBook("u1")
    for k in range(MAX_OPEN + 5):
        book.apply(scan(f"c{k}", "created", k, order=f"open{k}"))
    assert len(book.open) == MAX_OPEN and "open0" not in book.open  # the stalest went
    n_done = MAX_COMPLETED + MAX_DONE + 10
    for k in range(n_done):
        book.apply(scan(f"d{k}", "delivered", 1000 + k, order=f"d{k}"))
    assert len(book.completed) == MAX_COMPLETED and len(book.done) == MAX_DONE
    assert len(book.to_bytes()) < 60_000
    # A late scan of an order completed long ago is recognised (not a new shipment).
    recent_done = f"d{n_done - MAX_COMPLETED - 1}"
    shipment, outcome = book.apply(scan("late", "out_for_delivery", 999, order=recent_done))
    assert not outcome.applied and outcome.stale and shipment.status == "delivered"
    assert recent_done not in book.open


def test_open_shipments_without_news_expire() -> None:
    book = ShipmentBook("u1")
    book.apply(scan("a", "created", 0, order="old"))
    book.apply(scan("b", "created", 24 * 200, order="new"))
    assert book.expire(T0 + 24 * 200 * H) == ["old"] and list(book.open) == ["new"]


def test_scans_per_shipment_are_bounded_and_counters_survive() -> None:
    book = ShipmentBook("u1")
    book.apply(scan("c", "created", 0))
    book.apply(scan("h", "customs_hold", 1))
    book.apply(scan("k", "customs_cleared", 3))
    hours = 4
    for k in range(MAX_SCANS):  # many delivery rounds
        book.apply(scan(f"o{k}", "out_for_delivery", hours))
        shipment, _ = book.apply(scan(f"f{k}", "failed_attempt", hours + 1))
        hours += 2
    assert len(shipment.scans) == MAX_SCANS
    assert shipment.failed_attempts == MAX_SCANS
    assert shipment.customs_holds == 1 and shipment.customs_ms == 2 * H


REQUIRED_LANGUAGES = ("en", "zh", "es", "fr", "de", "ar", "ru", "pt", "ja")


@pytest.mark.parametrize("lang", REQUIRED_LANGUAGES)
def test_status_text_in_every_required_language(lang: str) -> None:
    texts = [status_text(status, lang) for status in STATUSES]
    assert all(texts) and len(set(texts)) == len(STATUSES)  # one distinct text per status
    if lang != "en":
        english = [status_text(status, "en") for status in STATUSES]
        assert sum(a != b for a, b in zip(texts, english, strict=True)) >= len(STATUSES) - 1


def test_status_text_examples_tags_and_fallbacks() -> None:
    assert status_text("out_for_delivery", "de") == "In Zustellung"
    assert status_text("out_for_delivery", "de-DE") == "In Zustellung"
    assert status_text("out_for_delivery", "ja") == "配達中"
    assert status_text("delivered", "pt_BR") == "Entregue"
    assert status_text("delivered", "zh-Hans-CN") == "已签收"
    assert status_text("delivered", "xx") == status_text("delivered", "en") == "Delivered"
    assert status_text("delivered", None) == "Delivered"
    assert status_text("customs_hold", "es", "Madrid, ES") == "Retenido en aduana (Madrid, ES)"
    assert status_text("delivered", "ja", "Tokyo, JP") == "配達完了（Tokyo, JP）"
    assert set(REQUIRED_LANGUAGES) <= set(STATUS_TEXT)
