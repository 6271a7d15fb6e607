"""models.evaluation: hand-computed cases, ties, degenerate inputs, and brute-force references.

scikit-learn is not a dependency, so every metric is checked against a slow, obviously
correct re-statement of its definition (pairwise AUC, threshold-by-threshold AP, a dict-based
Card Precision@k) and, where river is exact, against river.metrics.
"""

from __future__ import annotations

import doctest
import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import metrics as river_metrics

import models.evaluation as evaluation
from models.evaluation import (
    alert_metrics,
    average_precision,
    card_precision_at_k,
    roc_auc,
)

# --------------------------------------------------------------------------------------------
# Brute-force references (definitions, quadratic or dict-based on purpose)
# --------------------------------------------------------------------------------------------


def pairwise_auc(y: list[int], s: list[float]) -> float:
    pos = [sc for label, sc in zip(y, s, strict=True) if label]
    neg = [sc for label, sc in zip(y, s, strict=True) if not label]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def threshold_ap(y: list[int], s: list[float]) -> float:
    """sum_n (R_n - R_{n-1}) P_n, one threshold per distinct score, highest first."""
    n_pos = sum(y)
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        flagged = [label for label, sc in zip(y, s, strict=True) if sc >= t]
        recall = sum(flagged) / n_pos
        ap += (recall - last_recall) * (sum(flagged) / len(flagged))
        last_recall = recall
    return ap


def reference_cp(
    days: list[int],
    cards: list[str],
    y: list[int],
    s: list[float],
    k: int,
    remove_detected: bool = False,
) -> list[float]:
    """Per-day CP@k from the definition; each card enters the top k with its expected share."""
    per_day: dict[int, dict[str, tuple[float, int]]] = defaultdict(dict)
    for day, card, label, score in zip(days, cards, y, s, strict=True):
        old_score, old_fraud = per_day[day].get(card, (-math.inf, 0))
        per_day[day][card] = (max(old_score, score), max(old_fraud, label))
    detected: set[str] = set()
    values = []
    for day in sorted(per_day):
        ranked = {c: v for c, v in per_day[day].items() if c not in detected}
        if not ranked:
            values.append(0.0)
            continue
        top = min(k, len(ranked))
        kth = sorted((score for score, _ in ranked.values()), reverse=True)[top - 1]
        above = [c for c, (score, _) in ranked.items() if score > kth]
        tied = [c for c, (score, _) in ranked.items() if score == kth]
        share = (top - len(above)) / len(tied)
        hits = sum(ranked[c][1] for c in above) + share * sum(ranked[c][1] for c in tied)
        values.append(hits / top)
        if remove_detected:
            sure = above + tied if share == 1 else above
            detected.update(c for c in sure if ranked[c][1])
    return values


# Small score alphabets make ties frequent, which is where implementations go wrong.
labels_and_scores = st.integers(min_value=1, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=n, max_size=n)
        | st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=n, max_size=n),
    )
)


# --------------------------------------------------------------------------------------------
# Doctests
# --------------------------------------------------------------------------------------------


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(evaluation, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10
    assert result.failed == 0


# --------------------------------------------------------------------------------------------
# AUC ROC
# --------------------------------------------------------------------------------------------


def test_auc_hand_computed() -> None:
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) two wins -> 3/4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.2, 0.9]) == 0.0


def test_auc_ties_count_one_half() -> None:
    # pos {0.5, 0.9}, neg {0.5, 0.2}: 0.5 + 1 + 1 + 1 = 3.5 of 4 pairs.
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


@pytest.mark.parametrize("y", [[], [0, 0, 0], [1, 1], [True]])
def test_auc_is_nan_without_both_classes(y: list[int]) -> None:
    assert math.isnan(roc_auc(y, [0.5] * len(y)))


@settings(max_examples=300, deadline=None)
@given(labels_and_scores)
def test_auc_equals_pairwise_brute_force(data: tuple[list[int], list[float]]) -> None:
    y, s = data
    if 0 < sum(y) < len(y):
        assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)
    else:
        assert math.isnan(roc_auc(y, s))


@settings(max_examples=300, deadline=None)
@given(labels_and_scores)
def test_auc_of_negated_scores_is_the_complement(data: tuple[list[int], list[float]]) -> None:
    y, s = data
    if not 0 < sum(y) < len(y):
        return  # degenerate input: covered by test_auc_is_nan_without_both_classes
    assert roc_auc(y, s) == pytest.approx(1 - roc_auc(y, [-v for v in s]), abs=1e-12)


def test_auc_matches_river_on_distinct_scores() -> None:
    # river's RollingROCAUC is exact when its window holds every sample and no scores tie
    # (it does not give ties half credit, so tied data is compared with pairwise_auc above).
    rng = np.random.default_rng(7)
    y = rng.random(500) < 0.2
    s = rng.random(500)
    river_auc = river_metrics.RollingROCAUC(window_size=10_000)
    for label, score in zip(y.tolist(), s.tolist(), strict=True):
        river_auc.update(label, score)
    assert roc_auc(y, s) == pytest.approx(river_auc.get(), abs=1e-12)


