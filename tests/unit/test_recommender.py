"""Session recommender: co-occurrence, event-time recency, popularity fallbacks, bounds."""

from __future__ import annotations

import heapq
import pickle
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.recommender import GLOBAL, SessionRecommender, _best_by_score_then_id, _best_keys

T0 = 1_767_225_600_000
DAY = 86_400_000
YEAR = 365 * DAY


def play(
    r: SessionRecommender,
    items: Sequence[str],
    *,
    ts: int = T0,
    country: str | None = "DE",
    kind: str = "view",
    categories: dict[str, str] | None = None,
) -> None:
    """One session: each click is observed after the items before it."""
    seen: list[str] = []
    for item in items:
        category = (categories or {}).get(item)
        r.observe(seen, item, country=country, category=category, ts_ms=ts, kind=kind)
        seen.append(item)


def ranked(recs: list[tuple[str, float]]) -> list[str]:
    return [item for item, _ in recs]


def test_usual_next_item_ranks_first() -> None:
    r = SessionRecommender()
    for _ in range(5):
        play(r, ["phone", "case"])
    for _ in range(2):
        play(r, ["phone", "charger"])
    play(r, ["phone", "tv"])
    recs = ranked(r.recommend(["phone"], country="DE", n=3))
    assert recs[:3] == ["case", "charger", "tv"]


def test_scores_are_sorted_best_first_and_n_is_respected() -> None:
    r = SessionRecommender()
    for i in range(30):
        play(r, ["a", f"x{i}"])
    recs = r.recommend(["a"], country="DE", n=7)
    assert len(recs) == 7
    scores = [s for _, s in recs]
    assert scores == sorted(scores, reverse=True)


def test_direction_matters_what_came_next_beats_what_came_before() -> None:
    r = SessionRecommender(popularity_weight=0.0)
    play(r, ["a", "b"])  # after a: b (forward)
    play(r, ["c", "a"])  # before a: c (only the weaker reverse link)
    assert ranked(r.recommend(["a"], country="DE", n=2)) == ["b", "c"]


def test_newer_sessions_outrank_older_ones_in_event_time() -> None:
    r = SessionRecommender()  # half-life 3 days
    for _ in range(3):
        play(r, ["a", "old"], ts=T0)
    play(r, ["a", "new"], ts=T0)
    assert ranked(r.recommend(["a"], country="DE", n=2)) == ["old", "new"]
    # Ten days later (more than 3 half-lives) one session outweighs the three old ones.
    play(r, ["a", "new"], ts=T0 + 10 * DAY)
    assert ranked(r.recommend(["a"], country="DE", n=2)) == ["new", "old"]


def test_the_same_sessions_without_a_time_gap_keep_the_old_winner() -> None:
    r = SessionRecommender()
    for _ in range(3):
        play(r, ["a", "old"], ts=T0)
    for _ in range(2):
        play(r, ["a", "new"], ts=T0)
    assert ranked(r.recommend(["a"], country="DE", n=2)) == ["old", "new"]


def test_user_without_session_gets_their_countrys_popular_items() -> None:
    r = SessionRecommender()
    for _ in range(3):
        play(r, ["de-hit"], country="DE")
    play(r, ["de-other"], country="DE")
    for _ in range(10):
        play(r, ["fr-hit"], country="FR")
    assert ranked(r.recommend([], country="DE", n=2)) == ["de-hit", "de-other"]
    assert ranked(r.recommend([], country="FR", n=1)) == ["fr-hit"]


def test_unknown_or_missing_country_falls_back_to_global_popularity() -> None:
    r = SessionRecommender()
    for _ in range(3):
        play(r, ["de-hit"], country="DE")
    for _ in range(5):
        play(r, ["fr-hit"], country="FR")
    play(r, ["nowhere"], country=None)
    expected = ["fr-hit", "de-hit", "nowhere"]
    assert ranked(r.recommend([], country="JP", n=3)) == expected
    assert ranked(r.recommend([], country=None, n=3)) == expected
    assert set(r.popularity) == {"DE", "FR", GLOBAL}


