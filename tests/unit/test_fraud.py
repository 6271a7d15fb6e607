"""Fraud scoring: past-only features, rules, delayed labels in event time, determinism."""

from __future__ import annotations

import itertools
import math
import pickle
import random

import pytest

from models.fraud import HOUR_MS, FraudEngine, FraudModel, LabelRepeat, PaymentFeatures
from models.fraud_features import unpack
from schemas.events import FraudLabelEvent, PaymentEvent

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z (a Thursday, midday)
MINUTE = 60_000
DAY = 24 * HOUR_MS

_ids = itertools.count()


def pay(ts: int = T0, **overrides: object) -> PaymentEvent:
    value: dict[str, object] = {
        "event_id": f"t{next(_ids)}",
        "ts": ts,
        "user_id": "u1",
        "card_id": "c1",
        "merchant_id": "m1",
        "amount": 30.0,
        "currency": "USD",
        "billing_country": "DE",
        "shipping_country": "DE",
        "ip_country": "DE",
        "device_id": "d1",
    }
    value.update(overrides)
    return PaymentEvent.model_validate(value)


def label_for(payment: PaymentEvent, verdict: str, ts: int) -> FraudLabelEvent:
    return FraudLabelEvent(
        event_id=f"l-{payment.event_id}",
        ts=ts,
        user_id=payment.user_id,
        txn_id=payment.event_id,
        label=verdict,
    )


# -- features use only the past -------------------------------------------------------------------


def test_a_payments_own_amount_is_not_in_its_own_velocity() -> None:
    features = PaymentFeatures()
    first = pay(amount=500.0)
    x = features.extract(first)
    assert x["card_tx_1h"] == 0.0
    assert x["card_tx_1d"] == 0.0
    assert x["card_amount_1d"] == 0.0
    assert x["user_tx_1h"] == 0.0
    assert x["device_tx_1h"] == 0.0
    assert x["amount_vs_user_mean"] == 0.0  # no history yet
    assert x["log_amount_usd"] == pytest.approx(math.log1p(500.0))
    features.update(first)
    y = features.extract(pay(amount=500.0))
    assert y["card_tx_1h"] == pytest.approx(1.0)
    assert y["card_amount_1d"] == pytest.approx(math.log1p(500.0))


def test_extract_reads_state_without_changing_it() -> None:
    features = PaymentFeatures()
    features.update(pay())
    payment = pay(ts=T0 + MINUTE)
    assert features.extract(payment) == features.extract(payment)


def test_engine_scores_each_payment_with_the_state_before_it() -> None:
    engine = FraudEngine()
    payments = [pay(ts=T0 + i * MINUTE) for i in range(3)]
    engine.score(payments)
    vectors = [unpack(engine.snapshots[p.event_id].features) for p in payments]
    assert vectors[0]["card_tx_1h"] == 0.0
    assert 0.95 < vectors[1]["card_tx_1h"] < 1.0  # one payment, decayed by one minute
    assert 1.9 < vectors[2]["card_tx_1h"] < 2.0


def test_velocities_decay_in_event_time() -> None:
    features = PaymentFeatures()
    features.update(pay(ts=T0))
    assert features.extract(pay(ts=T0 + HOUR_MS))["card_tx_1h"] == pytest.approx(0.5)
    assert features.extract(pay(ts=T0 + DAY))["card_tx_1d"] == pytest.approx(0.5)


def test_amounts_are_compared_in_usd() -> None:
    features = PaymentFeatures()
    x = features.extract(pay(amount=10_000.0, currency="JPY"))
    assert x["log_amount_usd"] == pytest.approx(math.log1p(68.0))


def test_new_device_merchant_and_card_are_flagged_only_after_some_history() -> None:
    features = PaymentFeatures()
    first = features.extract(pay(device_id="d9", merchant_id="m9", card_id="c9"))
    assert (first["new_device"], first["new_merchant"], first["new_card_for_user"]) == (0, 0, 0)
    features.update(pay())
    known = features.extract(pay(ts=T0 + MINUTE))
    assert (known["new_device"], known["new_merchant"], known["new_card_for_user"]) == (0, 0, 0)
    new = features.extract(pay(ts=T0 + MINUTE, device_id="d9", merchant_id="m9", card_id="c9"))
    assert (new["new_device"], new["new_merchant"], new["new_card_for_user"]) == (1, 1, 1)


