"""Agent ``record_shipment_scans``.

Input: topic ``logistics`` (key user_id), micro-batches.
State: none yet (shipment state machines and delivery-time prediction build on this).
Outputs: ClickHouse ``shipment_events`` (one row per scan) and ``events_per_minute``;
invalid scans to ``deadletter``.
Guarantee: at-least-once; ``shipment_events`` is a ReplacingMergeTree on (order_id, event_id).
"""

from __future__ import annotations

from collections.abc import Sequence

import faust

from schemas.events import LOGISTICS, LogisticsEvent
from streams.runtime import RollupCounter, Runtime, micro_batches, wall_ms


async def process_scans(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    scans = await runtime.decode(events, LogisticsEvent)
    ingested_at = wall_ms() // 1000
    rows = []
    rollup = RollupCounter(LOGISTICS)
    for _, scan in scans:
        rows.append((
            scan.event_id, scan.order_id, scan.user_id, scan.carrier, scan.origin_country,
            scan.dest_country, scan.status, scan.ts // 1000, scan.ts, scan.promised_ts or 0,
            scan.location or "", ingested_at,
        ))  # fmt: skip
        rollup.add(scan.ts, scan.status, scan.dest_country)
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
