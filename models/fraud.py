"""Online fraud scoring: an ensemble that learns from delayed labels in event time.

Pieces, all pure Python (no Faust), so they test without a broker:

* :class:`models.fraud_features.PaymentFeatures` — event-time features with bounded memory.
* :class:`FraudModel` — the ensemble, chosen by measured cost (ARF costs 3.4 ms per event on
  the reference machine, so it is out):

  - a supervised learner for the imbalanced stream: ``StandardScaler | LogisticRegression``
    with the positive class weighted (about 56 us per event);
  - an unsupervised anomaly detector: ``HalfSpaceTrees`` on a few bounded features (it learns
    from every payment, labelled or not);
  - explicit rules: a tiny charge followed by a large one on the same card within a minute;
    a burst of tiny authorisations (card testing); an amount spike from a new device in
    another country;
  - a **calibrator**: an unweighted online logistic regression over the base outputs (the
    supervised logit, the anomaly score, the rule flags), trained on the same delayed labels,
    so the final score is a probability. Until it has learned enough, the score is the
    strongest rule (and nothing from the models, which would only add noise).

  Reasons name the rules that fired, the features that pushed the supervised score up most,
  and an unusual pattern when the anomaly detector says so.
* :class:`FraudEngine` — one partition's state: features, model, the feature snapshot each
  payment was scored with, pending labels, the alert policy and drift detection. A label known
  at ``L`` is learned once payments' event time passes ``L + label_apply_delay``; a payment
  without a label ``label_timeout`` after its time is learned as legitimate. Scores therefore
  never depend on arrival timing, and a replay at any speed gives the same scores.

>>> from schemas.events import PaymentEvent
>>> engine = FraudEngine()
>>> tiny = PaymentEvent(event_id="t1", ts=1767225600000, user_id="u", card_id="c",
...                     merchant_id="m", amount=1.0, currency="USD")
>>> big = tiny.model_copy(update={"event_id": "t2", "ts": 1767225630000, "amount": 700.0})
>>> [round(s.score.score, 2) for s in engine.score([tiny, big])]
[0.0, 0.95]
"""

from __future__ import annotations

import heapq
import logging
import math
import sys
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from river import anomaly, compose, drift, linear_model, optim, preprocessing, stats, tree

from models.checkpoint import Checkpointable
from models.fraud_features import DAY_MS, HOUR_MS, PaymentFeatures, pack, unpack, usd_amount
from schemas.events import FraudLabelEvent, PaymentEvent

__all__ = ["DAY_MS", "HOUR_MS", "FraudEngine", "FraudModel", "PaymentFeatures", "Score"]

log = logging.getLogger(__name__)

#: Words a risk analyst reads, per feature that can push a score up.
FEATURE_REASONS: dict[str, str] = {
    "log_amount_usd": "large amount",
    "amount_usd_100": "large amount",
    "amount_vs_user_mean": "amount far above this customer's usual",
    "amount_z_user": "amount far above this customer's usual",
    "amount_vs_card_mean": "amount far above this card's usual",
    "amount_z_card": "amount far above this card's usual",
    "card_tx_1h": "many payments on this card in the last hour",
    "card_tx_1d": "many payments on this card today",
    "card_amount_1d": "high spend on this card today",
    "user_tx_1h": "many payments by this customer in the last hour",
    "user_tx_1d": "many payments by this customer today",
    "device_tx_1h": "many payments from this device in the last hour",
    "ipc_tx_1h": "many payments from this IP country in the last hour",
    "merchant_fraud_rate_1d": "merchant with confirmed fraud in the last day",
    "merchant_fraud_rate_7d": "merchant with confirmed fraud in the last week",
    "merchant_fraud_rate_30d": "merchant with confirmed fraud in the last month",
    "new_device": "first payment from this device",
    "new_ip_country": "first payment from this IP country",
    "new_merchant": "first payment at this merchant",
    "new_card_for_user": "card never used by this customer",
    "billing_ne_shipping": "billing and shipping countries differ",
    "ip_ne_billing": "IP country differs from billing country",
    "cross_border": "shipping to another country than the IP's",
    "night": "payment at night (00-06 UTC)",
    "weekend": "weekend payment",
}

