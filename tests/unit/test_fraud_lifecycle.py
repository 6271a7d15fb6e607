"""Features windows, alert policies, label timeout, drift and checkpoints of the fraud engine."""

from __future__ import annotations

import math
import random

import pytest

from models.fraud import AlertPolicy, FraudEngine, FraudModel
from models.fraud_features import FEATURE_NAMES, PaymentFeatures, pack, unpack
from schemas.events import FraudLabelEvent, PaymentEvent

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def pay(i: int, ts: int, **overrides: object) -> PaymentEvent:
    values: dict[str, object] = {
        "event_id": f"t{i}",
        "ts": ts,
        "user_id": "u1",
        "card_id": "c1",
        "merchant_id": "m1",
        "amount": 20.0,
        "currency": "USD",
        "device_id": "d1",
        "ip_country": "DE",
        "billing_country": "DE",
        "shipping_country": "DE",
    }
    values.update(overrides)
    return PaymentEvent.model_validate(values)


def label(p: PaymentEvent, fraud: bool, ts: int) -> FraudLabelEvent:
    return FraudLabelEvent(
        event_id=f"l-{p.event_id}", ts=ts, user_id=p.user_id, txn_id=p.event_id,
        label="fraud" if fraud else "legit",
    )  # fmt: skip


# -- features ------------------------------------------------------------------------------------


def test_windows_decay_with_their_own_half_life() -> None:
    features = PaymentFeatures()
    features.update(pay(0, T0))
    x = features.extract(pay(1, T0 + HOUR))
    assert x["card_tx_1h"] == pytest.approx(0.5)  # one half-life later
    assert x["card_tx_1d"] == pytest.approx(2 ** (-1 / 24))
    assert x["card_tx_7d"] > x["card_tx_1d"] > x["card_tx_1h"]
    assert x["card_amount_30d"] == pytest.approx(math.log1p(20 * 2 ** (-1 / 720)))


def test_amount_z_score_and_ratio_against_the_cards_history() -> None:
    features = PaymentFeatures()
    for i, amount in enumerate([10.0, 12.0, 14.0, 10.0, 12.0, 14.0]):
        features.update(pay(i, T0 + i * MINUTE, amount=amount))
    spike = features.extract(pay(9, T0 + HOUR, amount=60.0))
    usual = features.extract(pay(10, T0 + HOUR, amount=12.0))
    assert spike["amount_z_card"] > 10 - 1e-9 or spike["amount_z_card"] > 20  # clipped at 10
    assert usual["amount_z_card"] == pytest.approx(0.0)
    assert spike["amount_vs_card_mean"] == pytest.approx(math.log(61 / 13))


def test_first_time_seen_ip_country_and_merchant_risk_windows() -> None:
    features = PaymentFeatures()
    features.update(pay(0, T0))
    abroad = features.extract(pay(1, T0 + MINUTE, ip_country="BR", merchant_id="m2"))
    assert (abroad["new_ip_country"], abroad["new_merchant"]) == (1.0, 1.0)
    home = features.extract(pay(2, T0 + MINUTE))
    assert (home["new_ip_country"], home["new_merchant"]) == (0.0, 0.0)
    for _ in range(3):
        features.learn_label("m1", True, T0)
    x = features.extract(pay(3, T0 + 10 * DAY))
    # The 1-day rate has decayed away, the 30-day one still remembers.
    assert x["merchant_fraud_rate_1d"] < 0.01 < x["merchant_fraud_rate_30d"]


def test_entities_are_evicted_least_recently_used_first() -> None:
    features = PaymentFeatures(max_entities=3)
    for i in range(5):
        features.update(pay(i, T0 + i, card_id=f"c{i}"))
    assert list(features.cards) == ["c2", "c3", "c4"]


