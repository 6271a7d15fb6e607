"""User profiles: RFM in USD, idempotence, sessions, decayed category affinity, persistence."""

from __future__ import annotations

import orjson
import pytest

from models.fx import to_usd
from models.profile import (
    AFFINITY_HALF_LIFE_MS,
    MAX_CATEGORIES,
    RECENT_EVENT_IDS,
    RECENT_PURCHASES,
    SESSION_GAP_MS,
    SESSION_ITEMS,
    UserProfile,
    apply_click,
)
from schemas.events import ClickEvent

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z (a Thursday, 00h UTC)
MINUTE = 60_000
DAY = 86_400_000

_counter = iter(range(1_000_000))


def click(ts: int = T0, **overrides: object) -> ClickEvent:
    value: dict[str, object] = {
        "event_id": f"e{next(_counter)}",
        "ts": ts,
        "user_id": "u1",
        "session_id": "s1",
        "type": "view",
        "item_id": "i1",
    }
    value.update(overrides)
    return ClickEvent.model_validate(value)


def profile_from(*events: ClickEvent) -> UserProfile:
    profile = UserProfile.new("u1")
    for event in events:
        apply_click(profile, event)
    return profile


# -- RFM ------------------------------------------------------------------------------------------


def test_rfm_counts_and_monetary_value_in_usd() -> None:
    profile = profile_from(
        click(T0, type="view", item_id="a"),
        click(T0 + MINUTE, type="add_to_cart", item_id="a"),
        click(T0 + 2 * MINUTE, type="purchase", item_id="a", price=100.0, currency="EUR"),
        click(T0 + 3 * MINUTE, type="purchase", item_id="b", price=10_000.0, currency="JPY"),
        click(T0 + 4 * MINUTE, type="search", item_id=None, query="socks"),
    )
    assert profile.purchases == 2
    assert profile.views == 1
    assert profile.carts == 1
    assert profile.searches == 1
    assert profile.events == 5
    # 100 EUR at 1.08 and 10,000 JPY at 0.0068 USD per unit.
    assert profile.monetary_usd == pytest.approx(108.0 + 68.0)
    assert profile.monetary_usd == pytest.approx(to_usd(100.0, "EUR") + to_usd(10_000, "JPY"))
    assert profile.first_ts == T0
    assert profile.last_ts == T0 + 4 * MINUTE
    assert profile.recent_purchases == ["a", "b"]


def test_purchase_in_an_unknown_currency_adds_no_money_but_counts() -> None:
    profile = profile_from(click(type="purchase", price=50.0, currency="XXX"))
    assert (profile.purchases, profile.monetary_usd) == (1, 0.0)


def test_recency_is_the_latest_event_time_even_when_events_arrive_out_of_order() -> None:
    late = click(T0 + 10 * MINUTE, event_id="newest")
    early = click(T0, event_id="older")
    profile = profile_from(late, early)
    assert profile.last_ts == T0 + 10 * MINUTE
    assert profile.last_event_id == "newest"
    assert profile.first_ts == T0  # the earliest event time seen, whatever the arrival order
    assert profile.to_redis_hash()["recency_ts"] == T0 + 10 * MINUTE


# -- idempotence ----------------------------------------------------------------------------------


def test_same_event_twice_counts_once() -> None:
    profile = UserProfile.new("u1")
    purchase = click(type="purchase", price=20.0, currency="USD", category="shoes")
    assert apply_click(profile, purchase) is True
    snapshot = profile.to_bytes()
    assert apply_click(profile, purchase) is False
    assert profile.to_bytes() == snapshot
    assert (profile.purchases, profile.monetary_usd, profile.events) == (1, 20.0, 1)


def test_redelivery_after_other_events_is_still_ignored() -> None:
    first = click(T0, type="purchase", price=20.0, currency="USD")
    profile = profile_from(first, *(click(T0 + i * MINUTE) for i in range(1, 10)))
    assert apply_click(profile, first) is False
    assert profile.purchases == 1