#: Features the anomaly detector sees, with the range it splits on.
ANOMALY_LIMITS: dict[Hashable, tuple[float, float]] = {
    "log_amount_usd": (0.0, 9.0),
    "amount_vs_user_mean": (-4.0, 4.0),
    "amount_vs_card_mean": (-4.0, 4.0),
    "card_tx_1h": (0.0, 10.0),
    "card_tx_1d": (0.0, 30.0),
    "user_tx_1d": (0.0, 30.0),
    "merchant_tx_1d": (0.0, 200.0),
    "hour_sin": (-1.0, 1.0),
    "hour_cos": (-1.0, 1.0),
}

RULES: dict[str, tuple[float, str]] = {
    "rule_tiny_then_large": (
        0.95, "card testing: a tiny charge then a large one on this card within a minute"
    ),
    "rule_card_testing_burst": (
        0.9, "card testing: several tiny charges then a large one on this card"
    ),
    "rule_tiny_burst": (0.85, "card testing: burst of tiny authorisations on this card"),
    "rule_spike_new_device_abroad": (0.9, "amount spike from a new device in another country"),
}  # fmt: skip


def fired_rules(x: dict[str, float]) -> dict[str, float]:
    """Rule name -> 1.0 / 0.0 for one feature vector (the rules are part of the snapshot)."""
    large = x["log_amount_usd"] > math.log1p(100)
    return {
        "rule_tiny_then_large": x["card_tiny_then_large_1m"],
        # Decayed counts: three tiny charges within a few minutes sum to about 2.9.
        "rule_card_testing_burst": float(x["card_small_10m"] >= 2.5 and large),
        "rule_tiny_burst": float(x["card_small_10m"] >= 4.5 and not large),
        "rule_spike_new_device_abroad": float(
            x["amount_vs_user_mean"] > math.log(8) and x["new_device"] and x["ip_ne_billing"]
        ),
    }


@dataclass(frozen=True, slots=True)
class Score:
    score: float
    model_score: float
    reasons: list[str]
    #: The model that produced the score: its kind and how many labels it had learned.
    model_version: str = ""
    #: Inputs of the calibrator, kept so the calibrator learns from exactly these later.
    base: dict[str, float] = field(default_factory=dict)