def test_purchases_weigh_more_than_views_and_searches_do_not_count() -> None:
    r = SessionRecommender()
    play(r, ["viewed"], kind="view")
    play(r, ["viewed"], kind="view")
    play(r, ["bought"], kind="purchase")
    for _ in range(10):
        play(r, ["searched"], kind="search")
    top = ranked(r.recommend([], country="DE", n=5))
    assert top == ["bought", "viewed"]


def test_excluded_items_are_never_returned() -> None:
    r = SessionRecommender()
    for i in range(10):
        play(r, ["a", f"b{i}"])
        play(r, [f"b{i}"])
    excluded = {"b0", "b1", "b2", "a"}
    recs = ranked(r.recommend(["a"], country="DE", n=50, exclude=excluded))
    assert recs
    assert not excluded & set(recs)
    assert set(recs) == {f"b{i}" for i in range(3, 10)}


def test_non_personalised_answer_ignores_the_session_and_taste() -> None:
    r = SessionRecommender()
    for _ in range(5):
        play(r, ["popular"], country="DE")
    for _ in range(2):
        play(r, ["s1", "neighbour-only"], country="FR")  # neighbour of s1, not popular in DE
    expected = r.recommend([], country="DE", n=5, personalised=False)
    got = r.recommend(
        ["s1"],
        country="DE",
        n=5,
        top_categories=[("toys", 10.0)],
        personalised=False,
    )
    assert got == expected
    assert "neighbour-only" not in ranked(got)
    assert ranked(got) == ranked(r.recommend([], country="DE", n=5))
    # The personalised answer for the same session does use the neighbour.
    assert ranked(r.recommend(["s1"], country="DE", n=1)) == ["neighbour-only"]


def test_category_affinity_boost_reorders_candidates() -> None:
    r = SessionRecommender()
    cats = {"shoe": "shoes", "book": "books"}
    for _ in range(4):
        play(r, ["a", "book"], categories=cats)
    for _ in range(3):
        play(r, ["a", "shoe"], categories=cats)
    assert ranked(r.recommend(["a"], country="DE", n=2)) == ["book", "shoe"]
    liked = r.recommend(["a"], country="DE", n=2, top_categories=[("shoes", 2.0), ("x", 1.0)])
    assert ranked(liked) == ["shoe", "book"]
    # The boost is relative to the strongest category: a weak taste boosts less.
    weak = r.recommend(["a"], country="DE", n=2, top_categories=[("shoes", 0.01), ("x", 1.0)])
    assert ranked(weak) == ["book", "shoe"]


def test_affinity_boost_can_lift_a_candidate_into_a_short_list() -> None:
    r = SessionRecommender(popularity_weight=0.0)
    cats = {"shoe": "shoes", "sandal": "shoes"}
    for item, sessions in {"b0": 8, "b1": 7, "b2": 6, "b3": 2, "shoe": 5, "sandal": 2}.items():
        for _ in range(sessions):
            play(r, ["a", item], categories=cats)
    assert ranked(r.recommend(["a"], country="DE", n=3)) == ["b0", "b1", "b2"]
    taste = [("shoes", 1.0)]  # x1.5: shoe (5) passes b1 (7), sandal (2) reaches nothing
    short = r.recommend(["a"], country="DE", n=3, top_categories=taste)
    assert ranked(short) == ["b0", "shoe", "b1"]
    # The same as the head of the whole boosted list.
    assert short == r.recommend(["a"], country="DE", n=6, top_categories=taste)[:3]


def test_neighbours_per_item_are_bounded_and_keep_the_strongest() -> None:
    r = SessionRecommender(neighbours_per_item=5)
    for _ in range(20):
        play(r, ["a", "strong"])
    for i in range(50):
        play(r, ["a", f"weak{i}"])
    row = r.cooccurrence["a"]
    assert len(row) <= 2 * 5
    assert "strong" in row
    assert all(len(neighbours) <= 10 for neighbours in r.cooccurrence.values())
    assert ranked(r.recommend(["a"], country="DE", n=1)) == ["strong"]


