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
ClickHouse, and a redelivered label's row is not written again (``streams/facts.py``). The
engine remembers each label event id with its offset: the same label event read again at that
offset (a replay after a crash) is not queued again but gets its row rebuilt; at a new offset
(a duplicate) it writes nothing and is counted (``streams/agents/repeats.py``). A relabel (a
new label event for the same transaction) is a new event: written, and counted by the engine,
not learned twice, like a label for an unknown transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import faust

from schemas.events import FRAUD_LABELS, FraudLabelEvent
from streams.agents.repeats import Repeat, Repeats
from streams.runtime import Runtime, micro_batches, wall_ms


async def process_labels(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    labels = await runtime.decode(events, FraudLabelEvent)
    facts = await runtime.positions.rows_for(FRAUD_LABELS, [event for event, _ in labels])
    by_partition: dict[int, list[tuple[faust.EventT, FraudLabelEvent]]] = defaultdict(list)
    for event, label in labels:
        by_partition[event.message.partition].append((event, label))
    events_by_partition: dict[int, list[faust.EventT]] = defaultdict(list)
    for event in events:
        partition = event.message.partition
        events_by_partition[partition].append(event)
        runtime.label_offsets[partition] = max(
            runtime.label_offsets.get(partition, -1), event.message.offset
        )
    ingested_at = wall_ms() // 1000
    repeats = Repeats(runtime, FRAUD_LABELS)
    for partition, batch in by_partition.items():
        engine = await runtime.fraud_engine(partition)
        received = engine.add_labels(
            [label for _, label in batch], [event.message.offset for event, _ in batch]
        )
        for (event, label), seen in zip(batch, received, strict=True):
            first = None
            if seen is not None and seen.first_offset is not None:
                first = (partition, seen.first_offset)
            repeat = repeats.classify(
                label.event_id,
                (partition, event.message.offset),
                seen=seen is not None,
                first=first,
            )
            if repeat is Repeat.DUPLICATE:
                continue  # its row was written with the first copy
            facts.add("fraud_label_events", event, (
                label.event_id, label.txn_id, label.user_id, label.label, label.ts // 1000,
                label.ts, label.source or "", ingested_at,
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
            async with runtime.batches.track():
                await process_labels(runtime, events)

    return learn_fraud_labels