class FraudModel:
    """The ensemble; see the module docstring."""

    VERSION = "ensemble-v3"
    #: How far (in logits) the anomaly score may move a payment: a nudge, because on its own
    #: an unsupervised detector ranks fraud far worse than the supervised learners.
    ANOMALY_NUDGE = 0.5

    def __init__(
        self,
        *,
        positive_weight: float = 3.0,
        learning_rate: float = 0.005,
        min_labels: int = 50,
        min_frauds: int = 1,
        seed: int = 42,
    ) -> None:
        self.positive_weight = positive_weight
        self.learning_rate = learning_rate
        self.seed = seed
        self.linear = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(
                optimizer=optim.SGD(learning_rate),
                loss=optim.losses.Log(weight_pos=positive_weight, weight_neg=1.0),
            ),
        )
        # A tree captures thresholds and interactions a linear model cannot (an amount above
        # a level, a risky merchant *and* a new card); averaging both is steadier than either.
        self.tree = tree.HoeffdingTreeClassifier(grace_period=100)
        self.anomaly = anomaly.HalfSpaceTrees(
            n_trees=10, height=6, window_size=250, limits=dict(ANOMALY_LIMITS), seed=seed
        )
        #: Platt scaling of the combined logit: monotone, so it calibrates without reordering.
        self.platt_slope = 1.0
        self.platt_intercept = 0.0
        #: Models are used only once they have learned this much; before that an untrained
        #: learner scores unfamiliar payments near 0.5 and would raise noise.
        self.min_labels = min_labels
        self.min_frauds = min_frauds
        self.labels_learned = 0
        self.frauds_learned = 0

    @property
    def is_warm(self) -> bool:
        return self.labels_learned >= self.min_labels and self.frauds_learned >= self.min_frauds

    @property
    def version(self) -> str:
        return f"{self.VERSION}@{self.labels_learned}"

    def supervised_probability(self, x: dict[str, float]) -> float:
        linear = float(self.linear.predict_proba_one(x).get(True, 0.0))
        tree_p = float(self.tree.predict_proba_one(x).get(True, 0.0))
        return 0.5 * (linear + tree_p)

    def _calibrate(self, z: float) -> float:
        return _sigmoid(self.platt_slope * z + self.platt_intercept)

    def score(self, x: dict[str, float]) -> Score:
        rules = fired_rules(x)
        anomaly_score = float(self.anomaly.score_one(_anomaly_view(x)))
        self.anomaly.learn_one(_anomaly_view(x))
        supervised = self.supervised_probability(x) if self.is_warm else 0.0
        z = _logit(supervised) + self.ANOMALY_NUDGE * (anomaly_score - 0.5)
        base = {"z": z, "anomaly": anomaly_score, **rules}
        rule_score = max((RULES[name][0] for name, on in rules.items() if on), default=0.0)
        score = max(self._calibrate(z), rule_score) if self.is_warm else rule_score
        reasons = [RULES[name][1] for name, on in rules.items() if on]
        if self.is_warm and score >= 0.5:
            reasons.extend(r for r in self._top_contributions(x) if r not in reasons)
            if anomaly_score >= 0.8:
                reasons.append("unusual combination of amount, velocity and time for this card")
        return Score(round(score, 6), round(supervised, 6), reasons[:4], self.version, base)

    def _top_contributions(self, x: dict[str, float], n: int = 3) -> list[str]:
        scaler = self.linear["StandardScaler"]
        regression = self.linear["LogisticRegression"]
        scaled = scaler.transform_one(x)
        contributions = {
            name: regression.weights.get(name, 0.0) * value for name, value in scaled.items()
        }
        ranked = sorted(contributions.items(), key=lambda kv: -kv[1])
        strongest = ranked[0][1] if ranked else 0.0
        reasons: list[str] = []
        for name, contribution in ranked:
            # The features that pushed hardest: positive, and at least a quarter of the top.
            if contribution <= 0 or contribution < 0.25 * strongest or len(reasons) >= n:
                break
            reason = FEATURE_REASONS.get(name)
            if reason and reason not in reasons:
                reasons.append(reason)
        return reasons

    def learn(self, x: dict[str, float], base: dict[str, float], is_fraud: bool) -> float:
        """Learn one label; returns the supervised error before learning (for drift)."""
        predicted = self.supervised_probability(x)
        self.linear.learn_one(x, is_fraud)
        self.tree.learn_one(x, is_fraud)
        if "z" in base:
            # One SGD step of Platt scaling on the logit the payment was scored with.
            error = self._calibrate(base["z"]) - float(is_fraud)
            self.platt_slope = max(0.05, self.platt_slope - 0.01 * error * base["z"])
            self.platt_intercept -= 0.01 * error
        self.labels_learned += 1
        self.frauds_learned += int(is_fraud)
        return abs(float(is_fraud) - predicted)

    def reset_supervised(self) -> None:
        """Forget the supervised learners (a drift reaction); rules and detector stay."""
        fresh = FraudModel(
            positive_weight=self.positive_weight,
            learning_rate=self.learning_rate,
            min_labels=self.min_labels,
            min_frauds=self.min_frauds,
            seed=self.seed,
        )
        self.linear, self.tree = fresh.linear, fresh.tree
        self.platt_slope, self.platt_intercept = 1.0, 0.0
        self.labels_learned = 0
        self.frauds_learned = 0


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _anomaly_view(x: dict[str, float]) -> dict[str, float]:
    return {str(name): x.get(str(name), 0.0) for name in ANOMALY_LIMITS}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclass(order=True, slots=True)
class _PendingLabel:
    apply_at: int
    seq: int
    label: FraudLabelEvent = field(compare=False)


@dataclass(slots=True)
class _Snapshot:
    ts: int
    merchant_id: str
    #: The feature vector it was scored with, packed (see fraud_features.pack).
    features: bytes
    score: Score
    learned: bool = False
    #: Offset of the payment in the engine's payments partition when first scored (None:
    #: unknown, scored without one or restored from an image older than offsets).
    offset: int | None = None
    #: The payment's user, so that :meth:`FraudEngine.forget_user` finds the user's
    #: snapshots ("" in images from before it was kept).
    user_id: str = ""

    def __setstate__(self, state: Any) -> None:
        # Images from before ``offset`` / ``user_id`` existed lack them: unknown.
        self.offset = None
        self.user_id = ""
        slots = state[1] if isinstance(state, tuple) else state
        for name, value in (slots or {}).items():
            setattr(self, name, value)