def test_redelivered_event_survives_a_round_trip_through_bytes() -> None:
    event = click(type="purchase", price=5.0, currency="USD")
    profile = UserProfile.from_bytes(profile_from(event).to_bytes())
    assert apply_click(profile, event) is False
    assert profile.purchases == 1


def test_each_remembered_event_keeps_the_position_it_was_applied_at() -> None:
    profile = UserProfile.new("u1")
    first, second, third = click(T0), click(T0 + 1), click(T0 + 2)
    apply_click(profile, first, (3, 17))
    apply_click(profile, second)  # no position known
    apply_click(profile, third, (3, 19))
    profile = UserProfile.from_bytes(profile.to_bytes())
    assert profile.position_of(first.event_id) == (3, 17)
    assert profile.position_of(second.event_id) is None
    assert profile.position_of(third.event_id) == (3, 19)
    assert profile.position_of("never-seen") is None
    assert apply_click(profile, first, (3, 40)) is False
    assert profile.position_of(first.event_id) == (3, 17)  # the first position stays


def test_a_profile_stored_before_positions_were_kept_still_loads() -> None:
    old = profile_from(*(click(T0 + i * MINUTE) for i in range(RECENT_EVENT_IDS)))
    stored = orjson.loads(old.to_bytes())
    del stored["recent_event_positions"]
    profile = UserProfile.from_bytes(orjson.dumps(stored))
    old_ids = list(profile.recent_event_ids)
    assert [profile.position_of(i) for i in old_ids] == [None] * RECENT_EVENT_IDS
    # New clicks get positions; the old ids keep none, until they are forgotten.
    news = [click(T0 + (100 + i) * MINUTE) for i in range(RECENT_EVENT_IDS + 1)]
    for offset, event in enumerate(news[:3]):
        apply_click(profile, event, (0, offset))
    assert [profile.position_of(e.event_id) for e in news[:3]] == [(0, 0), (0, 1), (0, 2)]
    assert profile.position_of(old_ids[-1]) is None
    assert old_ids[0] not in profile.recent_event_ids
    for offset, event in enumerate(news[3:], start=3):
        apply_click(profile, event, (0, offset))
    assert len(profile.recent_event_ids) == len(profile.recent_event_positions)
    assert len(profile.recent_event_ids) == RECENT_EVENT_IDS
    assert [profile.position_of(e.event_id) for e in news[1:]] == [
        (0, offset) for offset in range(1, RECENT_EVENT_IDS + 1)
    ]


# -- sessions -------------------------------------------------------------------------------------


def test_new_session_id_starts_a_new_session() -> None:
    profile = profile_from(
        click(T0, session_id="s1", item_id="a"),
        click(T0 + MINUTE, session_id="s1", item_id="b"),
        click(T0 + 2 * MINUTE, session_id="s2", item_id="c"),
    )
    assert profile.sessions == 2
    assert profile.session_id == "s2"
    assert profile.session_items == ["c"]
    assert profile.session_events == 1
    assert profile.session_start == T0 + 2 * MINUTE


def test_long_gap_under_the_same_session_id_starts_a_new_session() -> None:
    profile = profile_from(click(T0, item_id="a"), click(T0 + SESSION_GAP_MS + 1, item_id="b"))
    assert profile.sessions == 2
    assert profile.session_items == ["b"]
    assert profile.session_start == T0 + SESSION_GAP_MS + 1


def test_gap_of_exactly_thirty_minutes_keeps_the_session() -> None:
    profile = profile_from(click(T0, item_id="a"), click(T0 + SESSION_GAP_MS, item_id="b"))
    assert profile.sessions == 1
    assert profile.session_items == ["a", "b"]
    assert profile.session_events == 2


def test_session_items_skip_repeats_and_removals() -> None:
    profile = profile_from(
        click(T0, item_id="a"),
        click(T0 + 1, item_id="a"),  # the same item again in a row
        click(T0 + 2, item_id="b", type="remove_from_cart"),
        click(T0 + 3, item_id="c", type="add_to_cart"),
        click(T0 + 4, item_id=None, type="search"),
    )
    assert profile.session_items == ["a", "c"]
    assert profile.session_events == 5


