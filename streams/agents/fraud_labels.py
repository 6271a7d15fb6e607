"""Agent ``learn_fraud_labels``.

Input: topic ``fraud-labels`` (key user_id, so a label shares its transaction's partition).
State: queues each label in the :class:`models.fraud.FraudEngine` of its partition; the
engine learns it from the exact feature vector the transaction was scored with, once the
payments' event time passes the label time plus ``fraud_label_apply_delay_s``.
Outputs: ClickHouse ``fraud_label_events`` (every label event, one row each; the
``fraud_labels`` view shows each transaction's latest label by label time); invalid labels to
``deadletter``.
Guarantee: at-least-once processing, exactly-once rows; offsets are committed once the
partition's engine (holding the queued labels) is checkpointed to Redis and the rows are in
ClickHouse, and a redelivered label's row is not written again (``streams/facts.py``). A label
for a transaction already learned (or unknown) is counted, not learned twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import faust

from schemas.events import FRAUD_LABELS, FraudLabelEvent
from streams.runtime import Runtime, micro_batches, wall_ms


async def process_labels(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    labels = await runtime.decode(events, FraudLabelEvent)
    facts = await runtime.positions.rows_for(FRAUD_LABELS, [event for event, _ in labels])
    by_partition: dict[int, list[FraudLabelEvent]] = defaultdict(list)
    for event, label in labels:
        by_partition[event.message.partition].append(label)
    events_by_partition: dict[int, list[faust.EventT]] = defaultdict(list)
    for event in events:
        partition = event.message.partition
        events_by_partition[partition].append(event)
        runtime.label_offsets[partition] = max(
            runtime.label_offsets.get(partition, -1), event.message.offset
        )
    ingested_at = wall_ms() // 1000
    for partition, batch in by_partition.items():
        (await runtime.fraud_engine(partition)).add_labels(batch)
    for event, label in labels:
        facts.add("fraud_label_events", event, (
            label.event_id, label.txn_id, label.user_id, label.label, label.ts // 1000, label.ts,
            label.source or "", ingested_at,
        ))  # fmt: skip
    # Queued labels live in the engine: commit only once a checkpoint holds them.
    for partition, partition_events in events_by_partition.items():
        runtime.hold_until_checkpoint(partition, partition_events)
    await runtime.finish_batch(
        events,
        facts.rows,  # the label rollups are materialized views over fraud_label_events
        {FRAUD_LABELS: len(labels)},
    )
    return len(labels)


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.fraud_labels, name="learn_fraud_labels")
    async def learn_fraud_labels(stream: faust.StreamT) -> None:
        async for events in micro_batches(stream, settings):
            await process_labels(runtime, events)

    return learn_fraud_labels
