"""Fraud-detection metrics, in plain numpy (no scikit-learn, no ClickHouse, no Faust).

The metrics are the Fraud Detection Handbook's (Le Borgne et al.), so borderflow's streaming
scores can be put next to the handbook's batch results:

* :func:`roc_auc` - area under the ROC curve (Mann-Whitney statistic, ties count one half);
* :func:`average_precision` - scikit-learn's step-wise AP, ``sum_n (R_n - R_{n-1}) * P_n``;
* :func:`card_precision_at_k` - each day, the share of the ``k`` most suspicious cards that
  had fraud that day (Card Precision@k);
* :func:`alert_metrics` - precision, recall and false-positive rate of the binary alerts.

Conventions: ``y_true`` holds 0/1 (or booleans), 1 meaning fraud; a higher score means more
suspicious. Scores must be finite (a NaN score has no rank; callers decide whether to drop
it). A metric that is undefined on its input (no positives, no negatives, no alerts) is
``nan`` rather than an exception, so one quiet day does not stop a whole evaluation; the
docstrings say when. Every function runs in O(n log n) with vectorised numpy, which keeps a
few million payments within a second or two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _labels(y_true: ArrayLike) -> npt.NDArray[np.bool_]:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError("y_true must be one-dimensional")
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError("y_true must contain only 0 and 1 (or booleans)")
        y = y.astype(np.bool_)
    return y


def _scores(scores: ArrayLike, n: int) -> FloatArray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores has shape {s.shape}, expected ({n},) like y_true")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (drop or fix NaN/inf scores first)")
    return s


def _tie_groups(y: npt.NDArray[np.bool_], s: FloatArray) -> tuple[IntArray, IntArray]:
    """Positives and negatives per distinct score, in ascending score order.

    Grouping equal scores is what makes ties exact: a group is one threshold of the ROC and
    precision-recall curves, whatever the order of its members in the input.
    """
    order = np.argsort(s)  # unstable is fine (and 3x faster): groups ignore order within ties
    s_sorted = s[order]
    starts = np.flatnonzero(np.concatenate(([True], s_sorted[1:] != s_sorted[:-1])))
    positives = np.add.reduceat(y[order].astype(np.int64), starts)
    sizes = np.diff(np.append(starts, s.size))
    return positives, sizes - positives


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a random fraud > score of a random legit).

    Rank-based (Mann-Whitney U): a tied positive/negative pair counts one half, which equals
    the trapezoidal area of the ROC curve with tied scores as one threshold (the same value
    as ``sklearn.metrics.roc_auc_score``). Counted in exact integers, then divided once.

    Returns ``nan`` when ``y_true`` has no positives or no negatives (AUC is undefined).

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])  # a tie is worth one half
    0.5
    >>> roc_auc([1, 1], [0.2, 0.9])
    nan
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    positives, negatives = _tie_groups(y, s)
    negatives_below = np.cumsum(negatives) - negatives
    # Twice the U statistic, so the half-credit of ties stays an integer.
    twice_u = 2 * int(np.dot(positives, negatives_below)) + int(np.dot(positives, negatives))
    return twice_u / (2 * n_pos * n_neg)


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Average precision: ``sum_n (R_n - R_{n-1}) * P_n`` over decreasing score thresholds.

    The step-wise (not interpolated) definition of ``sklearn.metrics.average_precision_score``.
    Each distinct score is one threshold, so tied payments enter together: a tie of one fraud
    and one legit at the top gives precision 1/2 for that step, whatever their order.

    Returns ``nan`` when ``y_true`` has no positives (recall is undefined). With positives
    only it is 1.0.

    >>> average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.8333333333333333
    >>> average_precision([1, 0, 1], [0.9, 0.9, 0.1])  # the tied pair is one threshold
    0.5833333333333333
    >>> average_precision([0, 0], [0.3, 0.7])
    nan
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    positives, negatives = _tie_groups(y, s)
    positives, negatives = positives[::-1], negatives[::-1]  # highest threshold first
    true_pos = np.cumsum(positives)
    precision = true_pos / (true_pos + np.cumsum(negatives))
    return float(np.dot(positives, precision) / n_pos)


def _factorize(values: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], IntArray]:
    """Sorted distinct values and each element's index among them (like ``np.unique``).

    Integers of a modest range (days, small ids) take a linear-time lookup table instead of
    the sort ``np.unique(return_inverse=True)`` needs: most of the time of a daily metric
    over millions of payments went there.
    """
    if values.dtype.kind in "iu" and values.size:
        low, high = int(values.min()), int(values.max())
        if high - low <= 4 * values.size:
            offsets = (values - values.dtype.type(low)).astype(np.int64)
            present = np.zeros(high - low + 1, dtype=np.bool_)
            present[offsets] = True
            unique = np.flatnonzero(present) + low
            return unique.astype(values.dtype), (np.cumsum(present) - 1)[offsets]
    unique, index = np.unique(values, return_inverse=True)
    return unique, index.astype(np.int64).reshape(-1)


@dataclass(frozen=True)
class CardPrecisionAtK:
    """Card Precision@k per day (days ascending) and the mean over days."""

    k: int
    days: npt.NDArray[Any]
    #: CP@k of each day, in [0, 1].
    values: FloatArray
    #: Cards ranked that day (after removing already detected ones, if asked).
    cards: IntArray
    #: Of those, cards with at least one fraud that day.
    compromised: IntArray
    #: Mean of ``values``; ``nan`` when there are no days.
    mean: float


def card_precision_at_k(
    days: ArrayLike,
    cards: ArrayLike,
    y_true: ArrayLike,
    scores: ArrayLike,
    k: int = 100,
    *,
    remove_detected: bool = False,
) -> CardPrecisionAtK:
    """Card Precision@k: each day, the share of the k highest-scored cards that had fraud.

    Per the Fraud Detection Handbook: for each day, a card's score is the maximum score of its
    payments that day and the card counts as compromised if any of them is fraud; cards are
    ranked by that score, and CP@k(day) is the compromised share of the top ``k``. ``k`` is
    capped by the number of cards that day (5 cards, 2 compromised, k=100 gives 0.4).

    Cards tied at the k-th place share the remaining places pro rata (the expected precision
    under a random tie-break), so the value depends neither on card ids nor on input order.

    ``remove_detected=True`` follows the handbook's notebook default: cards found compromised
    in the top k on an earlier day (investigated, hence blocked) are left out of later days.
    Cards in a tie group that straddles the k-th place count as not detected, because only
    some of them would have been investigated.

    Every day present in ``days`` gets a value (0.0 on a day without fraud). Only the mean of
    an empty input is ``nan``.

    >>> cp = card_precision_at_k(
    ...     days=[1, 1, 1, 1, 2, 2],
    ...     cards=["a", "a", "b", "c", "a", "b"],
    ...     y_true=[0, 1, 0, 0, 0, 1],
    ...     scores=[0.9, 0.2, 0.5, 0.1, 0.3, 0.8],
    ...     k=2,
    ... )
    >>> cp.values.tolist(), cp.mean
    ([0.5, 0.5], 0.5)
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    y = _labels(y_true)
    s = _scores(scores, y.size)
    day_values = np.asarray(days)
    card_values = np.asarray(cards)
    if day_values.shape != y.shape or card_values.shape != y.shape:
        raise ValueError("days, cards, y_true and scores must have the same length")
    if y.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return CardPrecisionAtK(k, day_values[:0], np.zeros(0), empty, empty, float("nan"))

    unique_days, day_index = _factorize(day_values)
    _, card_index = _factorize(card_values)

    # One row per (day, card): max score and "any fraud" of that card that day. A single
    # integer key sorts faster than a two-key lexsort; the order inside a group is irrelevant.
    n_cards_total = int(card_index.max()) + 1
    pair_key = day_index * n_cards_total + card_index
    order = np.argsort(pair_key)
    pair_key = pair_key[order]
    starts = np.flatnonzero(np.concatenate(([True], pair_key[1:] != pair_key[:-1])))
    g_day = day_index[order[starts]]
    g_card = card_index[order[starts]]
    g_score = np.maximum.reduceat(s[order], starts)
    g_fraud = np.maximum.reduceat(y[order].astype(np.int8), starts).astype(np.bool_)
    bounds = np.searchsorted(g_day, np.arange(unique_days.size + 1))

    n_days = unique_days.size
    values = np.zeros(n_days)
    n_cards = np.zeros(n_days, dtype=np.int64)
    n_compromised = np.zeros(n_days, dtype=np.int64)
    detected = np.zeros(n_cards_total, dtype=np.bool_)
    for d in range(n_days):
        lo, hi = bounds[d], bounds[d + 1]
        day_card, day_fraud = g_card[lo:hi], g_fraud[lo:hi]
        if remove_detected:
            keep = ~detected[day_card]
            day_card, day_fraud = day_card[keep], day_fraud[keep]
            day_score = g_score[lo:hi][keep]
        else:
            day_score = g_score[lo:hi]
        n = day_score.size
        n_cards[d] = n
        n_compromised[d] = int(day_fraud.sum())
        if n == 0:  # every card of the day was already detected: nothing left to rank
            continue
        ranked = np.argsort(-day_score)  # ties are handled below, not by their order
        day_score, day_fraud, day_card = day_score[ranked], day_fraud[ranked], day_card[ranked]
        top = min(k, n)
        kth = day_score[top - 1]
        # Scores are sorted decreasingly, so "strictly above the k-th" is a prefix.
        above = int(np.count_nonzero(day_score > kth))
        tied = day_score == kth
        n_tied = int(tied.sum())
        hits = day_fraud[:above].sum() + (top - above) * day_fraud[tied].sum() / n_tied
        values[d] = hits / top
        if remove_detected:
            sure = above + n_tied if top - above == n_tied else above
            detected[day_card[:sure][day_fraud[:sure]]] = True
    return CardPrecisionAtK(
        k=k,
        days=unique_days,
        values=values,
        cards=n_cards,
        compromised=n_compromised,
        mean=float(values.mean()),
    )