# -- category affinity --------------------------------------------------------------------------


def test_old_strong_category_loses_to_a_recent_weak_one() -> None:
    # A purchase (weight 5) a month ago against a single view (weight 1) today.
    profile = profile_from(
        click(T0, type="purchase", category="shoes"),
        click(T0 + 30 * DAY, type="view", item_id="i2", category="books"),
    )
    ranking = [c for c, _ in profile.top_categories(profile.last_ts)]
    assert ranking == ["books", "shoes"]
    # ...but seen from the purchase's own time, shoes were clearly ahead.
    early = profile.affinity_at(T0)
    assert early["shoes"] == pytest.approx(5.0)


def test_affinity_halves_every_half_life_of_event_time() -> None:
    profile = profile_from(click(T0, type="add_to_cart", category="toys"))
    assert profile.affinity_at(T0)["toys"] == pytest.approx(3.0)
    assert profile.affinity_at(T0 + AFFINITY_HALF_LIFE_MS)["toys"] == pytest.approx(1.5)
    assert profile.affinity_at(T0 + 2 * AFFINITY_HALF_LIFE_MS)["toys"] == pytest.approx(0.75)


def test_affinity_depends_on_event_time_not_on_arrival_order() -> None:
    events = [
        click(T0, category="a"),
        click(T0 + DAY, type="purchase", category="b"),
        click(T0 + 3 * DAY, type="add_to_cart", category="a"),
    ]
    forward = profile_from(*events)
    backward = profile_from(*reversed(events))
    at = T0 + 4 * DAY
    assert forward.affinity_at(at) == pytest.approx(backward.affinity_at(at))


def test_categories_are_bounded_and_the_weakest_is_forgotten() -> None:
    profile = profile_from(click(T0, type="purchase", category="strong"))
    for i in range(MAX_CATEGORIES + 10):
        apply_click(profile, click(T0 + i, category=f"c{i:02d}"))
    assert len(profile.affinity) == MAX_CATEGORIES
    assert "strong" in profile.affinity
    assert profile.top_categories(profile.last_ts, n=1)[0][0] == "strong"
    assert len(profile.top_categories(profile.last_ts)) == 5


# -- bounded lists --------------------------------------------------------------------------------


def test_session_items_and_recent_purchases_are_bounded_and_keep_the_newest() -> None:
    n = max(SESSION_ITEMS, RECENT_PURCHASES) + 15
    profile = profile_from(
        *(
            click(T0 + i, type="purchase", item_id=f"i{i}", price=1.0, currency="USD")
            for i in range(n)
        )
    )
    assert profile.session_items == [f"i{i}" for i in range(n - SESSION_ITEMS, n)]
    assert profile.recent_purchases == [f"i{i}" for i in range(n - RECENT_PURCHASES, n)]
    assert profile.purchases == n
    assert len(profile.recent_event_ids) <= 64


# -- persistence and the Redis view -------------------------------------------------------------


def _rich_profile() -> UserProfile:
    return profile_from(
        click(T0, category="shoes", country="DE", currency="EUR", lang="de", device="ios"),
        click(T0 + 3_600_000, type="purchase", price=12.5, currency="EUR", category="shoes"),
        click(T0 + 7_200_000, type="search", item_id=None, query="hats", device="web"),
        click(T0 + 9_000_000, item_id="i2", category="hats", device="ios"),
    )


def test_bytes_round_trip_is_lossless() -> None:
    profile = _rich_profile()
    restored = UserProfile.from_bytes(profile.to_bytes())
    assert restored == profile
    assert restored.to_redis_hash() == profile.to_redis_hash()
    # And the restored profile keeps working.
    apply_click(restored, click(T0 + 9_100_000, item_id="i3", category="hats"))
    assert restored.events == profile.events + 1


