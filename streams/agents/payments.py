"""Agent ``score_payments``.

Input: topic ``payments`` (key user_id), micro-batches.
State: one :class:`models.fraud.FraudEngine` per payments partition (features, River model,
feature snapshots awaiting their labels). A partition's payments are scored in log order,
after every label that is due by their event time has been learned; if the label stream of
that partition is behind in event time, the batch waits (at most ``fraud_label_wait_s``).
Outputs: ClickHouse ``fraud_scores`` and ``events_per_minute``; topic ``fraud-alerts`` and
the capped Redis stream ``bf:alerts`` for scores at or above the policy's threshold, with
reasons; invalid payments to ``deadletter``.
Guarantee: at-least-once processing, exactly-once rows; offsets are committed once the rows
are in ClickHouse and the partition's engine is checkpointed to Redis (so a restored engine has
seen everything before the committed offset). A payment scored before gets its first score
again (no state change): read again at the offset it was first scored at (a replay after a
crash) its row and alert are rebuilt; at a new offset (a duplicate) it writes and sends
nothing and is counted (``streams/agents/repeats.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence

import faust
import orjson

from models.fraud import ScoredPayment
from schemas.events import PAYMENTS, FraudAlert, PaymentEvent
from streams.agents.repeats import Repeat, Repeats
from streams.runtime import Runtime, micro_batches, wall_ms


async def wait_for_labels(runtime: Runtime, partition: int, ts_ms: int) -> bool:
    """Wait until the labels due by ``ts_ms`` are here; False if we gave up waiting."""
    engine = await runtime.fraud_engine(partition)
    deadline = time.monotonic() + runtime.settings.fraud_label_wait_s
    while not (engine.labels_complete_for(ts_ms) or runtime.labels_caught_up(partition)):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def alert_for(scored: ScoredPayment) -> FraudAlert:
    payment = scored.payment
    return FraudAlert(
        alert_id=f"alert-{payment.event_id}",
        txn_id=payment.event_id,
        user_id=payment.user_id,
        card_id=payment.card_id,
        merchant_id=payment.merchant_id,
        ts=payment.ts,
        amount=payment.amount,
        currency=payment.currency,
        score=scored.score.score,
        threshold=scored.threshold,
        reasons=scored.score.reasons or ["high model score"],
        model_version=scored.score.model_version,
    )


async def process_payments(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    payments = await runtime.decode(events, PaymentEvent)
    facts = await runtime.positions.rows_for(PAYMENTS, [event for event, _ in payments])
    by_partition: dict[int, list[PaymentEvent]] = defaultdict(list)
    source: dict[int, list[faust.EventT]] = defaultdict(list)
    for event, payment in payments:
        by_partition[event.message.partition].append(payment)
        source[event.message.partition].append(event)
    events_by_partition: dict[int, list[faust.EventT]] = defaultdict(list)
    for event in events:
        events_by_partition[event.message.partition].append(event)

    scored_at = wall_ms() // 1000
    alerts = []
    repeats = Repeats(runtime, PAYMENTS)
    for partition, batch in by_partition.items():
        await wait_for_labels(runtime, partition, max(p.ts for p in batch))
        engine = await runtime.fraud_engine(partition)
        offsets = [event.message.offset for event in source[partition]]
        for event, scored in zip(source[partition], engine.score(batch, offsets), strict=True):
            payment = scored.payment
            first = None if scored.first_offset is None else (partition, scored.first_offset)
            repeat = repeats.classify(
                payment.event_id,
                (partition, event.message.offset),
                seen=scored.repeat,
                first=first,
            )
            if repeat is Repeat.DUPLICATE:
                continue  # its row and alert went out with the first copy
            facts.add("fraud_scores", event, (
                payment.event_id, payment.user_id, payment.card_id, payment.merchant_id,
                payment.ts // 1000, payment.ts, payment.amount, payment.currency,
                scored.amount_usd, scored.score.score, int(scored.is_alert), scored.threshold,
                scored.score.reasons, scored.score.model_version, payment.billing_country or "",
                payment.shipping_country or "", payment.ip_country or "", scored_at,
                payment.origin_country or "",
            ))  # fmt: skip
            if scored.is_alert:
                alerts.append(alert_for(scored))
    for partition, partition_events in events_by_partition.items():
        runtime.hold_until_checkpoint(partition, partition_events)

    documents = [orjson.dumps(alert.model_dump()) for alert in alerts]
    for alert, document in zip(alerts, documents, strict=True):
        await runtime.topology.fraud_alerts.send(key=alert.user_id.encode(), value=document)
    runtime.redis_writes.add_alerts(documents)
    await runtime.finish_batch(
        events,
        facts.rows,  # events_per_minute/hour are views over fraud_scores
        {PAYMENTS: len(payments)},
    )
    return len(payments)


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.payments, name="score_payments")
    async def score_payments(stream: faust.StreamT) -> None:
        async for events in micro_batches(stream, settings):
            async with runtime.batches.track():
                await process_payments(runtime, events)

    return score_payments