@dataclass(frozen=True, slots=True)
class LabelRepeat:
    """A label event the engine had received before (see :meth:`FraudEngine.add_labels`)."""

    #: Offset it was first received at (None when unknown).
    first_offset: int | None


@dataclass(frozen=True, slots=True)
class ScoredPayment:
    payment: PaymentEvent
    amount_usd: float
    score: Score
    is_alert: bool
    threshold: float
    #: The payment had been scored before: this is its first score again, no state changed.
    repeat: bool = False
    #: For a repeat: the offset it was first scored at (None when unknown).
    first_offset: int | None = None


class AlertPolicy:
    """Decides the alert threshold, in event time, from a named policy.

    * ``fixed``: alert when score >= ``threshold``;
    * ``alert_rate``: alert on about ``target`` of payments: the threshold follows the running
      (1 - target) quantile of scores, never below ``threshold_floor``;
    * ``precision``: the lowest threshold whose precision on recently labelled payments is at
      least ``target`` (recomputed every 100 labels), never below ``threshold_floor``.

    ``daily_budget`` (optional) caps alerts per event-time day.
    """

    def __init__(
        self,
        kind: str = "fixed",
        *,
        threshold: float = 0.8,
        target: float = 0.01,
        threshold_floor: float = 0.5,
        daily_budget: int | None = None,
    ) -> None:
        if kind not in ("fixed", "alert_rate", "precision"):
            raise ValueError(f"unknown alert policy {kind!r}")
        self.kind = kind
        self.fixed = threshold
        self.target = target
        self.floor = threshold_floor
        self.daily_budget = daily_budget
        self._quantile = stats.Quantile(1 - target) if kind == "alert_rate" else None
        self._labelled: deque[tuple[float, bool]] = deque(maxlen=5000)
        self._precision_threshold = threshold
        self._since_refresh = 0
        self._day = -1
        self._alerts_today = 0

    @property
    def threshold(self) -> float:
        if self.kind == "alert_rate" and self._quantile is not None:
            value = self._quantile.get()
            return max(self.floor, value) if value is not None else self.fixed
        if self.kind == "precision":
            return self._precision_threshold
        return self.fixed

    def decide(self, score: float, ts_ms: int) -> tuple[bool, float]:
        threshold = self.threshold
        if self._quantile is not None:
            self._quantile.update(score)
        day = ts_ms // DAY_MS
        if day != self._day:
            self._day, self._alerts_today = day, 0
        alert = score >= threshold
        if alert and self.daily_budget is not None and self._alerts_today >= self.daily_budget:
            alert = False
        self._alerts_today += int(alert)
        return alert, threshold

    def observe_label(self, score: float, is_fraud: bool) -> None:
        if self.kind != "precision":
            return
        self._labelled.append((score, is_fraud))
        self._since_refresh += 1
        if self._since_refresh >= 100:
            self._since_refresh = 0
            self._precision_threshold = self._lowest_threshold_meeting_target()

    def _lowest_threshold_meeting_target(self) -> float:
        ranked = sorted(self._labelled, key=lambda pair: -pair[0])
        best = 1.0
        true_positives = 0
        for i, (score, is_fraud) in enumerate(ranked, start=1):
            true_positives += int(is_fraud)
            if score >= self.floor and true_positives / i >= self.target:
                best = score
        return max(best, self.floor)


