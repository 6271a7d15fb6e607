"""Re-ranking, delivery lanes, bought-together, catalog and the per-user recommendation policy."""

from __future__ import annotations

import pickle

import pytest

from models.catalog import ItemCatalog
from models.delivery import DeliveryLanes
from models.fbt import FrequentlyBoughtTogether
from models.profile import UserProfile, apply_click, price_band_of, record_delivery, record_scan
from models.rerank import RerankPolicy, rerank
from models.serving import ServingModels
from schemas.events import ClickEvent

T0 = 1_767_268_800_000
DAY = 86_400_000
MINUTE = 60_000


def no_category(item: str) -> str | None:
    return None


def no_days(item: str) -> float | None:
    return None


# -- rerank ------------------------------------------------------------------------------------


def test_rerank_without_policy_keeps_order_and_cuts_to_n() -> None:
    candidates = [("a", 3.0), ("b", 2.0), ("c", 1.0)]
    policy = RerankPolicy(delivery_half_days=0, max_per_category=0)
    out = rerank(candidates, 2, policy=policy, category_of=no_category, expected_days=no_days)
    assert out == [("a", 3.0), ("b", 2.0)]


def test_slower_items_lose_half_their_score_per_half_days_extra() -> None:
    days = {"slow": 17.0, "fast": 3.0, "unknown": None, "mid": 10.0}
    policy = RerankPolicy(delivery_half_days=7.0)
    candidates = [("slow", 1.0), ("fast", 0.3), ("unknown", 0.7), ("mid", 0.45)]
    out = dict(
        rerank(candidates, 4, policy=policy, category_of=no_category, expected_days=days.get)
    )
    assert out["fast"] == pytest.approx(0.3)  # the fastest keeps its score
    assert out["slow"] == pytest.approx(1.0 * 0.5**2)  # 14 days slower: a quarter
    assert out["mid"] == pytest.approx(0.45 * 0.5)
    # Unknown delivery time counts as the median of the known ones (10 days).
    assert out["unknown"] == pytest.approx(0.7 * 0.5)


def test_category_cap_keeps_the_best_of_each_category_and_fills_at_the_end() -> None:
    categories = {"s1": "shoes", "s2": "shoes", "s3": "shoes", "b1": "bags", "x": None}
    candidates = [("s1", 5.0), ("s2", 4.0), ("s3", 3.0), ("b1", 2.0), ("x", 1.0)]
    policy = RerankPolicy(delivery_half_days=0, max_per_category=2)
    out = rerank(candidates, 4, policy=policy, category_of=categories.get, expected_days=no_days)
    assert [item for item, _ in out] == ["s1", "s2", "b1", "x"]
    full = rerank(candidates, 5, policy=policy, category_of=categories.get, expected_days=no_days)
    assert [item for item, _ in full] == ["s1", "s2", "b1", "x", "s3"]  # filled, not dropped
    scores = [score for _, score in full]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))