def test_country_mismatch_features() -> None:
    x = PaymentFeatures().extract(pay(billing_country="DE", shipping_country="FR", ip_country="NG"))
    assert (x["billing_ne_shipping"], x["ip_ne_billing"], x["cross_border"]) == (1, 1, 1)
    y = PaymentFeatures().extract(pay(billing_country=None, shipping_country=None, ip_country=None))
    assert (y["billing_ne_shipping"], y["ip_ne_billing"], y["cross_border"]) == (0, 0, 0)


def test_time_of_day_features() -> None:
    night = PaymentFeatures().extract(pay(ts=T0 - 9 * HOUR_MS))  # 03:00 UTC Thursday
    assert night["night"] == 1.0 and night["weekend"] == 0.0
    saturday = PaymentFeatures().extract(pay(ts=T0 + 2 * DAY))
    assert saturday["night"] == 0.0 and saturday["weekend"] == 1.0


# -- rules --------------------------------------------------------------------------------------


def test_card_testing_tiny_charges_then_a_large_one_fires_with_its_reason() -> None:
    engine = FraudEngine(threshold=0.8)
    tiny = [pay(ts=T0 + i * 1000, amount=1.0) for i in range(4)]
    big = pay(ts=T0 + 5000, amount=900.0)
    *tiny_scores, big_score = engine.score([*tiny, big])
    assert not any(s.is_alert for s in tiny_scores)
    assert big_score.is_alert
    assert big_score.score.score == pytest.approx(0.95)
    assert big_score.score.reasons[0].startswith("card testing: a tiny charge then a large one")
    assert any(r.startswith("card testing: several tiny charges") for r in big_score.score.reasons)


def test_card_testing_burst_then_large_charge_minutes_later_fires() -> None:
    engine = FraudEngine(threshold=0.8)
    tiny = [pay(ts=T0 + i * 1000, amount=1.0) for i in range(4)]
    big = pay(ts=T0 + 3 * MINUTE, amount=900.0)  # past the one-minute rule
    big_score = engine.score([*tiny, big])[-1]
    assert big_score.is_alert
    assert big_score.score.score == pytest.approx(0.9)
    assert big_score.score.reasons == [
        "card testing: several tiny charges then a large one on this card"
    ]


def test_card_testing_burst_of_tiny_authorisations_fires() -> None:
    engine = FraudEngine(threshold=0.8)
    scored = engine.score([pay(ts=T0 + i, amount=0.5) for i in range(8)])
    flags = [s.is_alert for s in scored]
    assert flags[:5] == [False] * 5
    assert flags[-1] is True
    assert "burst of tiny authorisations" in scored[-1].score.reasons[0]


def test_tiny_charges_on_other_cards_do_not_trigger_card_testing() -> None:
    engine = FraudEngine(threshold=0.8)
    tiny = [pay(ts=T0 + i, amount=1.0, card_id=f"c{i}") for i in range(6)]
    scored = engine.score([*tiny, pay(ts=T0 + 10, amount=900.0, card_id="fresh")])
    assert not any(s.is_alert for s in scored)


def test_amount_spike_from_new_device_abroad_rule() -> None:
    engine = FraudEngine(threshold=0.8)
    history = [pay(ts=T0 + i * HOUR_MS, amount=20.0) for i in range(5)]
    spike = pay(ts=T0 + 6 * HOUR_MS, amount=2_000.0, device_id="new", ip_country="NG")
    scored = engine.score([*history, spike])
    assert scored[-1].is_alert
    assert "amount spike from a new device in another country" in scored[-1].score.reasons


def test_ordinary_payment_before_any_label_scores_zero() -> None:
    scored = FraudEngine().score([pay()])[0]
    assert (scored.score.score, scored.score.model_score, scored.is_alert) == (0.0, 0.0, False)
    assert scored.score.model_version == f"{FraudModel.VERSION}@0"


# -- delayed labels ---------------------------------------------------------------------------


