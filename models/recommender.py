"""Session-based recommendations: decayed item-to-item co-occurrence plus country popularity.

The recommender learns online from clicks (``observe``) and answers for one user at a time
(``recommend``):

* **session neighbours** — items that followed the user's recent session items in other
  sessions (directional co-occurrence within a small window, newer sessions weigh more);
* **country trend** — decayed popularity among users of the same country, then global, which
  is also the cold-start and the non-personalised answer;
* **long-term taste** — candidates in the user's strongest categories get a boost;
* items the user just bought are excluded.

Decay uses :class:`models.decay.GrowingWeight` in *event time*, so results are replayable.
Memory is bounded: each item keeps its ``neighbours_per_item`` strongest neighbours and each
country its ``items_per_country`` most popular items.

>>> r = SessionRecommender()
>>> for session in (["a", "b"], ["a", "b"], ["a", "c"]):
...     seen = []
...     for item in session:
...         r.observe(seen, item, country="DE", category=None, ts_ms=0, kind="view")
...         seen.append(item)
>>> [item for item, _ in r.recommend(["a"], country="DE", n=2)]
['b', 'c']
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from models.decay import GrowingWeight

GLOBAL = "*"
#: How much an interaction says about interest, by click type.
KIND_WEIGHT = {"view": 1.0, "add_to_cart": 2.0, "purchase": 3.0, "search": 0.0}


class SessionRecommender:
    def __init__(
        self,
        *,
        half_life_ms: float = 3 * 24 * 3600 * 1000,
        window: int = 5,
        neighbours_per_item: int = 100,
        items_per_country: int = 2000,
        popularity_weight: float = 0.15,
        affinity_boost: float = 0.5,
    ) -> None:
        self.window = window
        self.neighbours_per_item = neighbours_per_item
        self.items_per_country = items_per_country
        self.popularity_weight = popularity_weight
        self.affinity_boost = affinity_boost
        self._weight = GrowingWeight(half_life_ms)
        self.cooccurrence: dict[str, dict[str, float]] = {}
        self.popularity: dict[str, dict[str, float]] = {}
        self.item_category: dict[str, str] = {}
        self._top_cache: dict[str, list[tuple[str, float]]] = {}

    # -- learning -------------------------------------------------------------------------------
    def observe(
        self,
        session_items: Sequence[str],
        item_id: str,
        *,
        country: str | None,
        category: str | None,
        ts_ms: int,
        kind: str,
    ) -> None:
        """Learn from one click on ``item_id`` after ``session_items`` (oldest first)."""
        if self._weight.needs_rebase(ts_ms):
            self._rescale(self._weight.rebase(ts_ms))
        weight = self._weight.weight(ts_ms)
        if category:
            self.item_category[item_id] = category
        interest = KIND_WEIGHT.get(kind, 1.0)
        if interest:
            for key in (country or GLOBAL, GLOBAL) if country else (GLOBAL,):
                counts = self.popularity.setdefault(key, {})
                counts[item_id] = counts.get(item_id, 0.0) + weight * interest
                if len(counts) > 2 * self.items_per_country:
                    self.popularity[key] = _keep_top(counts, self.items_per_country)
                self._top_cache.pop(key, None)
        recent = [i for i in session_items[-self.window :] if i != item_id]
        for distance, previous in enumerate(reversed(recent), start=1):
            step = weight / distance
            self._bump(previous, item_id, step)
            # The reverse direction says less about "what comes next".
            self._bump(item_id, previous, 0.5 * step)

    def _bump(self, source: str, target: str, amount: float) -> None:
        row = self.cooccurrence.get(source)
        if row is None:
            row = self.cooccurrence[source] = {}
        row[target] = row.get(target, 0.0) + amount
        if len(row) > 2 * self.neighbours_per_item:
            self.cooccurrence[source] = _keep_top(row, self.neighbours_per_item)

    def _rescale(self, factor: float) -> None:
        for table in (self.cooccurrence, self.popularity):
            for row in table.values():
                for key in row:
                    row[key] *= factor
        self._top_cache.clear()

    # -- answering ------------------------------------------------------------------------------
    def top_popular(self, country: str | None, n: int = 50) -> list[tuple[str, float]]:
        """Most popular items in ``country`` (falling back to global), best first."""
        key = country if country and country in self.popularity else GLOBAL
        cached = self._top_cache.get(key)
        if cached is None or len(cached) < n:
            counts = self.popularity.get(key, {})
            cached = heapq.nlargest(max(n, 50), counts.items(), key=lambda kv: kv[1])
            self._top_cache[key] = cached
        return cached[:n]

    def recommend(
        self,
        session_items: Sequence[str],
        *,
        country: str | None,
        n: int = 20,
        top_categories: Iterable[tuple[str, float]] = (),
        exclude: Iterable[str] = (),
        personalised: bool = True,
    ) -> list[tuple[str, float]]:
        """Top ``n`` (item, score) for a user, best first; scores are comparable within a list."""
        excluded = set(exclude)
        scores: dict[str, float] = {}
        if personalised:
            recent = list(session_items[-self.window :])
            for rank, source in enumerate(reversed(recent), start=1):
                row = self.cooccurrence.get(source)
                if not row:
                    continue
                norm = max(row.values())
                recency = 1.0 / rank
                for target, value in row.items():
                    scores[target] = scores.get(target, 0.0) + recency * value / norm
        popular = self.top_popular(country, max(n * 2, 50))
        if popular:
            top = popular[0][1] or 1.0
            for item_id, value in popular:
                scores[item_id] = scores.get(item_id, 0.0) + self.popularity_weight * value / top
        if personalised:
            taste = dict(top_categories)
            if taste:
                strongest = max(taste.values()) or 1.0
                for item_id in scores:
                    category = self.item_category.get(item_id)
                    if category in taste:
                        boost = 1.0 + self.affinity_boost * taste[category] / strongest
                        scores[item_id] *= boost
        for item_id in excluded:
            scores.pop(item_id, None)
        best = heapq.nlargest(n, scores.items(), key=lambda kv: (kv[1], kv[0]))
        return [(item_id, round(score, 6)) for item_id, score in best]


def _keep_top(row: dict[str, float], n: int) -> dict[str, float]:
    return dict(heapq.nlargest(n, row.items(), key=lambda kv: kv[1]))