def test_rerank_scores_strictly_decrease_even_for_ties() -> None:
    candidates = [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    out = rerank(
        candidates, 3, policy=RerankPolicy(), category_of=no_category, expected_days=no_days
    )
    assert [item for item, _ in out] == ["a", "b", "c"]
    assert out[0][1] > out[1][1] > out[2][1]


# -- lanes, catalog, bought together ------------------------------------------------------------


def test_lanes_decay_old_deliveries_and_need_enough_weight() -> None:
    lanes = DeliveryLanes(half_life_ms=30 * DAY, min_weight=2.0)
    lanes.observe("CN", "DE", 20.0, ts_ms=T0)
    assert lanes.expected_days("CN", "DE") is None  # one delivery is not enough
    lanes.observe("CN", "DE", 20.0, ts_ms=T0)
    assert lanes.expected_days("CN", "DE") == pytest.approx(20.0)
    # A faster carrier later: recent deliveries weigh more than old ones.
    for _ in range(2):
        lanes.observe("CN", "DE", 8.0, ts_ms=T0 + 60 * DAY)
    assert 8.0 < lanes.expected_days("CN", "DE") < 10.5  # type: ignore[operator]
    # Another origin without history falls back to the destination's mean.
    assert lanes.expected_days("US", "DE") == lanes.expected_days("CN", "DE")
    assert [row[:2] for row in lanes.table()] == [("CN", "DE")]


def test_catalog_keeps_known_facts_and_forgets_the_least_recent() -> None:
    catalog = ItemCatalog(capacity=2)
    catalog.observe("a", category="shoes", origin_country="IT", price_usd=10.0)
    catalog.observe("a", category=None, origin_country=None, price_usd=None)
    assert catalog.items["a"] == ("shoes", "IT", 10.0)
    catalog.observe("b", category="bags", origin_country=None, price_usd=None)
    catalog.observe("a", category=None, origin_country="FR", price_usd=None)  # a is recent again
    catalog.observe("c", category=None, origin_country=None, price_usd=None)
    assert set(catalog.items) == {"a", "c"}
    assert catalog.origin("a") == "FR"


def test_bought_together_counts_a_basket_once_per_item() -> None:
    fbt = FrequentlyBoughtTogether()
    fbt.observe_purchase([], "phone", ts_ms=T0)  # alone: nothing
    assert fbt.drain_changed() == set()
    fbt.observe_purchase(["phone"], "case", ts_ms=T0)
    fbt.observe_purchase(["phone", "case"], "case", ts_ms=T0)  # bought twice: one basket
    fbt.observe_purchase(["phone", "case"], "charger", ts_ms=T0)
    assert fbt.top("phone") == [("case", 1.0), ("charger", 1.0)]
    assert fbt.top("charger") == [("case", 1.0), ("phone", 1.0)]
    fbt.observe_purchase(["phone"], "screen", ts_ms=T0)  # a second phone basket
    assert dict(fbt.top("phone")) == {"case": 0.5, "charger": 0.5, "screen": 0.5}
    assert fbt.top("unknown") == []


def test_bought_together_forgets_old_bundles() -> None:
    fbt = FrequentlyBoughtTogether(half_life_ms=10 * DAY)
    for _ in range(3):
        fbt.observe_purchase(["phone"], "old-case", ts_ms=T0)
    for _ in range(2):
        fbt.observe_purchase(["phone"], "new-case", ts_ms=T0 + 100 * DAY)
    assert fbt.top("phone")[0][0] == "new-case"


# -- profile fields ---------------------------------------------------------------------------


def make_click(i: int, ts: int, **fields: object) -> ClickEvent:
    base = {"event_id": f"e{i}", "ts": ts, "user_id": "u1", "session_id": "s1", "type": "view"}
    base["item_id"] = f"i{i}"
    base.update(fields)
    return ClickEvent.model_validate(base)


def test_price_band_follows_what_the_user_buys_more_than_what_they_view() -> None:
    profile = UserProfile.new("u1")
    for i in range(4):
        apply_click(profile, make_click(i, T0 + i * MINUTE, price=10.0, currency="USD"))
    assert profile.price_band() == "budget"
    apply_click(
        profile, make_click(9, T0 + 9 * MINUTE, type="purchase", price=150.0, currency="USD")
    )
    assert profile.price_band() == "premium"  # 5 (purchase) beats 4 views
    data = profile.to_redis_hash()
    assert data["price_band"] == "premium"
    assert data["avg_price_usd"] == pytest.approx((4 * 10 + 150) / 5)
    assert price_band_of(99.99) == "mid" and price_band_of(0.0) == "budget"


def test_dwell_and_session_depth_come_from_event_times() -> None:
    profile = UserProfile.new("u1")
    apply_click(profile, make_click(1, T0))
    apply_click(profile, make_click(2, T0 + 20_000))
    apply_click(profile, make_click(3, T0 + 60_000))
    # A new session: the gap is not dwell.
    apply_click(profile, make_click(4, T0 + 2 * 3_600_000, session_id="s2"))
    data = profile.to_redis_hash()
    assert data["avg_dwell_s"] == pytest.approx(30.0)  # (20 + 40) / 2
    assert data["avg_session_depth"] == pytest.approx(2.0)  # 4 events, 2 sessions
    assert data["session_depth"] == 1


def test_scans_and_deliveries_build_the_delivery_experience() -> None:
    profile = UserProfile.new("u1")
    assert profile.to_redis_hash()["avg_delivery_days"] == ""
    record_scan(profile, T0 + DAY, "sc2", open_shipments=2)
    record_scan(profile, T0, "sc1", open_shipments=1)  # an older scan: freshness stays
    assert profile.freshness() == (T0 + DAY, "sc2")
    record_delivery(profile, 6.0, on_time=False)
    record_delivery(profile, 2.0, on_time=True)
    record_delivery(profile, 4.0, on_time=None)  # no promise: not late
    data = profile.to_redis_hash()
    assert data["deliveries"] == 3
    assert data["avg_delivery_days"] == pytest.approx(4.0)
    assert data["late_delivery_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert data["open_shipments"] == 1
    assert data["last_event_ts"] == T0 + DAY


# -- the recommendation policy -------------------------------------------------------------------


def trained_models() -> ServingModels:
    models = ServingModels()
    for u in range(4):
        session: list[str] = []
        for item in ("phone", "case"):
            click = make_click(0, T0, event_id=f"{u}{item}", item_id=item, category="tech")
            models.learn_click(click, session_before=session, basket_before=[], country="DE")
            session.append(item)
    for u in range(6):
        click = make_click(0, T0, event_id=f"b{u}", item_id="bestseller", category="home")
        models.learn_click(click, session_before=[], basket_before=[], country="DE")
    return models


def test_personalised_users_get_session_recs_and_opted_out_users_only_popular_ones() -> None:
    models = trained_models()
    profile = UserProfile.new("me")
    apply_click(profile, make_click(1, T0, item_id="phone", country="DE", category="tech"))
    policy = RerankPolicy()
    chosen = models.recommend_for(profile, n=3, policy=policy)
    assert chosen.items[0][0] == "case"
    assert (chosen.personalised, chosen.basis) == (True, "session")

    apply_click(profile, make_click(2, T0 + 1, item_id="phone", personalisation=False))
    anonymous = models.recommend_for(profile, n=3, policy=policy)
    assert (anonymous.personalised, anonymous.basis) == (False, "popular-country")
    assert anonymous.items[0][0] == "bestseller"
    popular = [item for item, _ in models.recommender.top_popular("DE", 3)]
    assert [item for item, _ in anonymous.items] == popular


def test_just_bought_items_are_not_recommended_to_personalised_users() -> None:
    models = trained_models()
    profile = UserProfile.new("me")
    apply_click(profile, make_click(1, T0, item_id="phone", country="DE"))
    apply_click(profile, make_click(2, T0 + 1, item_id="case", type="purchase"))
    chosen = models.recommend_for(profile, n=5, policy=RerankPolicy())
    assert "case" not in [item for item, _ in chosen.items]


def test_serving_models_checkpoint_round_trip() -> None:
    models = trained_models()
    blob = ServingModels.compress_checkpoint(models.pickle())
    restored = ServingModels.from_checkpoint(blob)
    profile = UserProfile.new("me")
    apply_click(profile, make_click(1, T0, item_id="phone", country="DE"))
    policy = RerankPolicy()
    assert restored.recommend_for(profile, n=5, policy=policy) == models.recommend_for(
        profile, n=5, policy=policy
    )
    with pytest.raises(ValueError, match="format"):
        ServingModels.from_checkpoint(b"\x00\x09" + blob[2:])
    with pytest.raises(ValueError, match="ServingModels"):
        ServingModels.from_checkpoint(ServingModels.compress_checkpoint(pickle.dumps({})))