def test_label_is_learned_only_once_payments_pass_label_time_plus_delay() -> None:
    engine = FraudEngine(label_apply_delay_ms=HOUR_MS)
    p1 = pay(ts=T0)
    engine.score([p1])
    label_ts = T0 + 10 * MINUTE
    engine.add_labels([label_for(p1, "fraud", label_ts)])
    assert engine.pending_labels == 1

    engine.score([pay(ts=label_ts + HOUR_MS - 1)])
    assert (engine.labels_applied, engine.model.labels_learned, engine.pending_labels) == (0, 0, 1)

    engine.score([pay(ts=label_ts + HOUR_MS)])
    assert (engine.labels_applied, engine.model.labels_learned, engine.pending_labels) == (1, 1, 0)
    assert engine.model_version == f"{FraudModel.VERSION}@1"
    assert engine.snapshots[p1.event_id].learned  # kept until its TTL, marked learned


def test_label_arriving_late_is_applied_with_the_next_payment() -> None:
    engine = FraudEngine(label_apply_delay_ms=HOUR_MS)
    p1 = pay(ts=T0)
    engine.score([p1, pay(ts=T0 + 5 * HOUR_MS)])
    engine.add_labels([label_for(p1, "legit", T0 + MINUTE)])  # due long ago
    assert engine.labels_applied == 0  # labels are only applied while scoring
    engine.score([pay(ts=T0 + 5 * HOUR_MS + 1)])
    assert engine.labels_applied == 1


def test_labels_for_unknown_transactions_are_counted_not_learned() -> None:
    engine = FraudEngine(label_apply_delay_ms=0)
    ghost = pay(event_id="never-scored")
    engine.add_labels([label_for(ghost, "fraud", T0)])
    engine.score([pay(ts=T0 + 1)])
    assert (engine.labels_unknown, engine.labels_applied, engine.model.labels_learned) == (1, 0, 0)


def test_second_label_for_the_same_transaction_is_not_learned_twice() -> None:
    engine = FraudEngine(label_apply_delay_ms=0)
    p1 = pay(ts=T0)
    engine.score([p1])
    relabel = label_for(p1, "fraud", T0 + 2).model_copy(update={"event_id": "relabel"})
    assert engine.add_labels([label_for(p1, "fraud", T0 + 1), relabel]) == [None, None]
    engine.score([pay(ts=T0 + 3)])
    assert (engine.labels_applied, engine.labels_duplicate, engine.labels_unknown) == (1, 1, 0)


def test_a_label_event_received_again_is_not_queued_again() -> None:
    engine = FraudEngine(label_apply_delay_ms=HOUR_MS)
    p1 = pay(ts=T0)
    engine.score([p1])
    first = label_for(p1, "fraud", T0 + 1)
    assert engine.add_labels([first], [7]) == [None]
    # Where it was first received, so the agent can tell a replay (7) from a duplicate.
    assert engine.add_labels([first, first], [7, 9]) == [LabelRepeat(7), LabelRepeat(7)]
    assert engine.pending_labels == 1
    # Remembered across a checkpoint, with the offsets of the payments' first scores.
    restored = FraudEngine.from_checkpoint(engine.to_checkpoint())
    assert restored.add_labels([first]) == [LabelRepeat(7)]
    engine.score([pay(ts=T0 + 2 * HOUR_MS)])
    assert (engine.labels_applied, engine.labels_duplicate) == (1, 0)


def test_a_payment_scored_again_says_where_it_was_first_scored() -> None:
    engine = FraudEngine()
    p1, p2 = pay(ts=T0), pay(ts=T0 + 1)
    first = engine.score([p1, p2], [3, 4])
    assert [(s.repeat, s.first_offset) for s in first] == [(False, None), (False, None)]
    again = engine.score([p2, p1], [9, 3])
    assert [(s.repeat, s.first_offset) for s in again] == [(True, 4), (True, 3)]
    assert [s.score for s in again] == [first[1].score, first[0].score]
    # Scored without an offset: a repeat, first seen nobody knows where.
    p3 = pay(ts=T0 + 2)
    engine.score([p3])
    assert [(s.repeat, s.first_offset) for s in engine.score([p3], [11])] == [(True, None)]


