"""Agent ``record_shipment_scans``.

Input: topic ``logistics`` (key user_id, co-partitioned with ``clicks``), micro-batches.
State: table ``user_profiles`` (each user's open shipments and delivery experience: average
delivery days, late share) and the worker's delivery lanes
(:class:`models.delivery.DeliveryLanes`, learned from completed deliveries; they steer the
logistics-aware ranking of recommendations).
Outputs: ClickHouse ``shipment_events`` (one row per scan) and ``events_per_minute``; Redis
``bf:profile:{u}`` / ``bf:recs:{u}`` for users whose delivery experience changed; invalid
scans to ``deadletter``.
Guarantee: at-least-once; ``shipment_events`` is a ReplacingMergeTree on (order_id, event_id);
profiles skip already-applied scan ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import faust

from models.profile import UserProfile, apply_shipment_scan
from schemas.events import LOGISTICS, LogisticsEvent
from streams.runtime import RollupCounter, Runtime, micro_batches, wall_ms


async def process_scans(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    scans = await runtime.decode(events, LogisticsEvent)
    serving = await runtime.serving_models()
    table = runtime.topology.user_profiles
    ingested_at = wall_ms() // 1000
    rows = []
    rollup = RollupCounter(LOGISTICS)
    changed: dict[str, UserProfile] = {}
    for _, scan in scans:
        profile = changed.get(scan.user_id)
        if profile is None:
            stored = table.get(scan.user_id.encode())
            profile = UserProfile.from_bytes(stored) if stored else UserProfile.new(scan.user_id)
        applied, delivery = apply_shipment_scan(profile, scan)
        if applied:
            changed[scan.user_id] = profile
        if delivery is not None:
            serving.learn_delivery(delivery, scan.ts)
        rows.append((
            scan.event_id, scan.order_id, scan.user_id, scan.carrier, scan.origin_country,
            scan.dest_country, scan.status, scan.ts // 1000, scan.ts, scan.promised_ts or 0,
            scan.location or "", ingested_at,
        ))  # fmt: skip
        rollup.add(scan.ts, scan.status, scan.dest_country)
    # The delivery experience is part of the profile the storefront reads.
    await runtime.redis.write_user_states(
        runtime.serve(changed), updated_at_ms=wall_ms(), processed={}
    )
    await runtime.finish_batch(
        events,
        {"shipment_events": rows, "events_per_minute": rollup.rows()},
        {LOGISTICS: len(scans)},
    )
    return len(scans)


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.logistics, name="record_shipment_scans")
    async def record_shipment_scans(stream: faust.StreamT) -> None:
        async for events in micro_batches(stream, settings):
            await process_scans(runtime, events)

    return record_shipment_scans
