"""Session-based recommendations: re-visits, transitions, session neighbours, popularity.

The recommender learns online from clicks (``observe``) and answers for one user at a time
(``recommend``). A candidate's score estimates the probability that it is the session's next
click: a re-visit gets its learned re-visit rate; the remaining probability is shared by a
mixture of the transitions and the session neighbourhood (each normalised to a distribution),
whose shares are learned online by EM (:meth:`SessionRecommender.mixture`: each new next click
credits the sources in proportion to the probability they gave it, an "other" share absorbing
what none foresaw). The sources:

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
* **session neighbours** (V-SKNN, Ludewig et al. 2021, with STAN's event-time decay of
  neighbour sessions) — past sessions sharing items with the current one, among each item's
  ``sessions_per_item`` most recent sessions; similarity is the sum of ``1/d`` over shared
  items (``d``: recency rank in the current session); the ``neighbour_sessions`` most similar
  vote for their other items. Sessions are recognised by a caller ``session_id`` or else by
  their last items, so the pipeline needs no change;
* **popularity** — decayed counts per country, then global: the cold-start and
  non-personalised answer, and the filler after the session's candidates (its scores stay
  below theirs). Mixing popularity *into* session scores was measured to hurt.

Long-term taste boosts candidates in the user's strongest categories; excluded items (e.g.
just bought) are removed. ``borderflow eval recs`` measures this against popularity and
item-kNN baselines (``models.session_eval``).

Decay uses :class:`models.decay.GrowingWeight` in *event time*, so results are replayable.
Memory is bounded: each item keeps its ``neighbours_per_item`` strongest neighbours and at
most ``2 * sessions_per_item`` session ids, each country its ``items_per_country`` most popular
items; at most ``max_sessions`` sessions of ``session_length`` distinct items are remembered.

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
import math
import sys
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import TypeVar

from models.decay import GrowingWeight

_Key = TypeVar("_Key")

GLOBAL = "*"
#: How much an interaction says about interest, by click type.
KIND_WEIGHT = {"view": 1.0, "add_to_cart": 2.0, "purchase": 3.0, "search": 0.0}
#: Popular items kept ranked per country between calls (more are ranked on demand).
TOP_POPULAR = 50
#: How many of a session's last (distinct consecutive) items recognise it without a session id.
PREFIX_KEY = 8
#: Candidates per session, sessions, and sampling rate of the online mixture calibration.
CALIBRATION_CANDIDATES = 50
CALIBRATION_SESSIONS = 2000
CALIBRATE_EVERY = 8
#: Sort key of the final ranking: score, then item id (both descending).
_SCORE_THEN_ID = itemgetter(1, 0)


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
        neighbour_sessions: int = 100,
        sessions_per_item: int = 500,
        max_sessions: int = 200_000,
        session_length: int = 50,
    ) -> None:
        """``popularity_weight`` (0 <= w < 1): the best popular filler scores ``w`` times the
        weakest session candidate (0: no filler after session candidates). ``shrinkage``:
        pseudo-clicks added to each source item's count of followers. ``revisit_depth``:
        how many distinct earlier items of a session can be recommended again.

        Session neighbourhood (V-SKNN): ``neighbour_sessions`` (k) most similar past sessions,
        chosen among the ``sessions_per_item`` most recent sessions of each item of the current
        session; at most ``max_sessions`` past sessions of at most ``session_length`` distinct
        items are kept."""
        if not 0.0 <= popularity_weight < 1.0:
            raise ValueError("popularity_weight must be in [0, 1)")
        self.window = window
        self.neighbours_per_item = neighbours_per_item
        self.items_per_country = items_per_country
        self.popularity_weight = popularity_weight
        self.affinity_boost = affinity_boost
        self.shrinkage = shrinkage
        self.revisit_depth = revisit_depth
        self.neighbour_sessions = neighbour_sessions
        self.sessions_per_item = sessions_per_item
        self.max_sessions = max_sessions
        self.session_length = session_length
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
        #: Past and open sessions: id -> distinct items in click order, and last click time.
        self.sessions: dict[int, list[str]] = {}
        self.session_ts: dict[int, int] = {}
        #: item -> ids of the sessions that contain it, oldest first (bounded).
        self.item_sessions: dict[str, list[int]] = {}
        #: Open sessions by caller key (``session_id``) or by their last items (no key).
        self._open: dict[object, int] = {}
        self._next_session = 0
        #: Latest event time seen (ms): neighbour sessions decay relative to it.
        self._latest_ms: int | None = None
        #: Decayed EM credit of (transitions, neighbourhood, other) for new next items.
        self.mix_counts = [0.0, 0.0, 0.0]
        #: session key -> candidate -> (transition, neighbourhood) probability, until its click.
        self._pending: dict[object, dict[str, tuple[float, float]]] = {}
        self._calibration_clock = 0

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._share_item_ids()

    def _share_item_ids(self) -> None:
        """Make every item id in the learned tables one shared string (``sys.intern``).

        ``observe`` interns what it stores; an image (pickled by any version) is shared
        again here. The tables are the same, but the candidate loops of ``recommend`` then
        touch a few thousand string objects instead of one per remembered click, which
        keeps them in the CPU cache (about 10% of a recommendation), and memory holds each
        id once."""
        share = _shared
        self.cooccurrence = {
            share(source): {share(target): value for target, value in row.items()}
            for source, row in self.cooccurrence.items()
        }
        self.followed = {share(item_id): value for item_id, value in self.followed.items()}
        self.popularity = {
            key: {share(item_id): value for item_id, value in counts.items()}
            for key, counts in self.popularity.items()
        }
        self.item_category = {share(item_id): c for item_id, c in self.item_category.items()}
        self._top_cache = {key: [share(i) for i in top] for key, top in self._top_cache.items()}
        self.sessions = {sid: [share(i) for i in items] for sid, items in self.sessions.items()}
        self.item_sessions = {share(item_id): ids for item_id, ids in self.item_sessions.items()}
        self._pending = {
            key: {share(item_id): said for item_id, said in candidates.items()}
            for key, candidates in self._pending.items()
        }

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
        session_id: str | None = None,
        remember: bool = True,
    ) -> None:
        """Learn from one click on ``item_id`` after ``session_items`` (oldest first).

        ``session_id`` identifies the session in the neighbourhood memory; it should be unique
        per user session (e.g. ``f"{user_id}:{session_id}"``). Without it the session is
        recognised by its last items (``session_items``), which works as long as callers pass
        the same items they later recommend for. ``remember=False`` keeps the click out of the
        session memory (a user without consent to personalisation): it still counts towards
        the item's popularity and the links from ``session_items``.
        """
        # One string object per item id in everything learned (see _share_item_ids).
        item_id = _shared(item_id)
        if self._weight.needs_rebase(ts_ms):
            self._rescale(self._weight.rebase(ts_ms))
        weight = self._weight.weight(ts_ms)
        if weight > self._now:
            self._now = weight
        if category:
            self.item_category[item_id] = category
        interest = KIND_WEIGHT.get(kind, 1.0)
        if self._latest_ms is None or ts_ms > self._latest_ms:
            self._latest_ms = ts_ms
        if interest:
            if remember:
                self._calibrate(session_items, item_id, session_id, weight)
                self._remember(session_items, item_id, ts_ms, session_id)
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
            last = _shared(session_items[-1])
            self.followed[last] = self.followed.get(last, 0.0) + weight
        recent = [_shared(i) for i in session_items[-self.window :] if i != item_id]
        for distance, previous in enumerate(reversed(recent), start=1):
            step = weight / distance
            self._bump(previous, item_id, step)
            # The reverse direction says less about "what comes next".
            self._bump(item_id, previous, 0.5 * step)

    def _remember(
        self, session_items: Sequence[str], item_id: str, ts_ms: int, session_id: str | None
    ) -> None:
        """Add the click to its session's record (for the session neighbourhood)."""
        if session_id is not None:
            key: object = session_id
            new_key: object = session_id
        else:
            key = _prefix_key(session_items) if session_items else None
            new_key = _prefix_key([*session_items[-2 * PREFIX_KEY :], item_id])
        sid = self._open.pop(key, None) if key is not None else None
        items = self.sessions.get(sid) if sid is not None else None
        if items is None or sid is None:
            sid = self._next_session
            self._next_session += 1
            items = self.sessions[sid] = []
            if session_id is None:
                # A record of what is known of the session: its items so far.
                for previous in dict.fromkeys(session_items[-self.session_length :]):
                    self._index(sid, items, _shared(previous))
            if len(self.sessions) > self.max_sessions:
                oldest = next(iter(self.sessions))
                del self.sessions[oldest]
                self.session_ts.pop(oldest, None)
        self._index(sid, items, item_id)
        self.session_ts[sid] = ts_ms
        self._open[new_key] = sid
        if len(self._open) > self.max_sessions:
            del self._open[next(iter(self._open))]

    def forget_sessions(self, key_prefix: str) -> int:
        """Drop the sessions whose caller key starts with ``key_prefix`` (a user's sessions:
        ``f"{user_id}:"``, see ``models.serving.session_key``) from the neighbourhood memory
        and the calibration; returns how many sessions were dropped. What they taught the
        item links and popularity is aggregate and stays."""
        keys = [k for k in self._open if isinstance(k, str) and k.startswith(key_prefix)]
        for key in keys:
            sid = self._open.pop(key)
            items = self.sessions.pop(sid, None) or []
            self.session_ts.pop(sid, None)
            for item_id in items:
                ids = self.item_sessions.get(item_id)
                if ids is not None and sid in ids:
                    ids.remove(sid)
                    if not ids:
                        del self.item_sessions[item_id]
        for key in [k for k in self._pending if isinstance(k, str) and k.startswith(key_prefix)]:
            del self._pending[key]
        return len(keys)

    def _index(self, sid: int, items: list[str], item_id: str) -> None:
        if item_id in items or len(items) >= self.session_length:
            return
        items.append(item_id)
        ids = self.item_sessions.get(item_id)
        if ids is None:
            self.item_sessions[item_id] = [sid]
            return
        ids.append(sid)
        if len(ids) > 2 * self.sessions_per_item:
            del ids[: -self.sessions_per_item]

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
        for stats in (self.revisit_hits, self.revisit_chances, self.mix_counts):
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
        session_id: str | None = None,
    ) -> list[tuple[str, float]]:
        """Top ``n`` (item, score) for a user, best first; scores are comparable within a list.

        Session candidates (re-visits and transitions of ``session_items``) come first, then
        popular items of ``country``; ``personalised=False`` gives the popular items only.
        """
        excluded = set(exclude)
        taste = dict(top_categories) if personalised else {}
        scores = self._session_scores(session_items, session_id) if personalised else {}
        for item_id in excluded:
            scores.pop(item_id, None)
        if taste:
            best = self._best_boosted(scores, taste, n)
        else:
            best = _best_by_score_then_id(scores, n)
        if len(best) < n and (not best or self.popularity_weight > 0):
            best += self._fillers(country, n - len(best), best, excluded, taste)
        return [(item_id, _significant(score)) for item_id, score in best]

    def _session_scores(
        self, session_items: Sequence[str], session_id: str | None = None
    ) -> dict[str, float]:
        """Estimated probability of each candidate being the next click (see the module doc).

        Each source is normalised to a distribution on the fly (``value / total``), in the
        same pass that adds it to the scores and to the calibration candidates."""
        revisits, transitions, neighbours = self._sources(session_items, session_id)
        scores = dict(revisits)
        rest = max(0.0, 1.0 - sum(revisits.values()))
        #: Each candidate's summed probability over both sources (for the calibration).
        combined: dict[str, float] = {}
        # locals: these loops run per candidate (hundreds per call)
        score_of, combined_of = scores.get, combined.get
        trans_share, neigh_share, _ = self.mixture()
        trans_total = _distribution_total(transitions)
        if trans_total is not None:
            scale = rest * trans_share
            add = trans_share > 0.0
            for target, value in transitions.items():
                p = value / trans_total
                combined[target] = p
                if add:
                    scores[target] = score_of(target, 0.0) + scale * p
        neigh_total = _distribution_total(neighbours)
        if neigh_total is not None:
            scale = rest * neigh_share
            add = neigh_share > 0.0
            for target, value in neighbours.items():
                p = value / neigh_total
                combined[target] = combined_of(target, 0.0) + p
                if add:
                    scores[target] = score_of(target, 0.0) + scale * p
        if session_items:
            best = _best_keys(combined, CALIBRATION_CANDIDATES)
            said = {
                item_id: (
                    _share(transitions, trans_total, item_id),
                    _share(neighbours, neigh_total, item_id),
                )
                for item_id in best
            }
            self._remember_candidates(self._session_key(session_items, session_id), said)
        return scores

    def mixture(self) -> tuple[float, float, float]:
        """Learned shares of the next *new* item: (transitions, neighbourhood, other).

        Online EM: each new next click credits the sources in proportion to the probability
        they gave it (``other``: the share no source foresaw), in decayed event-time weights,
        starting from one pseudo-click each.
        """
        prior = self._now
        counts = [c + prior for c in self.mix_counts]
        total = sum(counts)
        return (counts[0] / total, counts[1] / total, counts[2] / total)

    def _sources(
        self, session_items: Sequence[str], session_id: str | None
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """Re-visit probabilities, and the transition and neighbourhood scores of the next
        item (not normalised: :func:`_distribution_total` gives each one's total)."""
        recent = _distinct_recent(session_items, self.revisit_depth)
        revisits: dict[str, float] = {}
        hits_at, chances_at, now = self.revisit_hits, self.revisit_chances, self._now
        for distance, previous in recent:
            hits = hits_at[distance]
            if hits > 0:
                revisits[previous] = hits / (chances_at[distance] + now)
        transitions = self._transition_scores(_distinct_recent(session_items, self.window))
        neighbours = self._neighbour_scores(recent, self._own_session(session_items, session_id))
        return revisits, transitions, neighbours

    def _session_key(self, session_items: Sequence[str], session_id: str | None) -> object:
        return session_id if session_id is not None else _prefix_key(session_items)

    def _own_session(self, session_items: Sequence[str], session_id: str | None) -> int | None:
        """The id of the session being recommended for, if remembered (not its own neighbour)."""
        if session_id is not None:
            return self._open.get(session_id)
        return self._open.get(_prefix_key(session_items)) if session_items else None

    def _remember_candidates(self, key: object, said: dict[str, tuple[float, float]]) -> None:
        """Keep what each source said about the strongest candidates until the next click."""
        pending = self._pending
        pending.pop(key, None)
        pending[key] = said
        if len(pending) > CALIBRATION_SESSIONS:
            del pending[next(iter(pending))]

    def _calibrate(
        self, session_items: Sequence[str], item_id: str, session_id: str | None, weight: float
    ) -> None:
        """One EM step of :meth:`mixture` from the click on ``item_id``."""
        if not session_items or item_id in session_items[-self.revisit_depth * 4 :]:
            return  # nothing to predict, or a re-visit (learned by the re-visit rates)
        key = self._session_key(session_items, session_id)
        said = self._pending.pop(key, None)
        if said is None:
            self._calibration_clock += 1
            if self._calibration_clock % CALIBRATE_EVERY:
                return
            _, transitions, neighbours = self._sources(session_items, session_id)
            p_trans = _share(transitions, _distribution_total(transitions), item_id)
            p_neigh = _share(neighbours, _distribution_total(neighbours), item_id)
        else:
            p_trans, p_neigh = said.get(item_id, (0.0, 0.0))
        share = self.mixture()
        p_other = 1.0 / max(len(self.item_sessions), 1)
        likelihood = (share[0] * p_trans, share[1] * p_neigh, share[2] * p_other)
        total = sum(likelihood)
        for i, value in enumerate(likelihood):
            self.mix_counts[i] += weight * value / total

    def _transition_scores(self, recent: list[tuple[int, str]]) -> dict[str, float]:
        """Links from the session's ``recent`` (rank, item), each source's row scaled."""
        scores: dict[str, float] = {}
        score_of = scores.get
        pseudo = self.shrinkage * self._now
        cooccurrence, followed = self.cooccurrence, self.followed
        for rank, source in recent:
            row = cooccurrence.get(source)
            if not row:
                continue
            scale = 1.0 / (rank * rank * (followed.get(source, 0.0) + pseudo))
            for target, value in row.items():  # locals: runs per link (hundreds per call)
                scores[target] = score_of(target, 0.0) + scale * value
        return scores

    def _neighbour_scores(self, recent: list[tuple[int, str]], own: int | None) -> dict[str, float]:
        """V-SKNN: items of the past sessions most similar to this one (``recent``: its
        distinct (distance, item), the last first; ``own``: its id, which is no neighbour).

        A past session's similarity is the sum of ``1/d`` over the items it shares with the
        current session (``d``: 1 for the last distinct item, 2 for the one before...),
        decayed by its age in event time (the recommender's half-life, as in STAN); the
        ``neighbour_sessions`` most similar vote for their items with their similarity.
        """
        similarity: dict[int, float] = {}
        similarity_of = similarity.get
        sample = self.sessions_per_item
        item_sessions = self.item_sessions
        for distance, item_id in recent:
            ids = item_sessions.get(item_id)
            if not ids:
                continue
            weight = 1.0 / distance
            if len(ids) > sample:
                ids = ids[-sample:]
            if not similarity:
                # The first item's sessions all start at its weight (an item lists each
                # session once: see _index); built in C.
                similarity = dict.fromkeys(ids, weight)
                similarity_of = similarity.get
                continue
            for sid in ids:  # locals: runs per session id (hundreds per call)
                similarity[sid] = similarity_of(sid, 0.0) + weight
        similarity.pop(own, None)  # type: ignore[arg-type]
        if not similarity:
            return {}
        if len(similarity) > self.neighbour_sessions:
            nearest = _best_keys(similarity, self.neighbour_sessions)
        else:
            nearest = list(similarity)
        latest = self._latest_ms or 0
        half_life = self._weight.half_life_ms
        sessions, stamps, exp2 = self.sessions, self.session_ts, math.exp2
        scores: dict[str, float] = {}
        score_of = scores.get
        for sid in nearest:
            items = sessions.get(sid)
            if not items:
                continue  # forgotten (bounded memory)
            age = stamps[sid] - latest  # min(0.0, age) without a call: runs per neighbour
            vote = similarity[sid] * exp2((age if age < 0 else 0.0) / half_life)
            if vote <= 0.0:
                continue
            for item_id in items:  # locals: runs per item of each neighbour (~1000 per call)
                scores[item_id] = score_of(item_id, 0.0) + vote
        # The current session's own items get no vote. Dropping them afterwards is cheaper
        # than a test per vote, and leaves the others' values and order as they are.
        for _, item_id in recent:
            scores.pop(item_id, None)
        return scores

    def _best_boosted(
        self, scores: dict[str, float], taste: dict[str, float], n: int
    ) -> list[tuple[str, float]]:
        """The best ``n`` of ``scores`` after :meth:`_boost`, boosting only the candidates
        that can still reach them.

        When no factor is below 1 a boost only raises a score (``scores`` are >= 0), by at
        most the ``highest`` factor. The ``n`` candidates whose plain score reaches the
        ``n``-th best plain score keep at least that much, so one whose score times
        ``highest`` stays below it cannot be among the best ``n``: most candidates are
        dropped before looking up their categories (rounding is monotonic, so this holds
        for the floating-point products too)."""
        factors = self._taste_factors(taste)
        if 0 < n < len(scores) and min(factors.values()) >= 1.0:
            highest = max(factors.values())
            reach = sorted(scores.values(), reverse=True)[n - 1]
            scores = {item_id: s for item_id, s in scores.items() if s * highest >= reach}
        _apply_factors(scores, factors, self.item_category)
        return _best_by_score_then_id(scores, n)

    def _taste_factors(self, taste: dict[str, float]) -> dict[str, float]:
        """category -> what a candidate of that category is multiplied by."""
        strongest = max(taste.values()) or 1.0
        boost = self.affinity_boost
        return {category: 1.0 + boost * value / strongest for category, value in taste.items()}

    def _boost(self, scores: dict[str, float], taste: dict[str, float]) -> None:
        _apply_factors(scores, self._taste_factors(taste), self.item_category)

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


def _shared(item_id: str) -> str:
    """The one shared object of this item id (``sys.intern``; only plain ``str`` can be)."""
    return sys.intern(item_id) if type(item_id) is str else item_id


def _apply_factors(
    scores: dict[str, float], factors: dict[str, float], item_category: dict[str, str]
) -> None:
    """Multiply each candidate's score by its category's factor (if it has one)."""
    category_of = item_category.get
    for item_id, score in scores.items():  # locals: runs per candidate
        factor = factors.get(category_of(item_id))  # type: ignore[arg-type]
        if factor is not None:
            scores[item_id] = score * factor  # an existing key: the dict keeps its size


def _distinct_recent(session_items: Sequence[str], limit: int) -> list[tuple[int, str]]:
    """(distance, item) for the ``limit`` most recent distinct items, the last one first."""
    recent: list[str] = []
    for item_id in reversed(session_items):
        if item_id not in recent:  # a short list: faster than a set at these sizes
            recent.append(item_id)
            if len(recent) >= limit:
                break
    return list(enumerate(recent, start=1))


def _distribution_total(scores: dict[str, float]) -> float | None:
    """What ``scores`` are divided by to make a distribution (each value over the sum);
    None when the sum is not positive: the source then proposes nothing."""
    total = sum(scores.values())
    return None if total <= 0.0 else total


def _share(scores: dict[str, float], total: float | None, item_id: str) -> float:
    """``item_id``'s probability in ``scores`` normalised by ``total``."""
    if total is None:
        return 0.0
    value = scores.get(item_id)
    return 0.0 if value is None else value / total


def _best_keys(scores: dict[_Key, float], n: int) -> list[_Key]:
    """Same as ``heapq.nlargest(n, scores, key=scores.__getitem__)``: the ``n`` keys of
    highest value, best first, ties in insertion order (a stable sort keeps it, also with
    ``reverse``). The cutoff comes from sorting bare floats (in C), so only the few keys
    that reach it are sorted by a key function."""
    if n <= 0:
        return []
    if n < len(scores):
        cutoff = sorted(scores.values(), reverse=True)[n - 1]
        keys = [key for key, value in scores.items() if value >= cutoff]
    else:
        keys = list(scores)
    keys.sort(key=scores.__getitem__, reverse=True)
    return keys[:n]


def _best_by_score_then_id(scores: dict[str, float], n: int) -> list[tuple[str, float]]:
    """Same as ``heapq.nlargest(n, scores.items(), key=lambda kv: (kv[1], kv[0]))``, with the
    cutoff found among bare floats first (see :func:`_best_keys`)."""
    if n <= 0:
        return []
    if n < len(scores):
        cutoff = sorted(scores.values(), reverse=True)[n - 1]
        best = [kv for kv in scores.items() if kv[1] >= cutoff]
    else:
        best = list(scores.items())
    best.sort(key=_SCORE_THEN_ID, reverse=True)
    return best[:n]


def _prefix_key(items: Sequence[str]) -> tuple[str, ...]:
    """The last ``PREFIX_KEY`` items of a session, consecutive repeats counted once (callers
    may or may not collapse them)."""
    key: list[str] = []
    for item_id in reversed(items):
        if key and key[-1] == item_id:
            continue
        key.append(item_id)
        if len(key) >= PREFIX_KEY:
            break
    return tuple(key)


def _significant(score: float) -> float:
    """Six significant digits: decayed scores can be tiny and must keep their order."""
    return float(f"{score:.6g}")


def _keep_top(row: dict[str, float], n: int) -> dict[str, float]:
    return dict(heapq.nlargest(n, row.items(), key=lambda kv: kv[1]))