def test_packed_snapshots_round_trip_every_feature() -> None:
    features = PaymentFeatures()
    features.update(pay(0, T0))
    x = features.extract(pay(1, T0 + MINUTE))
    assert set(x) <= set(FEATURE_NAMES)
    restored = unpack(pack(x))
    assert set(restored) == set(x)
    assert all(restored[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in x.items())
    assert len(pack(x)) == 4 * len(FEATURE_NAMES)


# -- alert policies -----------------------------------------------------------------------------


def test_alert_rate_policy_alerts_on_about_the_target_share() -> None:
    policy = AlertPolicy("alert_rate", target=0.02, threshold_floor=0.0)
    rng = random.Random(3)
    alerts = [policy.decide(rng.random(), T0 + i)[0] for i in range(20_000)]
    assert 0.015 < sum(alerts[5000:]) / 15_000 < 0.025


def test_precision_policy_picks_the_lowest_threshold_meeting_the_target() -> None:
    policy = AlertPolicy("precision", target=0.8, threshold_floor=0.1)
    # Scores above 0.7 are fraud 90% of the time, below it 10%.
    rng = random.Random(5)
    for _ in range(1000):
        score = rng.random()
        policy.observe_label(score, rng.random() < (0.9 if score > 0.7 else 0.1))
    assert 0.6 < policy.threshold < 0.8


def test_daily_budget_caps_alerts_per_event_time_day() -> None:
    policy = AlertPolicy("fixed", threshold=0.5, daily_budget=2)
    day_one = [policy.decide(0.9, T0 + i)[0] for i in range(5)]
    day_two = [policy.decide(0.9, T0 + DAY + i)[0] for i in range(5)]
    assert day_one == [True, True, False, False, False] == day_two


# -- label timeout, drift, checkpoints ----------------------------------------------------------


def test_payment_without_label_is_learned_as_legitimate_after_the_timeout() -> None:
    engine = FraudEngine(label_timeout_ms=3 * DAY)
    first = pay(0, T0)
    engine.score([first])
    engine.score([pay(1, T0 + 3 * DAY - 1)])
    assert engine.labels_timed_out == 0
    engine.score([pay(2, T0 + 3 * DAY)])
    assert engine.labels_timed_out == 1 and engine.snapshots[first.event_id].learned
    # A chargeback arriving after the timeout is counted, never learned twice.
    engine.add_labels([label(first, True, T0 + 4 * DAY)])
    engine.score([pay(3, T0 + 5 * DAY)])
    assert (engine.labels_duplicate, engine.model.frauds_learned) == (1, 0)


def test_drift_is_detected_counted_and_can_reset_the_supervised_learners() -> None:
    engine = FraudEngine(label_apply_delay_ms=0, drift_reaction="reset")
    rng = random.Random(1)
    i = 0
    # The concept flips: large amounts are fraud, then small ones are.
    for large_is_fraud in (True, False):
        for _ in range(1500):
            p = pay(i, T0 + i * MINUTE, amount=rng.uniform(5, 50))
            engine.score([p])
            engine.add_labels([label(p, (p.amount > 25) == large_is_fraud, T0 + i * MINUTE)])
            i += 1
    engine.score([pay(i, T0 + i * MINUTE)])
    assert engine.drifts >= 1
    assert engine.model.labels_learned < i  # the reaction restarted the learners


def test_restored_checkpoint_scores_exactly_like_the_uninterrupted_engine() -> None:
    rng = random.Random(7)
    stream = []
    for i in range(400):
        amount = rng.choice([rng.uniform(5, 60), rng.uniform(300, 900)])
        stream.append(pay(i, T0 + i * 10 * MINUTE, amount=amount, card_id=f"c{i % 17}"))
    labels = [label(p, p.amount > 250, p.ts + HOUR) for p in stream]

    def run(engine: FraudEngine, payments: list[PaymentEvent]) -> list[float]:
        scores = []
        for p in payments:
            engine.add_labels(lb for lb in labels if lb.txn_id == p.event_id)
            scores.extend(s.score.score for s in engine.score([p]))
        return scores

    uninterrupted = FraudEngine(label_apply_delay_ms=0)
    expected = run(uninterrupted, stream)
    first = FraudEngine(label_apply_delay_ms=0)
    head = run(first, stream[:250])
    restored = FraudEngine.from_checkpoint(first.to_checkpoint())
    tail = run(restored, stream[250:])
    assert head + tail == expected
    assert restored.model.is_warm and restored.model_version == uninterrupted.model_version


def test_checkpoint_format_is_versioned() -> None:
    blob = FraudEngine().to_checkpoint()
    with pytest.raises(ValueError, match="checkpoint format"):
        FraudEngine.from_checkpoint(b"\x00\x01" + blob[2:])


def test_model_version_counts_learned_labels() -> None:
    model = FraudModel()
    assert model.version == f"{FraudModel.VERSION}@0"


def test_label_arriving_before_its_transaction_is_learned_once_the_payment_is_scored() -> None:
    engine = FraudEngine(label_apply_delay_ms=HOUR)
    early = pay(0, T0)
    # The label reaches the engine first (feeds are not ordered across topics) ...
    engine.add_labels([label(early, True, T0 + MINUTE)])
    # ... the payment is scored afterwards, then time passes the label's apply time.
    engine.score([early])
    assert engine.labels_applied == 0
    engine.score([pay(1, T0 + MINUTE + HOUR)])
    assert (engine.labels_applied, engine.model.frauds_learned, engine.labels_unknown) == (1, 1, 0)


def test_label_without_any_transaction_is_counted_not_fatal() -> None:
    engine = FraudEngine(label_apply_delay_ms=0)
    ghost = pay(99, T0)
    engine.add_labels([label(ghost, True, T0)])
    engine.score([pay(1, T0 + MINUTE)])
    assert (engine.labels_unknown, engine.labels_applied) == (1, 0)


def test_every_generator_currency_has_a_usd_rate() -> None:
    from infra.generator import COUNTRIES
    from models.fx import FX_RATES_VERSION, USD_PER_UNIT, load_rates

    assert {country.currency for country in COUNTRIES} <= set(USD_PER_UNIT)
    assert load_rates(FX_RATES_VERSION) == USD_PER_UNIT
    assert USD_PER_UNIT["USD"] == 1.0