def test_an_engine_image_from_before_offsets_still_loads() -> None:
    engine = FraudEngine()
    p1 = pay(ts=T0)
    engine.score([p1], [5])
    snapshot = engine.snapshots[p1.event_id]
    # What pickle stores for a snapshot (its slots), as an older version wrote it.
    _, slots = snapshot.__reduce_ex__(pickle.HIGHEST_PROTOCOL)[2]
    old = object.__new__(type(snapshot))
    old.__setstate__((None, {k: v for k, v in slots.items() if k != "offset"}))
    assert (old.offset, old.score, old.learned) == (None, snapshot.score, False)
    engine.snapshots[p1.event_id] = old
    del engine.label_events  # not in older images either
    restored = pickle.loads(engine.pickle())
    assert restored.label_events == {} and restored.snapshots[p1.event_id].offset is None
    assert [(s.repeat, s.first_offset) for s in restored.score([p1], [5])] == [(True, None)]


def test_labels_complete_for() -> None:
    engine = FraudEngine(label_apply_delay_ms=HOUR_MS)
    assert not engine.labels_complete_for(T0)
    engine.add_labels([label_for(pay(), "legit", T0)])
    assert engine.labels_complete_for(T0)
    assert engine.labels_complete_for(T0 + HOUR_MS)
    assert not engine.labels_complete_for(T0 + HOUR_MS + 1)
    # An older label does not move the watermark back.
    engine.add_labels([label_for(pay(), "legit", T0 - DAY)])
    assert engine.labels_complete_for(T0 + HOUR_MS)


def test_snapshots_expire_by_event_time_ttl_and_late_labels_count_as_unknown() -> None:
    engine = FraudEngine(label_apply_delay_ms=0, snapshot_ttl_ms=DAY, label_timeout_ms=DAY)
    old = pay(ts=T0)
    engine.score([old, pay(ts=T0 + DAY)])
    assert old.event_id in engine.snapshots  # exactly at the horizon: kept
    engine.score([pay(ts=T0 + DAY + 1)])
    assert old.event_id not in engine.snapshots
    engine.add_labels([label_for(old, "fraud", T0 + DAY + 2)])
    engine.score([pay(ts=T0 + DAY + 3)])
    assert (engine.labels_unknown, engine.labels_applied) == (1, 0)
    assert engine.labels_timed_out == 1  # `old`, learned as legitimate before it expired


def test_snapshot_count_is_bounded() -> None:
    engine = FraudEngine(max_snapshots=3)
    payments = [pay(ts=T0 + i) for i in range(10)]
    engine.score(payments)
    assert list(engine.snapshots) == [p.event_id for p in payments[-3:]]


# -- redelivery ---------------------------------------------------------------------------------


def test_redelivered_payment_gets_its_first_score_and_changes_no_velocity() -> None:
    engine = FraudEngine()
    tiny = [pay(ts=T0 + i, amount=1.0) for i in range(4)]
    big = pay(ts=T0 + 10, amount=900.0)
    first = engine.score([*tiny, big])
    card = engine.features.cards["c1"]
    before = (card.tx_1h, card.count, card.amount_1d, engine.features.users["u1"].count)

    again = engine.score([*tiny, big])  # the whole batch redelivered
    assert [s.score for s in again] == [s.score for s in first]
    card = engine.features.cards["c1"]
    assert (card.tx_1h, card.count, card.amount_1d, engine.features.users["u1"].count) == before
    next_one = engine.score([pay(ts=T0 + 20)])[0]
    assert unpack(engine.snapshots[next_one.payment.event_id].features)[
        "card_tx_1h"
    ] == pytest.approx(5.0, 1e-3)


# -- learning -----------------------------------------------------------------------------------


def _fraud_like(ts: int, user: str, rng: random.Random) -> PaymentEvent:
    return pay(
        ts=ts,
        user_id=user,
        card_id=f"card-{user}",
        merchant_id="m-shady",
        amount=round(rng.uniform(600, 1200), 2),
        device_id=f"dev-{rng.randrange(10**6)}",
        ip_country="NG",
        shipping_country="FR",
    )


def _legit_like(ts: int, user: str, rng: random.Random) -> PaymentEvent:
    return pay(
        ts=ts,
        user_id=user,
        card_id=f"card-{user}",
        merchant_id=f"m-shop{rng.randrange(5)}",
        amount=round(rng.uniform(10, 60), 2),
        device_id=f"dev-{user}",
    )