def test_auc_does_not_depend_on_input_order_or_monotone_transforms() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(2_000) < 0.1
    s = rng.integers(0, 20, 2_000) / 20  # many ties
    perm = rng.permutation(y.size)
    assert roc_auc(y, s) == roc_auc(y[perm], s[perm])
    assert roc_auc(y, s) == roc_auc(y, np.exp(3 * s) - 7)


# --------------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------------


def test_ap_hand_computed() -> None:
    # Thresholds 0.8 (P=1, R=1/2), 0.4 (P=1/2, R=1/2), 0.35 (P=2/3, R=1), 0.1.
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)
    # The only fraud ranked last of three: one step of recall 1 at precision 1/3.
    assert average_precision([1, 0, 0], [0.1, 0.5, 0.9]) == pytest.approx(1 / 3)


def test_ap_of_a_perfect_ranking_is_one() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    assert average_precision(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.0]) == 1.0
    assert average_precision([1, 1], [0.1, 0.2]) == 1.0  # positives only


def test_ap_groups_tied_scores_into_one_threshold() -> None:
    # Fraud and legit tied at the top enter together (precision 1/2), in either order.
    assert average_precision([1, 0, 1], [0.9, 0.9, 0.1]) == pytest.approx(7 / 12)
    assert average_precision([0, 1, 1], [0.9, 0.9, 0.1]) == pytest.approx(7 / 12)
    assert average_precision([1, 0], [0.5, 0.5]) == 0.5


@pytest.mark.parametrize("y", [[], [0], [0, 0, 0]])
def test_ap_is_nan_without_positives(y: list[int]) -> None:
    assert math.isnan(average_precision(y, [0.5] * len(y)))


@settings(max_examples=300, deadline=None)
@given(labels_and_scores)
def test_ap_equals_threshold_brute_force(data: tuple[list[int], list[float]]) -> None:
    y, s = data
    if sum(y):
        assert average_precision(y, s) == pytest.approx(threshold_ap(y, s), abs=1e-12)
    else:
        assert math.isnan(average_precision(y, s))


# --------------------------------------------------------------------------------------------
# Card Precision@k
# --------------------------------------------------------------------------------------------


def test_cp_uses_each_cards_max_score_and_any_fraud_of_the_day() -> None:
    # Day 1: card a = max(0.9 legit, 0.2 fraud) -> 0.9, compromised; b 0.5; c 0.1.
    # Top 2 = {a, b}: 1/2. Day 2: b 0.8 fraud, a 0.3 -> top 2 = {b, a}: 1/2.
    cp = card_precision_at_k(
        days=[1, 1, 1, 1, 2, 2],
        cards=["a", "a", "b", "c", "a", "b"],
        y_true=[0, 1, 0, 0, 0, 1],
        scores=[0.9, 0.2, 0.5, 0.1, 0.3, 0.8],
        k=2,
    )
    assert cp.days.tolist() == [1, 2]
    assert cp.values.tolist() == [0.5, 0.5]
    assert cp.cards.tolist() == [3, 2]
    assert cp.compromised.tolist() == [1, 1]
    assert cp.mean == 0.5
    assert cp.k == 2


def test_cp_with_fewer_cards_than_k_divides_by_the_cards() -> None:
    cp = card_precision_at_k([0] * 5, list("abcde"), [1, 0, 1, 0, 0], [0.1] * 5, k=100)
    assert cp.values.tolist() == [pytest.approx(0.4)]


def test_cp_shares_the_last_places_among_tied_cards() -> None:
    # k=2: a (0.9, fraud) is in; b, c, d tie at 0.5 for one place, one of them fraud -> 1/3.
    cp = card_precision_at_k([0] * 4, list("abcd"), [1, 1, 0, 0], [0.9, 0.5, 0.5, 0.5], k=2)
    assert cp.values[0] == pytest.approx((1 + 1 / 3) / 2)


def test_cp_counts_a_day_without_fraud_as_zero() -> None:
    cp = card_precision_at_k([1, 2], ["a", "a"], [1, 0], [0.5, 0.5], k=100)
    assert cp.values.tolist() == [1.0, 0.0]
    assert cp.mean == 0.5


def test_cp_can_leave_out_cards_detected_on_earlier_days() -> None:
    # Day 1 detects a (top 1, fraud). Day 2: a would rank first again; without it, b (legit).
    days = [1, 1, 2, 2]
    cards = ["a", "b", "a", "b"]
    y = [1, 0, 1, 0]
    s = [0.9, 0.1, 0.9, 0.2]
    assert card_precision_at_k(days, cards, y, s, k=1).values.tolist() == [1.0, 1.0]
    handbook = card_precision_at_k(days, cards, y, s, k=1, remove_detected=True)
    assert handbook.values.tolist() == [1.0, 0.0]
    assert handbook.cards.tolist() == [2, 1]


