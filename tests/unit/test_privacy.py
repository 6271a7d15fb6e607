"""Personal data: what a forget erases from the models, consent in profiles, the summary."""

from __future__ import annotations

import itertools

import orjson
import pytest

from infra.privacy import ForgetReport, run_forget
from models.fraud import FraudEngine
from models.profile import BEHAVIOURAL_FIELDS, UserProfile, apply_click
from models.serving import ServingModels, session_key
from schemas.config import Settings
from schemas.errors import BorderflowError
from schemas.events import ClickEvent, FraudLabelEvent, PaymentEvent

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
MINUTE = 60_000
_ids = itertools.count()


def pay(user: str, ts: int, **overrides: object) -> PaymentEvent:
    value: dict[str, object] = {
        "event_id": f"t{next(_ids)}",
        "ts": ts,
        "user_id": user,
        "card_id": f"card-of-{user}",
        "merchant_id": "m1",
        "amount": 30.0,
        "currency": "USD",
        "ip_country": "DE",
        "device_id": f"device-of-{user}",
    }
    value.update(overrides)
    return PaymentEvent.model_validate(value)


def click(user: str, ts: int, **overrides: object) -> ClickEvent:
    value: dict[str, object] = {
        "event_id": f"c{next(_ids)}",
        "ts": ts,
        "user_id": user,
        "session_id": f"s-{user}",
        "type": "view",
        "item_id": "i1",
        "category": "shoes",
        "price": 120.0,
        "currency": "EUR",
        "device": "ios",
        "country": "DE",
    }
    value.update(overrides)
    return ClickEvent.model_validate(value)


# -- fraud engine ---------------------------------------------------------------------------------


def test_a_forgotten_user_leaves_nothing_in_the_fraud_engine_or_its_checkpoint() -> None:
    engine = FraudEngine(label_apply_delay_ms=60 * MINUTE)
    gone, kept = "user-to-forget-7f3a", "user-who-stays-91bc"
    theirs = [pay(gone, T0 + i * MINUTE) for i in range(3)]
    ours = [pay(kept, T0 + i * MINUTE, card_id="shared-merchant-card") for i in range(2)]
    engine.score([*theirs, *ours])
    label = FraudLabelEvent(
        event_id="l1", ts=T0 + 5 * MINUTE, txn_id=theirs[0].event_id, user_id=gone, label="fraud"
    )
    engine.add_labels([label])
    assert gone.encode() in engine.pickle()

    removed = engine.forget_user(gone)

    assert removed == {
        "users": 1, "cards": 1, "devices": 1, "snapshots": 3, "pending_labels": 1,
    }  # fmt: skip
    image = engine.pickle()
    assert gone.encode() not in image
    assert b"card-of-" + gone.encode() not in image
    assert b"device-of-" + gone.encode() not in image
    # The other user's state is untouched; the forgotten user starts again from nothing.
    assert kept in engine.features.users and "shared-merchant-card" in engine.features.cards
    assert all(engine.snapshots[p.event_id].user_id == kept for p in ours)
    again = engine.score([pay(gone, T0 + 10 * MINUTE)])[0]
    assert not again.repeat
    assert engine.features.users[gone].count == 1
    # Forgetting twice finds nothing the second time.
    engine.forget_user(gone)
    assert engine.forget_user(gone) == {
        "users": 0, "cards": 0, "devices": 0, "snapshots": 0, "pending_labels": 0,
    }  # fmt: skip


def test_forget_does_not_stop_label_timeouts_of_other_payments() -> None:
    engine = FraudEngine(label_timeout_ms=60 * MINUTE)
    gone, kept = pay("g", T0), pay("k", T0 + 1)
    engine.score([gone, kept])
    engine.forget_user("g")
    engine.score([pay("k", T0 + 2 * 60 * MINUTE)])  # past the timeout of the first two
    assert engine.labels_timed_out == 1 and engine.snapshots[kept.event_id].learned


# -- serving models -------------------------------------------------------------------------------


def learn(serving: ServingModels, profile: UserProfile, event: ClickEvent) -> None:
    before = list(profile.session_items)
    apply_click(profile, event)
    serving.learn_click(
        event,
        session_before=before,
        basket_before=[],
        country="DE",
        session_key=session_key(profile, event),
        personal=profile.personalisation,
    )


