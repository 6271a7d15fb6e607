"""Final ranking of a user's recommendations: logistics-aware scores and a category cap.

The recommender (``models.recommender``) proposes more candidates than the storefront shows;
this step decides the final ``n``:

1. **Logistics.** Each candidate's score is multiplied by ``0.5 ** (extra_days / half_days)``
   where ``extra_days`` is how much longer than the fastest candidate it is expected to take
   to reach the user (``models.delivery.DeliveryLanes``, from the item's origin country to the
   user's country). A candidate whose delivery time is unknown gets the candidates' median,
   so it is neither favoured nor punished. ``half_days = 0`` turns this off.
2. **Diversity.** At most ``max_per_category`` items of one category are taken, best first;
   items of an unknown category are not capped. When the cap leaves fewer than ``n`` items,
   the best capped-out ones fill the list at the end (a full list beats a diverse short one).
   ``max_per_category = 0`` turns this off.

Scores stay comparable within one list and strictly decrease down the list, so a reader of
the sorted set (``ZREVRANGE``) gets exactly this order.

>>> candidates = [("cn-1", 1.0), ("cn-2", 0.9), ("de-1", 0.8)]
>>> origin = {"cn-1": "CN", "cn-2": "CN", "de-1": "DE"}.get
>>> days = {"CN": 14.0, "DE": 2.0}
>>> policy = RerankPolicy(delivery_half_days=7.0, max_per_category=0)
>>> [item for item, _ in rerank(candidates, 3, policy=policy, category_of=lambda i: None,
...                             expected_days=lambda i: days[origin(i)])]
['de-1', 'cn-1', 'cn-2']
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RerankPolicy:
    #: Expected extra delivery days that halve a candidate's score (0: ignore logistics).
    delivery_half_days: float = 7.0
    #: Most items of one category in a list (0: no cap).
    max_per_category: int = 0


def rerank(
    candidates: Sequence[tuple[str, float]],
    n: int,
    *,
    policy: RerankPolicy,
    category_of: Callable[[str], str | None],
    expected_days: Callable[[str], float | None],
) -> list[tuple[str, float]]:
    """The final top ``n`` of ``candidates`` (item, score), best first."""
    if not candidates or n <= 0:
        return []
    scored = list(candidates)
    if policy.delivery_half_days > 0:
        scored = _logistics_adjusted(scored, policy.delivery_half_days, expected_days)
    scored.sort(key=lambda kv: -kv[1])  # stable: ties keep the recommender's order
    if policy.max_per_category > 0:
        scored = _category_capped(scored, n, policy.max_per_category, category_of)
    return _strictly_decreasing(scored[:n])


def _logistics_adjusted(
    candidates: list[tuple[str, float]],
    half_days: float,
    expected_days: Callable[[str], float | None],
) -> list[tuple[str, float]]:
    days = {item: expected_days(item) for item, _ in candidates}
    known = [d for d in days.values() if d is not None]
    if not known:
        return candidates
    fastest = min(known)
    typical = statistics.median(known)
    adjusted = []
    for item, score in candidates:
        item_days = days[item]
        extra = (typical if item_days is None else item_days) - fastest
        adjusted.append((item, score * 0.5 ** (extra / half_days)))
    return adjusted


def _category_capped(
    ranked: list[tuple[str, float]],
    n: int,
    cap: int,
    category_of: Callable[[str], str | None],
) -> list[tuple[str, float]]:
    taken: list[tuple[str, float]] = []
    overflow: list[tuple[str, float]] = []
    per_category: dict[str, int] = {}
    for item, score in ranked:
        category = category_of(item)
        if category is not None:
            if per_category.get(category, 0) >= cap:
                overflow.append((item, score))
                continue
            per_category[category] = per_category.get(category, 0) + 1
        taken.append((item, score))
        if len(taken) == n:
            return taken
    return taken + overflow[: n - len(taken)]


def _strictly_decreasing(ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Six significant digits, each score below the previous (the list order is the truth)."""
    out: list[tuple[str, float]] = []
    previous = float("inf")
    for item, score in ranked:
        value = float(f"{score:.6g}")
        if value >= previous:
            value = float(f"{previous * 0.999:.6g}")
        out.append((item, value))
        previous = value
    return out
