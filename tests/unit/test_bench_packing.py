"""Tracker-style packing of the bench workload into JSON-array messages."""

from __future__ import annotations

import orjson

from infra.bench import TRACKER_FLUSH_MS, card_testing_burst, pack_messages
from infra.generator import GeneratedEvent, GeneratorConfig, generate_to_list
from models.fraud import FraudEngine
from schemas.events import PaymentEvent


def event(topic: str, user: str, ts: int, n: int) -> GeneratedEvent:
    return GeneratedEvent(topic, user, {"event_id": f"{user}-{n}", "ts": ts}, ts, None)


def test_one_event_per_message_is_the_event_itself() -> None:
    events = [event("clicks", "u1", 0, 0), event("clicks", "u2", 5, 1)]
    messages = pack_messages(events, 1)
    assert [orjson.loads(m.value) for m in messages] == [e.value for e in events]


def test_arrays_hold_one_users_events_of_one_topic_in_order() -> None:
    events = generate_to_list(GeneratorConfig(users=50, days=2, seed=3, max_events=3000))
    messages = pack_messages(events, 10)
    assert len(messages) < len(events)
    unpacked = []
    for message in messages:
        values = orjson.loads(message.value)
        assert isinstance(values, list) and 1 <= len(values) <= 10
        assert values == [e.value for e in message.events]
        assert {(e.topic, e.key) for e in message.events} == {(message.topic, message.key)}
        unpacked.extend(message.events)
    # Nothing lost or repeated, and each user's events keep their order per topic.
    assert sorted(map(id, unpacked)) == sorted(map(id, events))
    for key in {e.key for e in events}:
        for topic in {e.topic for e in events}:
            original = [e for e in events if (e.key, e.topic) == (key, topic)]
            assert [e for e in unpacked if (e.key, e.topic) == (key, topic)] == original


def test_a_tracker_flushes_after_its_interval_even_when_not_full() -> None:
    events = [
        event("clicks", "u1", 0, 0),
        event("clicks", "u1", 10, 1),
        event("clicks", "u2", TRACKER_FLUSH_MS + 1, 2),  # closes u1's batch
        event("clicks", "u1", TRACKER_FLUSH_MS + 2, 3),
    ]
    messages = pack_messages(events, 100)
    assert [[e.value["event_id"] for e in m.events] for m in messages] == [
        ["u1-0", "u1-1"],
        ["u2-2"],
        ["u1-3"],
    ]


def test_each_latency_burst_makes_exactly_one_alert_on_its_large_charge() -> None:
    engine = FraudEngine(threshold=0.8)  # the worker's default threshold is 0.8 too
    for number in range(3):
        burst = card_testing_burst(1_767_225_600_000 + number * 60_000, number)
        payments = [PaymentEvent.model_validate_json(m.value) for m in burst]
        assert {m.topic for m in burst} == {"payments"} and len({m.key for m in burst}) == 1
        alerts = [s.is_alert for s in engine.score(payments)]
        assert alerts == [False, False, False, False, True]
