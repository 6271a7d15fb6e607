"""Session-based recommendations: session re-visits, item-to-item transitions, popularity.

The recommender learns online from clicks (``observe``) and answers for one user at a time
(``recommend``). A candidate's score estimates how likely it is to be the session's next
click, from three sources:

* **re-visits** — an item already in the session, by how far back it was clicked. Shoppers
  go back and forth between products: in the DIGINETICA sample 23% of next clicks are an
  item already in the session (9% the current one again, 9% the one before it). The rate per
  distance is learned online from views, so data without re-visits (e.g. the unit tests'
  sessions) gives it no weight;
* **transitions** — items that followed (window ``window``, weight ``1/distance``) or, with
  half the weight, preceded the session's recent items in other sessions. The links of one
  source item are divided by how often that item was followed by another click, plus
  ``shrinkage`` fresh clicks (a link seen once is a guess, one seen in 50 of 60 sessions is
  not); the ``d``-th most recent distinct item of the session counts ``1/d**2``;
* **popularity** — decayed counts per country, then global: the cold-start and
  non-personalised answer, and the filler after the session's candidates (its scores stay
  below theirs). Mixing popularity *into* session scores was measured to hurt.

Long-term taste boosts candidates in the user's strongest categories; excluded items (e.g.
just bought) are removed. ``borderflow eval recs`` measures this against popularity and
item-kNN baselines (``models.session_eval``).

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
from collections.abc import Iterable, Iterator, Sequence

from models.decay import GrowingWeight

GLOBAL = "*"
#: How much an interaction says about interest, by click type.
KIND_WEIGHT = {"view": 1.0, "add_to_cart": 2.0, "purchase": 3.0, "search": 0.0}
#: Popular items kept ranked per country between calls (more are ranked on demand).
TOP_POPULAR = 50


class SessionRecommender:
    def __init__(
        self,
        *,
        half_life_ms: float = 3 * 24 * 3600 * 1000,
        window: int = 5,
        neighbours_per_item: int = 100,
        items_per_country: int = 2000,
        popularity_weight: float = 0.5,
        affinity_boost: float = 0.5,
        shrinkage: float = 3.0,
        revisit_depth: int = 10,
    ) -> None:
        """``popularity_weight`` (0 <= w < 1): the best popular filler scores ``w`` times the
        weakest session candidate (0: no filler after session candidates). ``shrinkage``:
        pseudo-clicks added to each source item's count of followers. ``revisit_depth``:
        how many distinct earlier items of a session can be recommended again."""
        if not 0.0 <= popularity_weight < 1.0:
            raise ValueError("popularity_weight must be in [0, 1)")
        self.window = window
        self.neighbours_per_item = neighbours_per_item
        self.items_per_country = items_per_country
        self.popularity_weight = popularity_weight
        self.affinity_boost = affinity_boost
        self.shrinkage = shrinkage
        self.revisit_depth = revisit_depth
        self._weight = GrowingWeight(half_life_ms)
        #: The largest weight handed out so far: what one fresh click weighs now.
        self._now = 1.0
        #: source -> target -> decayed link strength (forward 1/distance, backward half).
        self.cooccurrence: dict[str, dict[str, float]] = {}
        #: source -> decayed number of clicks that directly followed it.
        self.followed: dict[str, float] = {}
        #: Decayed re-visit hits and opportunities by distance (index 1 = the current item).
        self.revisit_hits = [0.0] * (revisit_depth + 1)
        self.revisit_chances = [0.0] * (revisit_depth + 1)
        self.popularity: dict[str, dict[str, float]] = {}
        self.item_category: dict[str, str] = {}
        #: country -> its most popular items, best first, kept up to date by ``observe``.
        self._top_cache: dict[str, list[str]] = {}
        self._top_capacity: dict[str, int] = {}

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
        if weight > self._now:
            self._now = weight
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
                else:
                    self._touch_top(key, item_id)
        if kind == "view":
            # A cart or purchase of the item on screen is a step of the funnel, not a
            # re-visit: only views teach how often shoppers go back.
            for distance, previous in _distinct_recent(session_items, self.revisit_depth):
                self.revisit_chances[distance] += weight
                if previous == item_id:
                    self.revisit_hits[distance] += weight
        if session_items and session_items[-1] != item_id:
            last = session_items[-1]
            self.followed[last] = self.followed.get(last, 0.0) + weight
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

    def _touch_top(self, key: str, item_id: str) -> None:
        """Keep ``key``'s ranked popular items current after ``item_id`` gained weight.

        Stored weights only grow (decay is applied to new weights, not old ones), so an item
        can only overtake others, and only enter the ranked list by its own click.
        """
        top = self._top_cache.get(key)
        if top is None:
            return
        counts = self.popularity[key]
        if item_id in top:
            i = top.index(item_id)
        elif len(top) < self._top_capacity[key]:
            top.append(item_id)  # the list holds every item of ``key``: this one is new
            i = len(top) - 1
        elif counts[item_id] > counts[top[-1]]:
            top[-1] = item_id
            i = len(top) - 1
        else:
            return
        value = counts[item_id]
        while i > 0 and counts[top[i - 1]] < value:
            top[i] = top[i - 1]
            i -= 1
        top[i] = item_id

    def _rescale(self, factor: float) -> None:
        for table in (self.cooccurrence, self.popularity):
            for row in table.values():
                for key in row:
                    row[key] *= factor
        for key in self.followed:
            self.followed[key] *= factor
        for stats in (self.revisit_hits, self.revisit_chances):
            for i, value in enumerate(stats):
                stats[i] = value * factor
        self._now *= factor
        self._top_cache.clear()

    # -- answering ------------------------------------------------------------------------------
    def top_popular(self, country: str | None, n: int = 50) -> list[tuple[str, float]]:
        """Most popular items in ``country`` (falling back to global), best first."""
        key = country if country and country in self.popularity else GLOBAL
        counts = self.popularity.get(key, {})
        top = self._top_cache.get(key)
        if top is None or (len(top) < n and len(top) < len(counts)):
            capacity = max(n, TOP_POPULAR)
            ranked = heapq.nlargest(capacity, counts.items(), key=lambda kv: kv[1])
            top = self._top_cache[key] = [item_id for item_id, _ in ranked]
            self._top_capacity[key] = capacity
        return [(item_id, counts[item_id]) for item_id in top[:n]]

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
        """Top ``n`` (item, score) for a user, best first; scores are comparable within a list.

        Session candidates (re-visits and transitions of ``session_items``) come first, then
        popular items of ``country``; ``personalised=False`` gives the popular items only.
        """
        excluded = set(exclude)
        taste = dict(top_categories) if personalised else {}
        scores = self._session_scores(session_items) if personalised else {}
        if taste:
            self._boost(scores, taste)
        for item_id in excluded:
            scores.pop(item_id, None)
        best = heapq.nlargest(n, scores.items(), key=lambda kv: (kv[1], kv[0]))
        if len(best) < n and (not best or self.popularity_weight > 0):
            best += self._fillers(country, n - len(best), best, excluded, taste)
        return [(item_id, _significant(score)) for item_id, score in best]

    def _session_scores(self, session_items: Sequence[str]) -> dict[str, float]:
        scores: dict[str, float] = {}
        pseudo = self.shrinkage * self._now
        for rank, source in _distinct_recent(session_items, self.window):
            row = self.cooccurrence.get(source)
            if not row:
                continue
            scale = 1.0 / (rank * rank * (self.followed.get(source, 0.0) + pseudo))
            for target, value in row.items():
                scores[target] = scores.get(target, 0.0) + scale * value
        for distance, previous in _distinct_recent(session_items, self.revisit_depth):
            hits = self.revisit_hits[distance]
            if hits > 0:
                rate = hits / (self.revisit_chances[distance] + self._now)
                scores[previous] = scores.get(previous, 0.0) + rate
        return scores

    def _boost(self, scores: dict[str, float], taste: dict[str, float]) -> None:
        strongest = max(taste.values()) or 1.0
        for item_id in scores:
            category = self.item_category.get(item_id)
            if category in taste:
                scores[item_id] *= 1.0 + self.affinity_boost * taste[category] / strongest

    def _fillers(
        self,
        country: str | None,
        missing: int,
        chosen: list[tuple[str, float]],
        excluded: set[str],
        taste: dict[str, float],
    ) -> list[tuple[str, float]]:
        """Popular items after the session candidates, scored below the weakest of them."""
        taken = excluded.union(item_id for item_id, _ in chosen)
        popular = self.top_popular(country, missing + len(taken))
        if not popular:
            return []
        top = popular[0][1] or 1.0
        values = {item_id: value / top for item_id, value in popular if item_id not in taken}
        if taste:
            self._boost(values, taste)
        ranked = heapq.nlargest(missing, values.items(), key=lambda kv: kv[1])
        best = ranked[0][1] if ranked and ranked[0][1] > 0 else 1.0
        scale = chosen[-1][1] * self.popularity_weight if chosen else 1.0
        return [(item_id, scale * value / best) for item_id, value in ranked]


def _distinct_recent(session_items: Sequence[str], limit: int) -> Iterator[tuple[int, str]]:
    """(distance, item) for the ``limit`` most recent distinct items, the last one first."""
    seen: set[str] = set()
    for item_id in reversed(session_items):
        if item_id not in seen:
            seen.add(item_id)
            yield len(seen), item_id
            if len(seen) >= limit:
                return


def _significant(score: float) -> float:
    """Six significant digits: decayed scores can be tiny and must keep their order."""
    return float(f"{score:.6g}")


def _keep_top(row: dict[str, float], n: int) -> dict[str, float]:
    return dict(heapq.nlargest(n, row.items(), key=lambda kv: kv[1]))
