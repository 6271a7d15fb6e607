"""Online fraud scoring: event-time features, an incremental River model, rules and reasons.

Pieces, all pure Python (no Faust), so they test without a broker:

* :class:`PaymentFeatures` turns a payment into a feature dict using only what happened *up
  to* the payment's own event time (decayed velocities per card, user, device and merchant;
  amount against the user's history; cross-border mismatches; first-seen device/merchant;
  merchant fraud rate from labels already applied; time of day).
* :class:`FraudModel` = ``StandardScaler | LogisticRegression`` with the positive class
  weighted for the imbalanced stream, plus explicit rules (card testing, amount spike on a
  mismatched new device). The score is ``max(model, rules)``; reasons name the rules that
  fired and the features that pushed the logistic score up most.
* :class:`FraudEngine` keeps the feature vector each payment was scored with (bounded) and
  applies delayed labels in **event time**: a label known at ``L`` is learned once payments'
  event time passes ``L + label_apply_delay``. Scores therefore do not depend on how the
  payments and labels topics interleave on arrival, so a replay at any speed gives the same
  scores.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from river import compose, linear_model, optim, preprocessing

from models.decay import DecayedSum
from models.fx import to_usd
from schemas.events import FraudLabelEvent, PaymentEvent

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

#: Words a risk analyst reads, per feature that can push a score up.
FEATURE_REASONS: dict[str, str] = {
    "log_amount_usd": "large amount",
    "amount_vs_user_mean": "amount far above this customer's usual",
    "card_tx_1h": "many payments on this card in the last hour",
    "card_tx_1d": "many payments on this card today",
    "card_amount_1d": "high spend on this card today",
    "user_tx_1h": "many payments by this customer in the last hour",
    "device_tx_1h": "many payments from this device in the last hour",
    "merchant_fraud_rate": "merchant with recent confirmed fraud",
    "new_device": "first payment from this device",
    "new_merchant": "first payment at this merchant",
    "new_card_for_user": "card never used by this customer",
    "billing_ne_shipping": "billing and shipping countries differ",
    "ip_ne_billing": "IP country differs from billing country",
    "night": "payment at night (00-06 UTC)",
    "weekend": "weekend payment",
    "cross_border": "shipping to another country than the IP's",
}


@dataclass(slots=True)
class _EntityState:
    tx_1h: DecayedSum = DecayedSum(0.0, 0)
    tx_1d: DecayedSum = DecayedSum(0.0, 0)
    amount_1d: DecayedSum = DecayedSum(0.0, 0)
    small_10m: DecayedSum = DecayedSum(0.0, 0)
    count: int = 0
    mean_usd: float = 0.0
    last_ts: int = 0
    seen: set[str] = field(default_factory=set)


class _BoundedStates(OrderedDict[str, _EntityState]):
    """Per-entity state with LRU eviction, so memory stays bounded with millions of keys."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def get_state(self, key: str) -> _EntityState:
        state = self.get(key)
        if state is None:
            state = self[key] = _EntityState()
            if len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return state


