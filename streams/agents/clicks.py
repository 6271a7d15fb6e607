"""Agent ``update_profiles_and_recs``.

Input: topic ``clicks`` (key user_id), read in micro-batches (``stream.take_events``).
State: table ``user_profiles`` (UserProfile bytes per user, changelog-backed), the worker's
:class:`models.serving.ServingModels` (session recommender, item catalog, delivery lanes,
bought-together pairs; learned from the partitions this worker owns, checkpointed to Redis)
and one :class:`models.segments.RfmSegmenter` per partition (learns at purchases).
Outputs: Redis ``bf:profile:{u}``, ``bf:recs:{u}`` and ``bf:recs:{u}:meta`` (one atomic Lua
call per user, one pipeline per batch, never replacing a newer state), ``bf:fbt:{item}``
for items bought together in the batch and ``bf:popular:{country|global}`` for the batch's
countries; ClickHouse ``rec_predictions`` (was each click in
the recs served just before it?), ``events_per_minute`` and ``segment_mix_per_hour``;
invalid clicks to ``deadletter``.
Guarantee: at-least-once processing, exactly-once rows. Profile updates skip already-applied
event ids; the profile remembers the position each id was applied at, so a click read again at
that position (a replay after a crash) gets its rows rebuilt and its user served again, while
the same event id at a new position (a duplicate) writes nothing and is counted
(``streams/agents/repeats.py``). Redis writes are guarded by event time. Only users whose
profile changed in the batch (or who had a replay) are served: one table write and one Redis
state per such user and batch.
Consent: a user whose newest click says ``personalisation=false`` gets non-personal recs, keeps
no behavioural profile (``models/profile.py``) and no session in the recommender; the click
teaches the item's statistics only, and no RFM segment is learned (docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import faust

from models.fx import to_usd
from models.profile import UserProfile, apply_click
from models.serving import session_key
from schemas.events import CLICKS, ClickEvent
from streams.agents.repeats import Repeat, Repeats
from streams.runtime import Runtime, micro_batches, wall_ms

DAY_MS = 86_400_000
#: ``bf:popular:global``: the key suffix of the all-countries trending list.
GLOBAL_POPULAR_KEY = "global"
#: Clicks that say "the user wanted this item" (scored against the recs served before them).
INTEREST_CLICKS = frozenset({"view", "add_to_cart", "purchase"})


def served_rank(profile: UserProfile, click: ClickEvent) -> int | None:
    """1-based rank of the clicked item in the recs served before the click, 0 when absent,
    None when the click cannot be scored (no item interest, or nothing served yet)."""
    if click.type not in INTEREST_CLICKS or not click.item_id or not profile.served_recs:
        return None
    try:
        return profile.served_recs.index(click.item_id) + 1
    except ValueError:
        return 0


async def process_clicks(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    """Handle one micro-batch; returns the number of valid clicks."""
    clicks = await runtime.decode(events, ClickEvent)
    serving = await runtime.serving_models()
    table = runtime.topology.user_profiles
    profiles: dict[str, UserProfile] = {}
    #: Users to serve: their profile changed, or a replay may have to rebuild their state.
    to_serve: set[str] = set()
    #: The batch's clicks without the duplicates.
    kept: list[tuple[faust.EventT, ClickEvent]] = []
    repeats = Repeats(runtime, CLICKS)
    facts = await runtime.positions.rows_for(CLICKS, [event for event, _ in clicks])
    ingested_at = wall_ms() // 1000
    for event, click in clicks:
        profile = profiles.get(click.user_id)
        if profile is None:
            stored = table.get(click.user_id.encode())
            profile = UserProfile.from_bytes(stored) if stored else UserProfile.new(click.user_id)
            profiles[click.user_id] = profile
        same_session = click.session_id == profile.session_id
        session_before = list(profile.session_items) if same_session else []
        basket_before = list(profile.session_purchases) if same_session else []
        previous_purchase_ts = profile.last_purchase_ts or profile.first_ts or click.ts
        rank = served_rank(profile, click)
        served = (len(profile.served_recs), int(profile.personalisation), profile.served_at_ts)
        amount = 0.0
        if click.type == "purchase" and click.price and click.currency:
            amount = to_usd(click.price, click.currency) or 0.0
        position = (event.message.partition, event.message.offset)
        had_consent = profile.personalisation and profile.events > 0
        applied = apply_click(profile, click, position)
        repeat = repeats.classify(
            click.event_id,
            position,
            seen=not applied,
            first=None if applied else profile.position_of(click.event_id),
        )
        if repeat is Repeat.DUPLICATE:
            continue  # its rows were written with the first copy
        to_serve.add(click.user_id)
        kept.append((event, click))
        if applied:
            # Without consent (the profile follows the newest click) the click teaches the
            # item's statistics only, and the user gets no segment.
            personal = profile.personalisation
            if had_consent and not personal:
                # Withdrawn: the sessions the recommender kept under the user's id go too.
                serving.recommender.forget_sessions(f"{click.user_id}:")
            serving.learn_click(
                click,
                session_before=session_before,
                basket_before=basket_before,
                country=click.country or profile.country or None,
                session_key=session_key(profile, click),
                personal=personal,
            )
            if click.type == "purchase" and personal:
                # RFM changes only at purchases: learn the segment then, in partition order.
                segmenter = runtime.segmenter(event.message.partition)
                profile.segment = segmenter.observe(
                    recency_days=max(0, click.ts - previous_purchase_ts) / DAY_MS,
                    frequency=profile.purchases,
                    monetary_usd=profile.monetary_usd,
                )
            if rank is not None:
                profile.remember_score(click.event_id, rank, *served)
        else:
            # A replay: applied before a crash, but its rows may not have reached ClickHouse,
            # nor its state Redis. The rows are rebuilt from what the profile remembers (the
            # written positions drop them if the tables hold them already).
            remembered = profile.scored.get(click.event_id)
            if remembered is not None:
                rank, served = remembered[0], (remembered[1], remembered[2], remembered[3])
            else:
                rank = None
        country = click.country or profile.country
        facts.add("click_events", event, (
            click.event_id, click.ts // 1000, click.ts, click.user_id, click.session_id,
            click.type, click.item_id or "", click.category or "", country, amount,
            profile.segment if click.type == "purchase" else "", ingested_at,
            click.origin_country or "",
        ))  # fmt: skip
        if rank is not None:
            recs_size, personalised, served_at_ts = served
            facts.add("rec_predictions", event, (
                click.event_id, click.ts // 1000, click.ts, click.user_id, country, click.type,
                rank, recs_size, personalised, max(0, click.ts - served_at_ts), ingested_at,
            ))  # fmt: skip

    top_n = runtime.settings.recs_top_n
    states = runtime.serve({user_id: profiles[user_id] for user_id in to_serve})
    writes = runtime.redis_writes
    writes.add_user_states(states)
    fbt_top_n = runtime.settings.fbt_top_n
    writes.add_item_lists(
        {item_id: serving.fbt.top(item_id, fbt_top_n) for item_id in serving.fbt.drain_changed()},
        kind="fbt",
    )
    # Trending lists of the batch's countries, for users the storefront knows nothing about.
    if kept:
        countries = {click.country or profiles[click.user_id].country for _, click in kept}
        recommender = serving.recommender
        writes.add_item_lists(
            {
                (country or GLOBAL_POPULAR_KEY): recommender.top_popular(country or None, top_n)
                for country in countries | {""}
                if not country or country in recommender.popularity
            },
            kind="popular",
        )
    if runtime.settings.record_latency:
        # Producer timestamp (CreateTime) -> stored: produce to visible in Redis.
        writes.add_latency_origins(
            "recs", [int(event.message.timestamp * 1000) for event, _ in kept]
        )
    # All of it goes to Redis in one pipeline, with the processed counter, in finish_batch.
    # Rollups (events_per_minute/hour, segment_mix_per_hour) are views over click_events.
    await runtime.finish_batch(events, facts.rows, {CLICKS: len(clicks)})
    return len(clicks)


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.clicks, name="update_profiles_and_recs")
    async def update_profiles_and_recs(stream: faust.StreamT) -> None:
        async for events in micro_batches(stream, settings):
            async with runtime.batches.track():
                await process_clicks(runtime, events)

    return update_profiles_and_recs
