"""Agent ``forget_users``: erases users on request (``borderflow forget``; docs/privacy.md).

Input: topic ``privacy-requests`` (key user_id, the partition count and partitioner of the
input topics, so a request lands on the partition number of the user's events and is read by
the worker that owns the user's state), values :class:`schemas.events.PrivacyRequest`.
State erased, on the worker that owns the user:

- tables ``user_profiles`` and ``user_shipments`` (deleting a key writes a changelog
  tombstone, so a restarted or new owner does not restore it);
- the fraud engine of the partition: the user's velocity state, that of the user's cards and
  devices, the feature snapshots of the user's payments and their queued labels
  (:meth:`models.fraud.FraudEngine.forget_user`);
- the serving models: the user's sessions in the recommender's memory and shipments on the
  customs watch list (:meth:`models.serving.ServingModels.forget_user`);
- Redis ``bf:profile:{u}``, ``bf:recs:{u}``, ``bf:recs:{u}:meta``, the ``bf:shipment:{order}``
  hashes of the user's orders, and the ``bf:alerts`` entries that name the user; the fraud
  engine and serving checkpoints are saved again at once, so no image still holds the user.

Outputs: the receipt ``bf:privacy:{request_id}`` (a hash of counts per store, expires after
:data:`RECEIPT_TTL_S`), which ``borderflow forget`` waits for; invalid requests go to
``deadletter``. ClickHouse is erased by the command itself, once the receipt says that this
worker's buffered rows are stored.

Ordering: the state is erased with no await in between, so no agent's batch sees half of
it. A batch that had already read the user's state (or that re-creates it from its own
events) writes Redis at its end; the erasure therefore waits for the batches running at that
moment (:class:`streams.runtime.InFlightBatches`), erases the state once more, and only then
deletes the Redis keys. Batches that start later see the erased state.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import faust

from models.shipments import ShipmentBook
from schemas.decode import decode_message
from schemas.events import PrivacyRequest
from sinks.redis_store import WORKER_ID
from sinks.redis_writes import retry_redis
from streams.runtime import Runtime, micro_batches, wall_ms

log = logging.getLogger(__name__)

#: How long a receipt stays in Redis (30 days): proof for the requester, then gone.
RECEIPT_TTL_S = 30 * 86_400
#: Longest wait for the batches in flight when the state was erased.
DRAIN_TIMEOUT_S = 30.0
#: Longest wait for this worker's buffered ClickHouse rows to be stored.
FLUSH_TIMEOUT_S = 30.0


def _delete(table: faust.Table, key: bytes) -> int:
    if table.get(key) is None:
        return 0
    del table[key]
    return 1


def erase_state(runtime: Runtime, user_id: str, partition: int) -> tuple[Counter[str], set[str]]:
    """Erase the user from the tables and the in-memory models (synchronous: nothing else
    runs meanwhile); returns counts per store and the user's order ids."""
    topology = runtime.topology
    key = user_id.encode()
    orders: set[str] = set()
    stored = topology.user_shipments.get(key)
    if stored:
        book = ShipmentBook.from_bytes(stored)
        orders = set(book.open) | set(book.completed) | set(book.done)
    removed: Counter[str] = Counter()
    removed["table_user_profiles"] += _delete(topology.user_profiles, key)
    removed["table_user_shipments"] += _delete(topology.user_shipments, key)
    engine = runtime.fraud_engines.get(partition)
    if engine is not None:
        for kind, count in engine.forget_user(user_id).items():
            removed[f"fraud_{kind}"] += count
    for kind, count in runtime.serving.forget_user(user_id).items():
        removed[f"serving_{kind}"] += count
    return removed, orders


async def forget(runtime: Runtime, request: PrivacyRequest, partition: int) -> dict[str, int]:
    """Erase one user from this worker's state and Redis; returns the receipt's counts."""
    # Loaded before the erasure, so that the erasure itself runs without an await.
    await runtime.serving_models()
    await runtime.fraud_engine(partition)
    removed, orders = erase_state(runtime, request.user_id, partition)
    drained = await runtime.batches.drain(DRAIN_TIMEOUT_S)
    again, more_orders = erase_state(runtime, request.user_id, partition)
    removed.update(again)
    orders |= more_orders
    # Writes queued for the user while Redis was down would write the keys back.
    removed["redis_queued_writes"] = runtime.redis_writes.drop_user(request.user_id)
    user_id = request.user_id
    keys = await retry_redis(
        lambda: runtime.redis.forget_user(user_id, orders), what="a forget request"
    )
    removed.update({f"redis_{kind}": count for kind, count in keys.items()})
    removed["redis_alerts"] = await retry_redis(
        lambda: runtime.redis.forget_alerts(user_id), what="a forget request"
    )
    removed["orders"] = len(orders)
    # The checkpoints in Redis held the user too: replace them now, not at the next timer.
    await runtime.checkpoint_fraud_engines([partition])
    await runtime.checkpoint_serving_models()
    # Rows of the user still buffered here must be in ClickHouse before the command deletes.
    flushed = await asyncio.to_thread(runtime.clickhouse.flush, FLUSH_TIMEOUT_S)
    counts = {kind: int(count) for kind, count in sorted(removed.items())}
    counts["drained"] = int(drained)
    counts["clickhouse_flushed"] = int(flushed)
    return counts


async def process_requests(runtime: Runtime, events: Sequence[faust.EventT]) -> int:
    done = 0
    for event in events:
        ok, rejected = decode_message(PrivacyRequest, event.value)
        for bad in rejected:
            await runtime.deadletter(event, bad)
        for request in ok:
            partition = event.message.partition
            receipt: dict[str, str | int] = {
                "request_id": request.request_id,
                "requested_at": request.requested_at,
                "partition": partition,
                "worker": WORKER_ID,
            }
            try:
                counts = await forget(runtime, request, partition)
            except Exception as exc:  # noqa: BLE001 - reported in the receipt, then next
                log.exception("privacy request %s failed", request.request_id)
                receipt.update(status="failed", error=" ".join(str(exc).split())[:500])
            else:
                receipt.update(status="done", **counts)
                done += 1
                # The user id is not logged: the receipt id is enough to trace a request.
                log.info("privacy request %s done on partition %d", request.request_id, partition)
            receipt["completed_at_ms"] = wall_ms()
            try:
                # A redelivered request finds nothing more: its first receipt says what went.
                first = await runtime.redis.read_privacy_receipt(request.request_id)
                if first.get("status") != "done":
                    await runtime.redis.save_privacy_receipt(
                        request.request_id, receipt, ttl_s=RECEIPT_TTL_S
                    )
            except Exception:  # noqa: BLE001 - Redis down: the command reports it as pending
                log.exception("receipt of privacy request %s not saved", request.request_id)
    return done


def register(runtime: Runtime) -> faust.types.AgentT:
    topology = runtime.topology
    settings = runtime.settings

    @topology.app.agent(topology.privacy_requests, name="forget_users")
    async def forget_users(stream: faust.StreamT) -> None:
        # Not tracked in runtime.batches: a forget waits for the other agents' batches.
        async for events in micro_batches(stream, settings):
            await process_requests(runtime, events)

    return forget_users