def _training_stream(
    verdict_for_fraud_like: str,
) -> tuple[list[PaymentEvent], list[FraudLabelEvent]]:
    """About four days of payments by 150 users, a quarter of them fraud-like; every payment
    gets its label ten minutes after it."""
    rng = random.Random(11)
    payments: list[PaymentEvent] = []
    labels: list[FraudLabelEvent] = []
    ts = T0
    for _ in range(400):
        ts += rng.randrange(1, 30) * MINUTE
        user = f"u{rng.randrange(150)}"
        if rng.random() < 0.25:
            payment = _fraud_like(ts, user, rng)
            verdict = verdict_for_fraud_like
        else:
            payment = _legit_like(ts, user, rng)
            verdict = "legit"
        payments.append(payment)
        labels.append(label_for(payment, verdict, ts + 10 * MINUTE))
    return payments, labels


def _trained_engine(verdict_for_fraud_like: str) -> FraudEngine:
    engine = FraudEngine(label_apply_delay_ms=HOUR_MS)
    payments, labels = _training_stream(verdict_for_fraud_like)
    engine.add_labels(labels)
    engine.score(payments)
    return engine


def test_learned_fraud_pattern_raises_the_score_of_the_next_similar_payment() -> None:
    probe_ts = T0 + 6 * DAY  # after the whole training stream
    rng = random.Random(99)
    suspicious = _fraud_like(probe_ts, "u-new", rng)
    ordinary = _legit_like(probe_ts, "u-other", rng)

    untrained = FraudEngine(label_apply_delay_ms=HOUR_MS)
    before = untrained.score([suspicious])[0].score
    control = _trained_engine("legit")  # same payments, but nothing was ever fraud
    control_score = control.score([suspicious])[0].score

    engine = _trained_engine("fraud")
    assert engine.labels_applied > 350  # the last few are due after the stream ends
    after, normal = (s.score for s in engine.score([suspicious, ordinary]))

    assert after.model_score > before.model_score
    assert after.model_score > control_score.model_score + 0.3
    assert after.model_score > normal.model_score + 0.3
    assert after.score >= 0.5
    # Reasons name features that pushed the logistic score up.
    assert after.reasons
    assert after.model_version == f"{FraudModel.VERSION}@{engine.model.labels_learned}"


# -- determinism --------------------------------------------------------------------------------


def test_scores_do_not_depend_on_when_labels_arrive_before_their_apply_time() -> None:
    payments, labels = _training_stream("fraud")
    delay = HOUR_MS

    early = FraudEngine(label_apply_delay_ms=delay)
    early.add_labels(labels)  # every label known before any payment
    early_scores = [s.score for s in early.score(payments)]

    # The other engine gets each label as late as allowed: just before the first payment
    # whose event time reaches the label's apply time, in small batches.
    late = FraudEngine(label_apply_delay_ms=delay)
    late_scores = []
    queue = sorted(labels, key=lambda lab: lab.ts)
    for start in range(0, len(payments), 7):
        batch = payments[start : start + 7]
        due = [lab for lab in queue if lab.ts + delay <= batch[-1].ts]
        queue = [lab for lab in queue if lab.ts + delay > batch[-1].ts]
        late.add_labels(due)
        late_scores.extend(s.score for s in late.score(batch))

    assert late.labels_applied == early.labels_applied > 100
    assert late_scores == early_scores
    assert any(s.model_score > 0 for s in early_scores)  # the model did take part


def test_model_stays_silent_until_it_has_learned_enough_and_seen_fraud() -> None:
    # Trained on legit labels only, an untrained-for-fraud regression would score unfamiliar
    # payments near 0.5; the engine must not use it before it is warm.
    engine = FraudEngine(label_apply_delay_ms=0)
    payments = [pay(ts=T0 + i * 60_000, amount=20.0 + i % 7) for i in range(120)]
    engine.score(payments)
    engine.add_labels(label_for(p, "legit", T0 + 200 * 60_000) for p in payments)
    odd = pay(ts=T0 + 300 * 60_000, amount=900.0, ip_country="BR")
    scored = engine.score([odd])[0]
    assert engine.model.labels_learned == 120
    assert not engine.model.is_warm
    assert scored.score.model_score == 0.0
    assert not scored.is_alert

    fraud = pay(ts=T0 + 301 * 60_000, amount=800.0, device_id="other-device", ip_country="BR")
    engine.score([fraud])
    engine.add_labels([label_for(fraud, "fraud", T0 + 302 * 60_000)])
    engine.score([pay(ts=T0 + 303 * 60_000)])
    assert engine.model.is_warm