@dataclass(frozen=True)
class AlertMetrics:
    """Confusion counts of binary alerts against labels, and the rates derived from them."""

    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def n(self) -> int:
        return self.alerts + self.false_negatives + self.true_negatives

    @property
    def alerts(self) -> int:
        return self.true_positives + self.false_positives

    @property
    def positives(self) -> int:
        return self.true_positives + self.false_negatives

    @property
    def precision(self) -> float:
        """Share of alerts that were fraud; ``nan`` without alerts."""
        return _ratio(self.true_positives, self.alerts)

    @property
    def recall(self) -> float:
        """Share of frauds that raised an alert; ``nan`` without frauds."""
        return _ratio(self.true_positives, self.positives)

    @property
    def false_positive_rate(self) -> float:
        """Share of legitimate payments that raised an alert; ``nan`` without legit ones."""
        return _ratio(self.false_positives, self.false_positives + self.true_negatives)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "true_negatives": self.true_negatives,
        }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def alert_metrics(y_true: ArrayLike, is_alert: ArrayLike) -> AlertMetrics:
    """Precision, recall and false-positive rate of alerts (``is_alert`` 0/1 per payment).

    Each rate is ``nan`` when its denominator is zero: precision without alerts, recall
    without frauds, false-positive rate without legitimate payments.

    >>> m = alert_metrics([1, 1, 0, 0, 0], [1, 0, 1, 0, 0])
    >>> m.precision, m.recall, round(m.false_positive_rate, 4)
    (0.5, 0.5, 0.3333)
    >>> alert_metrics([0, 0], [0, 0]).precision
    nan
    """
    y = _labels(y_true)
    alert = _labels(is_alert)
    if alert.shape != y.shape:
        raise ValueError("y_true and is_alert must have the same length")
    tp = int(np.count_nonzero(y & alert))
    fp = int(np.count_nonzero(~y & alert))
    fn = int(np.count_nonzero(y & ~alert))
    return AlertMetrics(tp, fp, fn, y.size - tp - fp - fn)
