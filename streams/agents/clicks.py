"""Agent ``update_profiles_and_recs``.

Input: topic ``clicks`` (key user_id), read in micro-batches (``stream.take_events``).
State: table ``user_profiles`` (UserProfile bytes per user, changelog-backed), the
worker's :class:`models.recommender.SessionRecommender` (item co-occurrence and country
popularity, learned from the partitions this worker owns) and one
:class:`models.segments.RfmSegmenter` per partition (learns at purchases).
Outputs: Redis ``bf:profile:{u}``, ``bf:recs:{u}`` and ``bf:recs:{u}:meta`` (one atomic Lua
call per user, one pipeline per batch, never replacing a newer state); ClickHouse
``events_per_minute`` and ``segment_mix_per_hour``; invalid clicks to ``deadletter``.
Guarantee: at-least-once; profile updates skip already-applied event ids, Redis writes are
guarded by event time, so redelivery is harmless. One table write per user per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import faust

from models.fx import to_usd
from models.profile import UserProfile, apply_click
from schemas.events import CLICKS, ClickEvent
from sinks.redis_store import UserState
from streams.runtime import RollupCounter, Runtime, SegmentMix, micro_batches, wall_ms

DAY_MS = 86_400_000


async def process_clicks(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    """Handle one micro-batch; returns the number of valid clicks."""
    clicks = await runtime.decode(events, ClickEvent)
    table = runtime.topology.user_profiles
    recommender = runtime.recommender
    profiles: dict[str, UserProfile] = {}
    rollup = RollupCounter(CLICKS)
    segment_mix = SegmentMix()
    for event, click in clicks:
        profile = profiles.get(click.user_id)
        if profile is None:
            stored = table.get(click.user_id.encode())
            profile = UserProfile.from_bytes(stored) if stored else UserProfile.new(click.user_id)
            profiles[click.user_id] = profile
        session_before = (
            list(profile.session_items) if click.session_id == profile.session_id else []
        )
        previous_purchase_ts = profile.last_purchase_ts or profile.first_ts or click.ts
        if not apply_click(profile, click):
            continue  # already applied before a restart
        if click.item_id and click.type != "remove_from_cart":
            recommender.observe(
                session_before,
                click.item_id,
                country=click.country or profile.country or None,
                category=click.category,
                ts_ms=click.ts,
                kind=click.type,
            )
        amount = 0.0
        if click.type == "purchase" and click.price and click.currency:
            amount = to_usd(click.price, click.currency) or 0.0
        rollup.add(click.ts, click.type, click.country or profile.country, amount)
        if click.type == "purchase":
            # RFM changes only at purchases: learn the segment then, in the partition's order.
            segmenter = runtime.segmenter(event.message.partition)
            profile.segment = segmenter.observe(
                recency_days=max(0, click.ts - previous_purchase_ts) / DAY_MS,
                frequency=profile.purchases,
                monetary_usd=profile.monetary_usd,
            )
            segment_mix.add(click.ts, profile.country, profile.segment, amount)

    top_n = runtime.settings.recs_top_n
    states = []
    for user_id, profile in profiles.items():
        table[user_id.encode()] = profile.to_bytes()
        recs = recommender.recommend(
            profile.session_items,
            country=profile.country or None,
            n=top_n,
            top_categories=profile.top_categories(profile.last_ts),
            exclude=profile.recent_purchases,
            personalised=profile.personalisation,
        )
        states.append(
            UserState(
                user_id, profile.last_event_id, profile.last_ts, profile.to_redis_hash(), recs
            )
        )
    await runtime.redis.write_user_states(
        states, updated_at_ms=wall_ms(), processed={CLICKS: len(clicks)}
    )
    if runtime.settings.record_latency:
        # Producer timestamp (CreateTime, seconds) -> now: produce to visible in Redis.
        visible_ms = wall_ms()
        await runtime.redis.record_latencies(
            "recs", [visible_ms - event.message.timestamp * 1000 for event, _ in clicks]
        )
    # Clicks were counted in the same pipeline as the user states.
    await runtime.finish_batch(
        events, {"events_per_minute": rollup.rows(), "segment_mix_per_hour": segment_mix.rows()}
    )
    return len(clicks)


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.clicks, name="update_profiles_and_recs")
    async def update_profiles_and_recs(stream: faust.StreamT) -> None:
        async for events in micro_batches(stream, settings):
            await process_clicks(runtime, events)

    return update_profiles_and_recs