def test_redis_hash_has_the_documented_flat_fields() -> None:
    profile = _rich_profile()
    data = profile.to_redis_hash()
    assert set(data) == {
        "user_id",
        "last_event_ts",
        "first_event_ts",
        "recency_ts",
        "frequency_purchases",
        "monetary_usd",
        "events",
        "views",
        "carts",
        "sessions",
        "country",
        "currency",
        "lang",
        "device",
        "peak_hours",
        "top_categories",
        "session_depth",
        "personalisation",
        "segment",
        "last_click_ts",
        "avg_session_depth",
        "avg_dwell_s",
        "price_band",
        "avg_price_usd",
        "deliveries",
        "avg_delivery_days",
        "late_delivery_share",
        "open_shipments",
    }
    for key, value in data.items():
        assert type(value) in (str, int, float), key
    assert data["user_id"] == "u1"
    assert data["frequency_purchases"] == 1
    assert data["monetary_usd"] == pytest.approx(13.5)
    assert data["country"] == "DE" and data["lang"] == "de"
    assert data["device"] == "ios"  # 2 of 3 device clicks
    assert data["last_event_ts"] == T0 + 9_000_000
    assert data["personalisation"] == 1
    hours = orjson.loads(data["peak_hours"])
    assert set(hours) == {0, 1, 2} and len(hours) == 3
    top = orjson.loads(data["top_categories"])
    assert [c for c, _ in top] == ["shoes", "hats"]


def test_empty_profile_hash_is_still_flat() -> None:
    data = UserProfile.new("u9").to_redis_hash()
    assert data["device"] == ""
    assert orjson.loads(data["peak_hours"]) == []
    assert orjson.loads(data["top_categories"]) == []
    assert all(type(v) in (str, int, float) for v in data.values())


# -- personalisation ------------------------------------------------------------------------------


def test_personalisation_follows_the_latest_click() -> None:
    profile = profile_from(click(T0))
    assert profile.personalisation is True
    apply_click(profile, click(T0 + 1, personalisation=False))
    assert profile.personalisation is False
    assert profile.to_redis_hash()["personalisation"] == 0
    apply_click(profile, click(T0 + 2))  # no flag sent: the default (allowed) applies
    assert profile.personalisation is True
    apply_click(profile, click(T0 + 3, personalisation=False))
    assert UserProfile.from_bytes(profile.to_bytes()).personalisation is False


def test_late_older_click_does_not_undo_a_newer_opt_out() -> None:
    profile = profile_from(click(T0 + 10 * MINUTE, personalisation=False))
    apply_click(profile, click(T0, personalisation=True))  # delivered late
    assert profile.personalisation is False


def test_a_replay_longer_than_the_remembered_ids_is_recognised_by_its_offsets() -> None:
    """After a crash a heavy user's replayed clicks can outnumber ``recent_event_ids``: those
    whose ids were forgotten are still replays, since they are at or before the furthest
    position applied on the user's partition."""
    events = [click(T0 + i * MINUTE) for i in range(RECENT_EVENT_IDS * 2)]
    profile = UserProfile.new("u1")
    for offset, event in enumerate(events, start=100):
        assert apply_click(profile, event, (2, offset)) is True
    profile = UserProfile.from_bytes(profile.to_bytes())
    assert events[0].event_id not in profile.recent_event_ids
    for offset, event in enumerate(events, start=100):
        assert apply_click(profile, event, (2, offset)) is False
    assert profile.events == len(events)
    # A new click further on is applied; the same offset on another partition is not a replay.
    assert apply_click(profile, click(T0 + 999 * MINUTE), (2, 100 + len(events))) is True
    assert apply_click(profile, click(T0 + 1000 * MINUTE), (3, 5)) is True
    assert profile.applied_through == [3, 5]
    assert profile.events == len(events) + 2


def test_a_profile_stored_before_the_offset_watermark_still_loads() -> None:
    stored = orjson.loads(profile_from(click(T0)).to_bytes())
    del stored["applied_through"]
    profile = UserProfile.from_bytes(orjson.dumps(stored))
    assert not profile.covers((0, 0))
    assert apply_click(profile, click(T0 + MINUTE), (0, 7)) is True
    assert profile.covers((0, 7)) and not profile.covers((0, 8))