def test_country_popularity_is_bounded() -> None:
    r = SessionRecommender(items_per_country=10)
    for _ in range(5):
        play(r, ["hit"])
    for i in range(100):
        play(r, [f"tail{i}"])
    assert len(r.popularity["DE"]) <= 20
    assert len(r.popularity[GLOBAL]) <= 20
    assert ranked(r.recommend([], country="DE", n=1)) == ["hit"]


def test_window_limits_how_far_back_a_session_links() -> None:
    r = SessionRecommender(window=2, popularity_weight=0.0)
    play(r, ["far", "mid", "near", "target"])
    assert "target" in r.cooccurrence["near"]
    assert "target" in r.cooccurrence["mid"]
    assert "target" not in r.cooccurrence.get("far", {})


def test_rescale_keeps_the_ranking_when_event_time_advances_by_years() -> None:
    r = SessionRecommender()
    for _ in range(3):
        play(r, ["a", "b"], ts=T0)
    play(r, ["a", "c"], ts=T0)
    before = ranked(r.recommend(["a"], country="DE", n=2))
    assert before == ["b", "c"]
    # Two years later (~243 half-lives): the growing weight would exceed 1e12 without a rescale.
    later = T0 + 2 * YEAR
    play(r, ["x", "y"], ts=later)
    assert r._weight.origin_ms == later  # rebased
    assert all(v < 1e12 for row in r.cooccurrence.values() for v in row.values())
    assert ranked(r.recommend(["a"], country="DE", n=2, personalised=True))[:2] == ["b", "c"]
    # New learning still works on the new scale: fresh events outweigh the old ones.
    play(r, ["a", "c"], ts=later)
    recs = ranked(r.recommend(["a"], country="DE", n=10))
    assert recs[0] == "c"
    assert recs.index("c") < recs.index("b")


def test_rescale_matches_a_recommender_that_never_saw_the_old_origin() -> None:
    """Scores are relative: rebasing gives the same ranking as a fresh, later origin."""
    later = T0 + 200 * DAY
    rescaled = SessionRecommender()
    play(rescaled, ["warm", "up"], ts=T0)
    fresh = SessionRecommender()
    for r in (rescaled, fresh):
        for i in range(4):
            play(r, ["a", f"n{i}"] * (i + 1), ts=later + i * DAY)
    got = rescaled.recommend(["a"], country=None, n=4)
    want = fresh.recommend(["a"], country=None, n=4)
    assert ranked(got) == ranked(want)
    assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-6)


def test_a_valid_far_future_click_does_not_crash_the_recommender() -> None:
    r = SessionRecommender()
    play(r, ["a", "b"], ts=T0)
    play(r, ["a", "c"], ts=4_102_444_799_999)  # 2099-12-31, accepted by the event schema
    assert ranked(r.recommend(["a"], country="DE", n=1)) == ["c"]


# -- session neighbourhood (V-SKNN), online mixture, bounds --------------------------------------


def test_session_neighbours_recommend_what_similar_sessions_contained() -> None:
    r = SessionRecommender(window=1, popularity_weight=0.0)
    # x never directly follows b: only sessions that share a and b also contain x.
    for _ in range(3):
        play(r, ["x", "a", "b"])
    play(r, ["y", "q"])
    recs = ranked(r.recommend(["a", "b"], country="DE", n=5))
    assert "x" in recs
    assert "y" not in recs


def test_sessions_are_recognised_by_their_items_or_a_session_id() -> None:
    r = SessionRecommender()
    play(r, ["a", "b", "b", "c"])
    assert list(r.sessions.values()) == [["a", "b", "c"]]
    for item, before in (("p", []), ("q", ["p"])):
        r.observe(before, item, country=None, category=None, ts_ms=T0, kind="view", session_id="u1")
    assert list(r.sessions.values())[-1] == ["p", "q"]
    assert r.item_sessions["p"] == [1]