class PaymentFeatures:
    """Event-time feature extraction; ``extract`` reads state, ``update`` folds the payment in."""

    SMALL_USD = 2.0

    def __init__(self, max_entities: int = 500_000) -> None:
        self.cards = _BoundedStates(max_entities)
        self.users = _BoundedStates(max_entities)
        self.devices = _BoundedStates(max_entities)
        self.merchants = _BoundedStates(max_entities)
        #: merchant -> (decayed fraud labels, decayed labels), from labels already applied.
        self.merchant_labels: dict[str, tuple[DecayedSum, DecayedSum]] = {}

    def extract(self, payment: PaymentEvent) -> dict[str, float]:
        ts = payment.ts
        amount_usd = to_usd(payment.amount, payment.currency) or payment.amount
        card = self.cards.get_state(payment.card_id)
        user = self.users.get_state(payment.user_id)
        device = self.devices.get_state(payment.device_id or "-")
        fraud, total = self.merchant_labels.get(
            payment.merchant_id, (DecayedSum.empty(), DecayedSum.empty())
        )
        labels = total.value_at(ts, 7 * DAY_MS)
        hour = (ts // HOUR_MS) % 24
        weekday = (ts // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; 5, 6 = Sat, Sun
        return {
            "log_amount_usd": math.log1p(amount_usd),
            "amount_vs_user_mean": (
                math.log((amount_usd + 1) / (user.mean_usd + 1)) if user.count else 0.0
            ),
            "card_tx_1h": card.tx_1h.value_at(ts, HOUR_MS),
            "card_tx_1d": card.tx_1d.value_at(ts, DAY_MS),
            "card_amount_1d": math.log1p(card.amount_1d.value_at(ts, DAY_MS)),
            "card_small_10m": card.small_10m.value_at(ts, 10 * 60_000),
            "user_tx_1h": user.tx_1h.value_at(ts, HOUR_MS),
            "device_tx_1h": device.tx_1h.value_at(ts, HOUR_MS) if payment.device_id else 0.0,
            "merchant_fraud_rate": ((fraud.value_at(ts, 7 * DAY_MS) + 0.01) / (labels + 1.0)),
            "new_device": float(
                user.count > 0 and bool(payment.device_id) and payment.device_id not in user.seen
            ),
            "new_merchant": float(user.count > 0 and ("m:" + payment.merchant_id) not in user.seen),
            "new_card_for_user": float(
                user.count > 0 and ("c:" + payment.card_id) not in user.seen
            ),
            "billing_ne_shipping": float(
                bool(payment.billing_country and payment.shipping_country)
                and payment.billing_country != payment.shipping_country
            ),
            "ip_ne_billing": float(
                bool(payment.ip_country and payment.billing_country)
                and payment.ip_country != payment.billing_country
            ),
            "cross_border": float(
                bool(payment.ip_country and payment.shipping_country)
                and payment.ip_country != payment.shipping_country
            ),
            "night": float(hour < 6),
            "weekend": float(weekday >= 5),
            "hour_sin": math.sin(2 * math.pi * hour / 24),
            "hour_cos": math.cos(2 * math.pi * hour / 24),
        }

    def update(self, payment: PaymentEvent) -> None:
        ts = payment.ts
        amount_usd = to_usd(payment.amount, payment.currency) or payment.amount
        small = 1.0 if amount_usd <= self.SMALL_USD else 0.0
        for state in (
            self.cards.get_state(payment.card_id),
            self.users.get_state(payment.user_id),
            self.devices.get_state(payment.device_id or "-"),
            self.merchants.get_state(payment.merchant_id),
        ):
            state.tx_1h = state.tx_1h.add(1.0, ts, HOUR_MS)
            state.tx_1d = state.tx_1d.add(1.0, ts, DAY_MS)
            state.amount_1d = state.amount_1d.add(amount_usd, ts, DAY_MS)
            state.small_10m = state.small_10m.add(small, ts, 10 * 60_000)
            state.count += 1
            state.mean_usd += (amount_usd - state.mean_usd) / state.count
            state.last_ts = max(state.last_ts, ts)
        user = self.users.get_state(payment.user_id)
        for token in (payment.device_id, "m:" + payment.merchant_id, "c:" + payment.card_id):
            if token and len(user.seen) < 256:
                user.seen.add(token)

    def learn_label(self, merchant_id: str, is_fraud: bool, ts: int) -> None:
        fraud, total = self.merchant_labels.get(
            merchant_id, (DecayedSum.empty(), DecayedSum.empty())
        )
        self.merchant_labels[merchant_id] = (
            fraud.add(1.0 if is_fraud else 0.0, ts, 7 * DAY_MS),
            total.add(1.0, ts, 7 * DAY_MS),
        )


@dataclass(frozen=True, slots=True)
class Score:
    score: float
    model_score: float
    reasons: list[str]
    #: The model that produced the score: its kind and how many labels it had learned.
    model_version: str = ""


class FraudModel:
    """``StandardScaler | LogisticRegression`` plus rules; see the module docstring."""

    VERSION = "lr-rules-v1"

    def __init__(
        self,
        positive_weight: float = 10.0,
        learning_rate: float = 0.05,
        min_labels: int = 50,
        min_frauds: int = 1,
    ) -> None:
        #: The model's score is used only once it has learned this much; before that, an
        #: untrained regression scores unfamiliar payments near 0.5 and would raise noise.
        self.min_labels = min_labels
        self.min_frauds = min_frauds
        self.frauds_learned = 0
        self.pipeline = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(
                optimizer=optim.SGD(learning_rate),
                loss=optim.losses.Log(weight_pos=positive_weight, weight_neg=1.0),
            ),
        )
        self.labels_learned = 0

    def score(self, x: dict[str, float]) -> Score:
        model_score = (
            float(self.pipeline.predict_proba_one(x).get(True, 0.0)) if self.is_warm else 0.0
        )
        reasons: list[str] = []
        rule_score = 0.0
        # Decayed counts: three tiny charges within a few minutes sum to about 2.9.
        if x["card_small_10m"] >= 2.5 and x["log_amount_usd"] > math.log1p(100):
            rule_score = max(rule_score, 0.95)
            reasons.append("card testing: several tiny charges then a large one on this card")
        elif x["card_small_10m"] >= 4.5:
            rule_score = max(rule_score, 0.85)
            reasons.append("card testing: burst of tiny authorisations on this card")
        if x["amount_vs_user_mean"] > math.log(8) and x["new_device"] and x["ip_ne_billing"]:
            rule_score = max(rule_score, 0.9)
            reasons.append("amount spike from a new device in another country")
        if self.is_warm and model_score >= 0.5:
            reasons.extend(self._top_contributions(x))
        return Score(
            round(max(model_score, rule_score), 6),
            round(model_score, 6),
            reasons[:4],
            f"{self.VERSION}@{self.labels_learned}",
        )

    def _top_contributions(self, x: dict[str, float], n: int = 3) -> list[str]:
        scaler = self.pipeline["StandardScaler"]
        regression = self.pipeline["LogisticRegression"]
        scaled = scaler.transform_one(x)
        contributions = {
            name: regression.weights.get(name, 0.0) * value for name, value in scaled.items()
        }
        ranked = sorted(contributions.items(), key=lambda kv: -kv[1])
        return [FEATURE_REASONS[name] for name, c in ranked if c > 0.5 and name in FEATURE_REASONS][
            :n
        ]

    @property
    def is_warm(self) -> bool:
        return self.labels_learned >= self.min_labels and self.frauds_learned >= self.min_frauds

    def learn(self, x: dict[str, float], is_fraud: bool) -> None:
        self.pipeline.learn_one(x, is_fraud)
        self.labels_learned += 1
        self.frauds_learned += int(is_fraud)


@dataclass(order=True, slots=True)
class _PendingLabel:
    apply_at: int
    seq: int
    label: FraudLabelEvent = field(compare=False)


@dataclass(slots=True)
class _Snapshot:
    ts: int
    merchant_id: str
    features: dict[str, float]
    score: Score
    learned: bool = False


@dataclass(frozen=True, slots=True)
class ScoredPayment:
    payment: PaymentEvent
    amount_usd: float
    score: Score
    is_alert: bool


class FraudEngine:
    """One partition's fraud scoring state: features, model, snapshots and pending labels.

    borderflow runs one engine per ``payments`` partition. Payments and labels are both keyed
    by user_id, so a transaction and its label share a partition number; the engine sees
    them in log order, which makes its scores independent of how many workers run and of
    how fast events arrive (see docs/architecture.md, "Fraud model per partition").
    """

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        label_apply_delay_ms: int = HOUR_MS,
        snapshot_ttl_ms: int = 60 * DAY_MS,
        max_snapshots: int = 500_000,
    ) -> None:
        self.threshold = threshold
        self.label_apply_delay_ms = label_apply_delay_ms
        self.snapshot_ttl_ms = snapshot_ttl_ms
        self.max_snapshots = max_snapshots
        self.features = PaymentFeatures()
        self.model = FraudModel()
        #: txn_id -> snapshot of how it was scored; kept after its label is learned (until
        #: the TTL) so that a redelivered payment or label changes nothing.
        self.snapshots: OrderedDict[str, _Snapshot] = OrderedDict()
        self._pending: list[_PendingLabel] = []
        self._seq = 0
        self.watermark_ms = 0
        #: Highest label time received: labels up to here are known to this engine.
        self.label_watermark_ms = 0
        self.labels_applied = 0
        self.labels_unknown = 0
        self.labels_duplicate = 0

    @property
    def model_version(self) -> str:
        return f"{FraudModel.VERSION}@{self.model.labels_learned}"

    def add_labels(self, labels: Iterable[FraudLabelEvent]) -> None:
        """Queue labels; each is learned when payments' event time passes its apply time."""
        for label in labels:
            self._seq += 1
            heapq.heappush(
                self._pending, _PendingLabel(label.ts + self.label_apply_delay_ms, self._seq, label)
            )
            self.label_watermark_ms = max(self.label_watermark_ms, label.ts)

    def labels_complete_for(self, ts_ms: int) -> bool:
        """True when every label that must be learned before scoring at ``ts_ms`` is here."""
        return self.label_watermark_ms + self.label_apply_delay_ms >= ts_ms

    def _apply_labels_until(self, ts_ms: int) -> None:
        while self._pending and self._pending[0].apply_at <= ts_ms:
            label = heapq.heappop(self._pending).label
            snapshot = self.snapshots.get(label.txn_id)
            if snapshot is None:
                self.labels_unknown += 1
                continue
            if snapshot.learned:
                self.labels_duplicate += 1
                continue
            snapshot.learned = True
            is_fraud = label.label == "fraud"
            self.model.learn(snapshot.features, is_fraud)
            self.features.learn_label(snapshot.merchant_id, is_fraud, label.ts)
            self.labels_applied += 1

    def score(self, payments: Iterable[PaymentEvent]) -> list[ScoredPayment]:
        """Score payments in the order given (the partition's log order).

        A payment seen before (a redelivery after a crash) gets its first score again and
        changes no state, so at-least-once delivery cannot skew velocities.
        """
        scored = []
        for payment in payments:
            amount_usd = to_usd(payment.amount, payment.currency) or 0.0
            previous = self.snapshots.get(payment.event_id)
            if previous is not None:
                score = previous.score
            else:
                self._apply_labels_until(payment.ts)
                self.watermark_ms = max(self.watermark_ms, payment.ts)
                x = self.features.extract(payment)
                score = self.model.score(x)
                self.features.update(payment)
                self.snapshots[payment.event_id] = _Snapshot(
                    payment.ts, payment.merchant_id, x, score
                )
            scored.append(ScoredPayment(payment, amount_usd, score, score.score >= self.threshold))
        self._expire_snapshots()
        return scored

    def _expire_snapshots(self) -> None:
        horizon = self.watermark_ms - self.snapshot_ttl_ms
        while self.snapshots:
            ts = next(iter(self.snapshots.values())).ts
            if ts >= horizon and len(self.snapshots) <= self.max_snapshots:
                break
            self.snapshots.popitem(last=False)

    @property
    def pending_labels(self) -> int:
        return len(self._pending)