def test_a_forgotten_user_leaves_no_session_in_the_serving_models() -> None:
    serving = ServingModels()
    alice, bob = UserProfile.new("alice-5d1e"), UserProfile.new("bob-77c0")
    for i, item in enumerate(["a", "b", "c"]):
        learn(serving, alice, click("alice-5d1e", T0 + i * MINUTE, item_id=item))
        learn(serving, bob, click("bob-77c0", T0 + i * MINUTE, item_id=item))
    # A second session of alice's, and a shipment of hers on the customs watch list.
    learn(serving, alice, click("alice-5d1e", T0 + 3 * 60 * MINUTE, item_id="d", session_id="s2"))
    serving.customs_watch["o-alice"] = ["alice-5d1e", T0, "CN", "DE"]
    serving.customs_watch["o-bob"] = ["bob-77c0", T0, "CN", "DE"]
    assert b"alice-5d1e" in serving.pickle()

    removed = serving.forget_user("alice-5d1e")

    assert removed == {"sessions": 2, "customs_watch": 1}
    assert b"alice-5d1e" not in serving.pickle()
    assert list(serving.customs_watch) == ["o-bob"]
    # Bob's session still finds its neighbours; the item statistics stay.
    recommender = serving.recommender
    assert any(key.startswith("bob-77c0:") for key in recommender._open)
    assert all(sid in recommender.sessions for ids in recommender.item_sessions.values()
               for sid in ids)  # fmt: skip
    assert "a" in recommender.popularity["DE"]


# -- consent --------------------------------------------------------------------------------------


def test_withdrawn_consent_clears_the_behaviour_and_collects_none() -> None:
    profile = UserProfile.new("u1")
    apply_click(profile, click("u1", T0, type="purchase"))
    apply_click(profile, click("u1", T0 + MINUTE, category="bags"))
    assert profile.affinity and profile.purchases == 1 and profile.price_bands

    apply_click(profile, click("u1", T0 + 2 * MINUTE, personalisation=False, category="hats"))
    apply_click(profile, click("u1", T0 + 3 * MINUTE, personalisation=False, type="purchase"))
    # A late click from before the withdrawal does not bring anything back either.
    apply_click(profile, click("u1", T0 + 30_000, category="coats"))

    fresh = UserProfile.new("u1")
    for name in BEHAVIOURAL_FIELDS:
        assert getattr(profile, name) == getattr(fresh, name), name
    # What is kept: identity, freshness, counts, where to serve, the consent flag itself.
    assert (profile.events, profile.last_ts, profile.country) == (5, T0 + 3 * MINUTE, "DE")
    assert profile.personalisation is False
    stored = UserProfile.from_bytes(profile.to_bytes()).to_redis_hash()
    assert orjson.loads(stored["top_categories"]) == [] and orjson.loads(stored["peak_hours"]) == []
    assert (stored["price_band"], stored["device"], stored["segment"]) == ("", "", "")
    assert (stored["frequency_purchases"], stored["monetary_usd"]) == (0, 0.0)

    # Consent given again: collection starts afresh from that click.
    apply_click(profile, click("u1", T0 + 4 * MINUTE, category="boots"))
    assert [c for c, _ in profile.top_categories(profile.last_ts)] == ["boots"]


def test_clicks_without_consent_teach_items_but_keep_no_session_of_the_user() -> None:
    serving = ServingModels()
    profile = UserProfile.new("shy")
    for i, item in enumerate(["a", "b", "c"]):
        learn(serving, profile, click("shy", T0 + i * MINUTE, item_id=item, personalisation=False))
    recommender = serving.recommender
    assert recommender.sessions == {} and recommender._open == {}
    assert recommender.cooccurrence == {}  # no links between the user's clicks
    assert set(recommender.popularity["DE"]) == {"a", "b", "c"}
    assert b"shy" not in serving.pickle()


# -- the command's summary ------------------------------------------------------------------------


def test_summary_says_what_went_where_and_when_the_workers_part_is_pending() -> None:
    report = ForgetReport("u1", "ab" * 16, request_id="r1")
    report.clickhouse = {"click_events": 4, "fraud_scores": 0, "shipment_predictions": 2}
    report.redis = {"profile": 1, "recs": 2, "shipments": 1, "alerts": 0}
    text = "\n".join(report.lines())
    assert report.pending and "pending" in text and "privacy-requests" in text
    assert "click_events 4, shipment_predictions 2" in text and "fraud_scores" not in text
    assert "profile 1, recs keys 2, shipment hashes 1, alert entries 0" in text

    report.receipt = {"status": "done", "partition": "2", "table_user_profiles": "1",
                      "fraud_snapshots": "3", "redis_alerts": "1", "drained": "1",
                      "clickhouse_flushed": "1"}  # fmt: skip
    text = "\n".join(report.lines())
    assert not report.pending
    assert "removed on partition 2: user_profiles entry 1" in text
    assert "payment snapshots 3" in text and "pending" not in text and "again" not in text
    # Redis keys count once, whoever deleted them: the command or the worker after it.
    assert "alert entries 1" in text

    report.receipt["clickhouse_flushed"] = "0"
    assert "run the command again" in "\n".join(report.lines())


@pytest.mark.parametrize("user_id", ["", "u" * 129])
def test_an_impossible_user_id_is_refused_before_anything_is_touched(user_id: str) -> None:
    # Port 1: nothing listens there, so reaching ClickHouse would fail differently.
    settings = Settings(clickhouse_port=1)
    with pytest.raises(BorderflowError, match="1 to 128 characters"):
        run_forget(settings, user_id)