def test_neighbourhood_memory_is_bounded() -> None:
    r = SessionRecommender(max_sessions=10, sessions_per_item=4, session_length=3)
    for i in range(50):
        play(r, ["hub", f"i{i}", f"j{i}", f"k{i}", f"l{i}"])
    assert len(r.sessions) <= 10
    assert all(len(items) <= 3 for items in r.sessions.values())
    assert len(r.item_sessions["hub"]) <= 8
    assert len(r._open) <= 10
    recs = r.recommend(["hub"], country=None, n=5)  # forgotten sessions are skipped
    assert len(recs) == 5


def test_recommendations_are_deterministic_and_survive_pickling() -> None:
    import pickle

    def build() -> SessionRecommender:
        r = SessionRecommender()
        for i in range(40):
            play(r, ["a", f"b{i % 7}", f"c{i % 5}", "a"], ts=T0 + i * 60_000)
        return r

    first, second = build(), build()
    query = ["a", "b3"]
    assert first.recommend(query, country="DE", n=10) == second.recommend(query, country="DE", n=10)
    copy = pickle.loads(pickle.dumps(first))
    assert copy.recommend(query, country="DE", n=10) == first.recommend(query, country="DE", n=10)
    play(copy, ["a", "b3", "new"], ts=T0 + DAY)
    assert "new" in ranked(copy.recommend(query, country="DE", n=30))
    assert "new" not in ranked(first.recommend(query, country="DE", n=30))


def test_old_neighbour_sessions_decay_in_event_time() -> None:
    r = SessionRecommender(window=1, popularity_weight=0.0)
    for _ in range(3):
        play(r, ["old", "a", "b"], ts=T0)
    play(r, ["new", "a", "b"], ts=T0 + 10 * DAY)
    recs = ranked(r.recommend(["a", "b"], country="DE", n=10))
    assert recs.index("new") < recs.index("old")


def test_mixture_learns_which_source_predicts_new_items() -> None:
    r = SessionRecommender()
    start = r.mixture()
    assert start == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    for _ in range(200):
        seen = ["a"]
        r.observe([], "a", country=None, category=None, ts_ms=T0, kind="view")
        r.recommend(seen, country=None, n=20)  # what each source said is kept for the click
        r.observe(seen, "b", country=None, category=None, ts_ms=T0, kind="view")
    transitions, neighbours, other = r.mixture()
    # "other" keeps some credit: with a two-item catalog chance is 1/2
    assert other < 0.15 < 0.85 < transitions + neighbours


# The ranking helpers replace heapq.nlargest on the hot path: same result, ties included.
_SCORES = st.dictionaries(
    st.text(alphabet="abcdef", min_size=1, max_size=3),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(0, 10, allow_nan=False),
    max_size=40,
)


@given(scores=_SCORES, n=st.integers(0, 45))
def test_best_keys_is_nlargest_with_ties_in_insertion_order(
    scores: dict[str, float], n: int
) -> None:
    assert _best_keys(scores, n) == heapq.nlargest(n, scores, key=scores.__getitem__)


@given(scores=_SCORES, n=st.integers(0, 45))
def test_best_by_score_then_id_is_nlargest_of_score_and_id(
    scores: dict[str, float], n: int
) -> None:
    expected = heapq.nlargest(n, scores.items(), key=lambda kv: (kv[1], kv[0]))
    assert _best_by_score_then_id(scores, n) == expected


def test_interned_image_recommends_the_same_after_a_pickle_round_trip() -> None:
    r = SessionRecommender()
    cats = {"a": "x", "b": "y", "c": "x"}
    for items in (["a", "b", "c"], ["b", "c", "d"], ["a", "c"], ["c", "d", "a"]):
        # Ids built at run time, as decoded from JSON: a new string object per click.
        play(r, ["".join(list(i)) for i in items], categories=cats)
    before = r.recommend(["a", "c"], country="DE", n=5, top_categories=[("x", 1.0)])
    copy = pickle.loads(pickle.dumps(r))
    assert copy.recommend(["a", "c"], country="DE", n=5, top_categories=[("x", 1.0)]) == before
    # Item ids in the restored tables are shared objects again (one per id).
    restored = [i for items in copy.sessions.values() for i in items if i == "c"]
    assert len(restored) > 1 and all(i is restored[0] for i in restored)