class FraudEngine(Checkpointable):
    """One partition's fraud scoring state (see the module docstring)."""

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        policy: AlertPolicy | None = None,
        label_apply_delay_ms: int = HOUR_MS,
        label_timeout_ms: int = 30 * DAY_MS,
        snapshot_ttl_ms: int = 60 * DAY_MS,
        max_snapshots: int = 500_000,
        drift_reaction: str = "log",
    ) -> None:
        self.policy = policy or AlertPolicy("fixed", threshold=threshold)
        self.label_apply_delay_ms = label_apply_delay_ms
        self.label_timeout_ms = label_timeout_ms
        self.snapshot_ttl_ms = max(snapshot_ttl_ms, label_timeout_ms)
        self.max_snapshots = max_snapshots
        if drift_reaction not in ("log", "reset"):
            raise ValueError(f"unknown drift reaction {drift_reaction!r}")
        self.drift_reaction = drift_reaction
        self.features = PaymentFeatures()
        self.model = FraudModel()
        # A small delta: the error stream is bursty (frauds arrive in campaigns), and only a
        # lasting change in the error level should count as drift.
        self.drift = drift.ADWIN(delta=1e-4)
        #: txn_id -> how it was scored; kept after its label is learned (until the TTL) so
        #: that a redelivered payment or label changes nothing.
        self.snapshots: OrderedDict[str, _Snapshot] = OrderedDict()
        #: label event_id -> (offset in the partition's label stream, None if unknown; label
        #: time) of the labels received (until the snapshot TTL), so a label event sent again
        #: is not queued twice and the agent can tell a replay from a duplicate.
        self.label_events: OrderedDict[str, tuple[int | None, int]] = OrderedDict()
        #: (payment ts, txn_id) in scoring order: payments still waiting for a label or for
        #: the label timeout (an index into ``snapshots``, so the timeout check is O(1)).
        self._awaiting_label: deque[tuple[int, str]] = deque()
        self._pending: list[_PendingLabel] = []
        self._seq = 0
        self.watermark_ms = 0
        #: Highest label time received: labels up to here are known to this engine.
        self.label_watermark_ms = 0
        self.labels_applied = 0
        self.labels_unknown = 0
        self.labels_duplicate = 0
        self.labels_timed_out = 0
        self.drifts = 0

    @property
    def threshold(self) -> float:
        return self.policy.threshold

    @property
    def model_version(self) -> str:
        return self.model.version

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Images from before label events were remembered lack ``label_events``.
        state.setdefault("label_events", OrderedDict())
        self.__dict__.update(state)

    def add_labels(
        self, labels: Iterable[FraudLabelEvent], offsets: Iterable[int] | None = None
    ) -> list[LabelRepeat | None]:
        """Queue labels; each is learned when payments' event time passes its apply time.

        ``offsets``: each label's offset in the partition's label stream. A label event
        received before (same event id) is not queued again; for each label the result holds
        None (new, queued) or a :class:`LabelRepeat` saying where it was first received. A
        *relabel* (another event id for the same transaction) is a new label.
        """
        known = self.label_events
        offset_list = list(offsets) if offsets is not None else None
        result: list[LabelRepeat | None] = []
        for i, label in enumerate(labels):
            offset = offset_list[i] if offset_list is not None else None
            first = known.get(label.event_id)
            if first is not None:
                result.append(LabelRepeat(first[0]))
                continue
            known[label.event_id] = (offset, label.ts)
            self._seq += 1
            heapq.heappush(
                self._pending, _PendingLabel(label.ts + self.label_apply_delay_ms, self._seq, label)
            )
            self.label_watermark_ms = max(self.label_watermark_ms, label.ts)
            result.append(None)
        self._expire_label_events()
        return result

    def _expire_label_events(self) -> None:
        horizon = self.watermark_ms - self.snapshot_ttl_ms
        known = self.label_events
        while known:
            _, ts = next(iter(known.values()))
            if ts >= horizon and len(known) <= self.max_snapshots:
                break
            known.popitem(last=False)

    def labels_complete_for(self, ts_ms: int) -> bool:
        """True when every label that must be learned before scoring at ``ts_ms`` is here."""
        return self.label_watermark_ms + self.label_apply_delay_ms >= ts_ms

    def _learn(self, snapshot: _Snapshot, is_fraud: bool, label_ts: int) -> None:
        snapshot.learned = True
        error = self.model.learn(unpack(snapshot.features), snapshot.score.base, is_fraud)
        self.features.learn_label(snapshot.merchant_id, is_fraud, label_ts)
        self.policy.observe_label(snapshot.score.score, is_fraud)
        self.drift.update(error)
        if self.drift.drift_detected:
            self.drifts += 1
            log.warning(
                "fraud model drift detected (error mean %.3f, %d labels learned); reaction: %s",
                self.drift.estimation, self.model.labels_learned, self.drift_reaction,
            )  # fmt: skip
            if self.drift_reaction == "reset":
                self.model.reset_supervised()

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
            self._learn(snapshot, label.label == "fraud", label.ts)
            self.labels_applied += 1
        # No label after the timeout: learned as legitimate (most payments never get one).
        horizon = ts_ms - self.label_timeout_ms
        awaiting = self._awaiting_label
        while awaiting and awaiting[0][0] <= horizon:
            _, txn_id = awaiting.popleft()
            snapshot = self.snapshots.get(txn_id)
            if snapshot is not None and not snapshot.learned:
                self._learn(snapshot, False, snapshot.ts + self.label_timeout_ms)
                self.labels_timed_out += 1

    def score(
        self, payments: Iterable[PaymentEvent], offsets: Iterable[int] | None = None
    ) -> list[ScoredPayment]:
        """Score payments in the order given (the partition's log order).

        A payment seen before (a redelivery after a crash, or the same event sent twice) gets
        its first score again and changes no state, so at-least-once delivery cannot skew
        velocities; it is marked ``repeat``, with the offset it was first scored at (from
        ``offsets``, each payment's offset in the partition, when given).
        """
        scored = []
        offset_list = list(offsets) if offsets is not None else None
        for i, payment in enumerate(payments):
            offset = offset_list[i] if offset_list is not None else None
            amount_usd = usd_amount(payment)
            previous = self.snapshots.get(payment.event_id)
            if previous is not None:
                alert = previous.score.score >= self.threshold
                scored.append(
                    ScoredPayment(
                        payment, amount_usd, previous.score, alert, self.threshold,
                        repeat=True, first_offset=previous.offset,
                    )
                )  # fmt: skip
                continue
            self._apply_labels_until(payment.ts)
            self.watermark_ms = max(self.watermark_ms, payment.ts)
            x = self.features.extract(payment)
            score = self.model.score(x)
            self.features.update(payment)
            self.snapshots[payment.event_id] = _Snapshot(
                payment.ts, payment.merchant_id, pack(x), score, offset=offset,
                user_id=sys.intern(payment.user_id),  # one string per user, however many
            )  # fmt: skip
            self._awaiting_label.append((payment.ts, payment.event_id))
            alert, threshold = self.policy.decide(score.score, payment.ts)
            scored.append(ScoredPayment(payment, amount_usd, score, alert, threshold))
        self._expire_snapshots()
        return scored

    def _expire_snapshots(self) -> None:
        horizon = self.watermark_ms - self.snapshot_ttl_ms
        while self.snapshots:
            oldest = next(iter(self.snapshots.values()))
            if oldest.ts >= horizon and len(self.snapshots) <= self.max_snapshots:
                break
            self.snapshots.popitem(last=False)
        self._expire_label_events()

    def forget_user(self, user_id: str) -> dict[str, int]:
        """Erase what this engine holds about one user (``borderflow forget``).

        Removed: the user's velocity state and that of the cards and devices the user paid
        with (:meth:`PaymentFeatures.forget_user`), the feature snapshots of the user's
        payments (with their place in the label-timeout queue) and the user's queued labels.
        What the model and the merchant statistics learned from them is aggregate and stays
        (nothing in it names the user). Returns counts per kind.
        """
        removed = self.features.forget_user(user_id)
        txn_ids = {txn for txn, snap in self.snapshots.items() if snap.user_id == user_id}
        for txn_id in txn_ids:
            del self.snapshots[txn_id]
        if txn_ids:
            self._awaiting_label = deque(
                entry for entry in self._awaiting_label if entry[1] not in txn_ids
            )
        kept = [
            pending
            for pending in self._pending
            if pending.label.user_id != user_id and pending.label.txn_id not in txn_ids
        ]
        removed_labels = len(self._pending) - len(kept)
        if removed_labels:
            heapq.heapify(kept)
            self._pending = kept
        removed["snapshots"] = len(txn_ids)
        removed["pending_labels"] = removed_labels
        return removed

    @property
    def pending_labels(self) -> int:
        return len(self._pending)

    #: Checkpoint images (models.checkpoint): format 2 since the ensemble model.
    CHECKPOINT_FORMAT = 2

    def stats(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "labels_applied": self.labels_applied,
            "labels_timed_out": self.labels_timed_out,
            "labels_unknown": self.labels_unknown,
            "labels_duplicate": self.labels_duplicate,
            "pending_labels": self.pending_labels,
            "snapshots": len(self.snapshots),
            "drifts": self.drifts,
            "threshold": self.threshold,
            "watermark_ms": self.watermark_ms,
        }
