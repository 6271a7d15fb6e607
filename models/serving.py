"""The worker-wide models behind the storefront keys, and how a user's recs are chosen.

:class:`ServingModels` bundles what the clicks and logistics agents learn and the storefront
reads through Redis: the session recommender, the item catalog (category, origin country,
price), the delivery lanes, "frequently bought together", the RFM segmenters and the
logistics engine (shipment delivery-time model, customs statistics). They are
learned online from the partitions a worker owns, in event time, and checkpointed together
(pickle + zlib).

:meth:`ServingModels.recommend_for` is the whole recommendation policy for one user:

* personalised users get the recommender's hybrid (session re-visits and neighbours,
  long-term category affinity, then country and global popularity), without items they just
  bought;
* users (or markets) with ``personalisation`` off get non-personal recommendations only:
  popular items of their country, else global, with no session, taste or purchase history;
* both are then re-ranked (``models.rerank``): items that reach the user's country faster are
  preferred, and no category takes more than ``max_per_category`` places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.catalog import ItemCatalog
from models.checkpoint import Checkpointable
from models.delivery import DeliveryLanes
from models.delivery_time import DeliveredRecord, LogisticsEngine
from models.fbt import FrequentlyBoughtTogether
from models.fx import to_usd
from models.profile import UserProfile
from models.recommender import SessionRecommender
from models.rerank import RerankPolicy, rerank
from models.segments import RfmSegmenter
from schemas.events import ClickEvent

#: Candidates asked from the recommender per final slot, so re-ranking has room to choose.
CANDIDATES_PER_SLOT = 2


def session_key(profile: UserProfile, click: ClickEvent | None = None) -> str:
    """The user's current session as the recommender knows it: the same session id after a
    long silence is a new session (``models.profile.SESSION_GAP_MS``), hence the start time.
    A late click of an earlier session gets that session's own key."""
    if click is not None and click.session_id != profile.session_id:
        return f"{profile.user_id}:{click.session_id}"
    return f"{profile.user_id}:{profile.session_id}:{profile.session_start}"


@dataclass(frozen=True, slots=True)
class Recommendation:
    items: list[tuple[str, float]]  # (item_id, score), best first
    personalised: bool
    #: What the list is built from: "session", "profile" (taste and popularity, no session
    #: yet), "popular-country" or "popular-global" (non-personal or cold start).
    basis: str


@dataclass
class ServingModels(Checkpointable):
    recommender: SessionRecommender = field(default_factory=SessionRecommender)
    catalog: ItemCatalog = field(default_factory=ItemCatalog)
    lanes: DeliveryLanes = field(default_factory=DeliveryLanes)
    fbt: FrequentlyBoughtTogether = field(default_factory=FrequentlyBoughtTogether)
    #: One RFM segmenter per clicks partition (each learns at its partition's purchases).
    segmenters: dict[int, RfmSegmenter] = field(default_factory=dict)
    #: Shipment tracking, delivery-time prediction and delay alerts (models.delivery_time).
    logistics: LogisticsEngine = field(default_factory=LogisticsEngine)
    #: order_id -> [user_id, hold start ts, origin, dest] of shipments in a customs hold:
    #: checked against the event-time watermark every batch, so a hold that gets no further
    #: scan still raises its alert.
    customs_watch: dict[str, list[Any]] = field(default_factory=dict)

    # -- learning ---------------------------------------------------------------------------
    def learn_click(
        self,
        click: ClickEvent,
        *,
        session_before: Sequence[str],
        basket_before: Sequence[str],
        country: str | None,
        session_key: str | None = None,
        personal: bool = True,
    ) -> None:
        """Learn one (newly applied) click; ``*_before`` are the user's session items and
        session purchases as they were before it; ``session_key`` names the session in the
        recommender's neighbourhood memory (:func:`session_key`).

        ``personal=False`` (a user without consent to personalisation): the click counts for
        the item alone (catalog, popularity); nothing links it to the user's session or
        basket, and the recommender keeps no session of the user."""
        if not personal:
            session_before, basket_before, session_key = (), (), None
        item_id = click.item_id
        if not item_id or click.type == "remove_from_cart":
            return
        price_usd = to_usd(click.price, click.currency) if click.price and click.currency else None
        self.catalog.observe(
            item_id,
            category=click.category,
            origin_country=click.origin_country,
            price_usd=price_usd,
        )
        self.recommender.observe(
            session_before,
            item_id,
            country=country,
            category=click.category,
            ts_ms=click.ts,
            kind=click.type,
            session_id=session_key,
            remember=personal,
        )
        if click.type == "purchase":
            self.fbt.observe_purchase(basket_before, item_id, ts_ms=click.ts)

    def forget_user(self, user_id: str) -> dict[str, int]:
        """Erase what these models hold about one user (``borderflow forget``): the user's
        sessions in the recommender's neighbourhood memory (keyed ``{user_id}:...``) and the
        user's shipments on the customs watch list. Counts per kind. Item links, popularity,
        bought-together pairs, lanes, segment boundaries and the delivery-time model are
        aggregates that name nobody, and stay."""
        watched = [order for order, entry in self.customs_watch.items() if entry[0] == user_id]
        for order_id in watched:
            del self.customs_watch[order_id]
        return {
            "sessions": self.recommender.forget_sessions(f"{user_id}:"),
            "customs_watch": len(watched),
        }

    def segmenter(self, partition: int) -> RfmSegmenter:
        segmenter = self.segmenters.get(partition)
        if segmenter is None:
            segmenter = self.segmenters[partition] = RfmSegmenter()
        return segmenter

    def learn_delivery(self, delivery: DeliveredRecord) -> None:
        self.lanes.observe(
            delivery.origin_country,
            delivery.dest_country,
            delivery.transit_days,
            ts_ms=delivery.delivered_ts,
        )

    # -- answering --------------------------------------------------------------------------
    def recommend_for(
        self, profile: UserProfile, *, n: int, policy: RerankPolicy
    ) -> Recommendation:
        country = profile.country or None
        wanted = n * CANDIDATES_PER_SLOT
        if profile.personalisation:
            candidates = self.recommender.recommend(
                profile.session_items,
                country=country,
                n=wanted,
                top_categories=profile.top_categories(profile.last_ts),
                exclude=profile.recent_purchases,
                session_id=session_key(profile),
            )
            basis = "session" if profile.session_items else "profile"
        else:
            candidates = self.recommender.recommend(
                (), country=country, n=wanted, personalised=False
            )
            basis = (
                "popular-country"
                if country and country in self.recommender.popularity
                else "popular-global"
            )
        by_origin: dict[str | None, float | None] = {}

        def expected_days(item_id: str) -> float | None:
            origin = self.catalog.origin(item_id)
            if origin not in by_origin:  # a list has few origins: ask the lanes once each
                by_origin[origin] = self.lanes.expected_days(origin, country)
            return by_origin[origin]

        items = rerank(
            candidates, n, policy=policy, category_of=self._category, expected_days=expected_days
        )
        return Recommendation(items, profile.personalisation, basis)

    def _category(self, item_id: str) -> str | None:
        return self.catalog.category(item_id) or self.recommender.item_category.get(item_id)

    def stats(self) -> dict[str, int]:
        """Sizes, and the logistics engine's counters (scans, duplicates, out_of_order,
        invalid_transitions, deliveries, returns, alerts_*) prefixed ``logistics_``."""
        return {
            "items": len(self.catalog),
            "lanes": len(self.lanes.table()),
            "fbt_items": len(self.fbt.pairs),
            **{f"logistics_{name}": value for name, value in self.logistics.counters.items()},
        }