def test_cp_with_every_card_already_detected_ranks_nothing() -> None:
    cp = card_precision_at_k([1, 2], ["a", "a"], [1, 1], [0.9, 0.9], k=5, remove_detected=True)
    assert cp.values.tolist() == [1.0, 0.0]
    assert cp.cards.tolist() == [1, 0]


def test_cp_of_nothing_has_no_days_and_a_nan_mean() -> None:
    cp = card_precision_at_k([], [], [], [], k=100)
    assert cp.days.size == 0 and cp.values.size == 0
    assert math.isnan(cp.mean)


def test_cp_accepts_any_sortable_day_and_card_values() -> None:
    days = np.array(["2026-01-02", "2026-01-01", "2026-01-01"], dtype="datetime64[D]")
    cp = card_precision_at_k(days, [10**19, 5, 7], [1, 0, 1], [0.3, 0.2, 0.1], k=1)
    assert cp.days.astype(str).tolist() == ["2026-01-01", "2026-01-02"]
    assert cp.values.tolist() == [0.0, 1.0]


def test_cp_rejects_bad_k_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="k must"):
        card_precision_at_k([1], ["a"], [1], [0.5], k=0)
    with pytest.raises(ValueError, match="same length"):
        card_precision_at_k([1, 2], ["a"], [1], [0.5])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 80).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 3), min_size=n, max_size=n),
            st.lists(st.sampled_from("abcdefgh"), min_size=n, max_size=n),
            st.lists(st.integers(0, 1), min_size=n, max_size=n),
            st.lists(st.sampled_from([0.1, 0.2, 0.5, 0.7, 0.9]), min_size=n, max_size=n),
        )
    ),
    st.integers(1, 6),
    st.booleans(),
)
def test_cp_equals_the_dict_based_reference(
    data: tuple[list[int], list[str], list[int], list[float]], k: int, remove_detected: bool
) -> None:
    days, cards, y, s = data
    cp = card_precision_at_k(days, cards, y, s, k=k, remove_detected=remove_detected)
    expected = reference_cp(days, cards, y, s, k, remove_detected)
    assert cp.values.tolist() == pytest.approx(expected, abs=1e-12)
    assert cp.mean == pytest.approx(float(np.mean(expected)), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------


def test_alert_metrics_hand_computed() -> None:
    m = alert_metrics([1, 1, 0, 0, 0], [1, 0, 1, 0, 0])
    assert (m.true_positives, m.false_positives, m.false_negatives, m.true_negatives) == (
        1,
        1,
        1,
        2,
    )
    assert (m.n, m.alerts, m.positives) == (5, 2, 2)
    assert m.precision == 0.5
    assert m.recall == 0.5
    assert m.false_positive_rate == pytest.approx(1 / 3)
    assert m.as_dict()["false_positive_rate"] == pytest.approx(1 / 3)


def test_alert_metrics_are_nan_where_undefined() -> None:
    assert math.isnan(alert_metrics([1, 0], [0, 0]).precision)  # no alerts
    assert math.isnan(alert_metrics([0, 0], [1, 0]).recall)  # no frauds
    assert math.isnan(alert_metrics([1, 1], [1, 0]).false_positive_rate)  # no legit
    empty = alert_metrics([], [])
    assert empty.n == 0 and math.isnan(empty.precision)


def test_alert_metrics_match_river() -> None:
    rng = np.random.default_rng(11)
    y = rng.random(1_000) < 0.1
    alert = rng.random(1_000) < 0.15
    precision, recall = river_metrics.Precision(), river_metrics.Recall()
    confusion = river_metrics.ConfusionMatrix()
    for label, flagged in zip(y.tolist(), alert.tolist(), strict=True):
        precision.update(label, flagged)
        recall.update(label, flagged)
        confusion.update(label, flagged)
    m = alert_metrics(y, alert)
    assert m.precision == pytest.approx(precision.get())
    assert m.recall == pytest.approx(recall.get())
    false_pos = confusion.false_positives(True)
    assert m.false_positive_rate == pytest.approx(
        false_pos / (false_pos + confusion.true_negatives(True))
    )


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [roc_auc, average_precision])
def test_labels_must_be_binary_and_scores_finite(metric: Callable[..., float]) -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        metric([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        metric([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        metric([0, 1], [0.1])
    with pytest.raises(ValueError, match="one-dimensional"):
        metric([[0, 1]], [[0.1, 0.2]])


def test_boolean_and_integer_labels_agree() -> None:
    s = [0.3, 0.1, 0.7, 0.7]
    assert roc_auc([True, False, True, False], s) == roc_auc([1, 0, 1, 0], s)
    assert average_precision(np.array([1, 0, 1, 0], dtype=np.uint8), s) == average_precision(
        [True, False, True, False], s
    )
