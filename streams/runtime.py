"""What every agent shares inside one worker: sinks, models, dead-lettering and durable acks.

Delivery guarantee: **at-least-once with idempotent sinks**. Faust acknowledges a micro-batch
when the agent body returns; ClickHouse rows are still buffered then. So each batch takes an
extra reference on its messages (:meth:`Runtime.hold`) and drops it when the ClickHouse
writer reports the rows durable. Faust only commits offsets whose every reference is gone,
so a crash replays exactly the batches whose rows might not be stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import faust
import orjson
from faust.types import TP

from models.checkpoint import CheckpointPacer
from models.fraud import AlertPolicy, FraudEngine
from models.profile import UserProfile
from models.rerank import RerankPolicy
from models.segments import RfmSegmenter
from models.serving import ServingModels
from schemas.config import Settings
from schemas.decode import Rejected, decode_message
from schemas.events import DeadLetter, InboundEvent
from sinks.clickhouse import ClickHouseWriter
from sinks.redis_store import RedisStore, UserState
from sinks.redis_writes import RETRYABLE, RedisWriteBehind, retry_redis
from streams.facts import SinkPositions
from streams.metrics import (
    TimedRedisStore,
    current_agent_name,
    find_metrics,
    metrics_for,
    observed_batches,
)
from streams.model_metrics import fraud_metric_rows, serving_metric_rows
from streams.topology import Topology

log = logging.getLogger(__name__)
M = TypeVar("M", bound=InboundEvent)

#: Original bytes kept in a dead letter (base64 makes them 4/3 as large).
MAX_DEADLETTER_PAYLOAD = 600_000
#: Of those, how many are also shown as text in ``payload``.
DEADLETTER_TEXT_BYTES = 16_384


class Runtime:
    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        *,
        redis: RedisStore | None = None,
        clickhouse: ClickHouseWriter | None = None,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self._redis = redis
        self._redis_writes: RedisWriteBehind | None = None
        self._clickhouse = clickhouse
        #: Recommender, catalog, delivery lanes, bought-together, RFM segmenters: restored
        #: from the last checkpoint before the first batch that needs them.
        self.serving = ServingModels()
        self._serving_load: asyncio.Future[ServingModels] | None = None
        self.rerank_policy = RerankPolicy(
            delivery_half_days=settings.recs_delivery_half_days,
            max_per_category=settings.recs_max_per_category,
        )
        self.fraud_engines: dict[int, FraudEngine] = {}
        self._checkpoint_holds: dict[int, list[Any]] = {}
        #: Keep the timers' checkpoint rounds below a share of the loop's time (per kind).
        self.checkpoint_pacers = {
            kind: CheckpointPacer(settings.checkpoint_max_loop_share)
            for kind in ("fraud", "serving")
        }
        self._engine_loads: dict[int, asyncio.Future[FraudEngine]] = {}
        #: Last offset seen per fraud-labels partition (to tell a caught-up label stream).
        self.label_offsets: dict[int, int] = {}
        self.deadlettered = 0
        #: Events dropped as duplicates (streams/agents/repeats.py), per input topic.
        self.duplicates: Counter[str] = Counter()
        #: Where each fact table's rows end, per partition (exactly-once facts).
        self.positions = SinkPositions(settings)
        #: Prometheus metrics of this worker app (served at /metrics; see streams/metrics.py).
        self.metrics = metrics_for(topology.app, settings)
        self.metrics.runtime = self
        #: The agents' micro-batches in progress (a forget waits for them).
        self.batches = InFlightBatches()

    # Sinks are created lazily, inside the worker's event loop.
    @property
    def redis(self) -> RedisStore:
        if self._redis is None:
            store = RedisStore(self.settings)
            self._redis = cast(RedisStore, TimedRedisStore(store, self.metrics.redis_seconds))
        return self._redis

    @property
    def redis_writes(self) -> RedisWriteBehind:
        """The agents' serving writes: one pipeline per batch, queued and retried while
        Redis is down (sinks/redis_writes.py)."""
        if self._redis_writes is None:
            self._redis_writes = RedisWriteBehind(
                self.redis,
                max_pending=self.settings.redis_max_pending_writes,
                retry_max_s=self.settings.redis_retry_max_s,
                observer=self.metrics,
            )
        return self._redis_writes

    @property
    def clickhouse(self) -> ClickHouseWriter:
        if self._clickhouse is None:
            self._clickhouse = ClickHouseWriter(self.settings, observer=self.metrics)
        return self._clickhouse

    async def close(self) -> None:
        if self._serving_load is not None and self._serving_load.done():
            await self.checkpoint_serving_models()
        if self.fraud_engines:
            await self.checkpoint_fraud_engines(list(self.fraud_engines))
        if self._redis_writes is not None and not await self._redis_writes.close():
            log.warning("Redis unreachable at shutdown: queued serving writes not stored")
        if self._clickhouse is not None:
            await asyncio.to_thread(self._clickhouse.close)
        if self._redis is not None:
            await self._redis.aclose()

    # -- decoding and dead letters ------------------------------------------------------------
    async def decode(
        self, events: Sequence[faust.EventT], model: type[M]
    ) -> list[tuple[faust.EventT, M]]:
        """Valid events with their Faust event; everything else goes to ``deadletter``."""
        decoded: list[tuple[faust.EventT, M]] = []
        for event in events:
            ok, rejected = decode_message(model, event.value)
            for item in ok:
                decoded.append((event, item))
            self.metrics.count_events(event.message.topic, len(ok))
            for bad in rejected:
                await self.deadletter(event, bad)
        return decoded

    async def deadletter(self, event: faust.EventT, rejected: Rejected) -> None:
        message = event.message
        payload = rejected.payload
        # A dead letter must fit in one Kafka message (Faust's producer sends at most
        # 1,000,000 bytes). Larger originals are cut; the record says so, and the whole
        # original stays at (source_topic, partition, offset).
        kept = payload[:MAX_DEADLETTER_PAYLOAD]
        record = DeadLetter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            error=rejected.error,
            payload=kept[:DEADLETTER_TEXT_BYTES].decode("utf-8", errors="replace"),
            payload_b64=base64.b64encode(kept).decode("ascii"),
            payload_bytes=len(payload),
            truncated=len(kept) < len(payload),
            index=rejected.index,
        )
        self.deadlettered += 1
        self.metrics.count_deadletter(message.topic)
        log.warning(
            "dead-lettered %s[%s]@%s: %s",
            message.topic, message.partition, message.offset, rejected.error,
        )  # fmt: skip
        await self.topology.deadletter.send(
            key=message.key, value=orjson.dumps(record.model_dump())
        )

    # -- durable acknowledgements ---------------------------------------------------------------
    def hold_until_durable(self, events: Sequence[faust.EventT]) -> None:
        """Delay the offset commit of ``events`` until ClickHouse has stored what was added."""
        messages = [event.message for event in events]
        for message in messages:
            message.incref()
        loop = asyncio.get_running_loop()
        consumer = self.topology.app.consumer

        def release() -> None:
            for message in messages:
                message.ack(consumer)

        def on_durable() -> None:  # runs in the writer thread
            loop.call_soon_threadsafe(release)

        self.clickhouse.add_callback(on_durable)

    async def finish_batch(
        self,
        events: Sequence[faust.EventT],
        rows: dict[str, list[tuple[Any, ...]]],
        processed: dict[str, int] | None = None,
    ) -> None:
        """The common end of every micro-batch: queue its ClickHouse rows, store its queued
        Redis writes (one pipeline), hold its offsets until both sinks have stored what it
        added, and pause while either sink's buffer is full."""
        for table, table_rows in rows.items():
            self.clickhouse.add(table, table_rows)
        self.metrics.observe_rows(rows)
        if processed:
            self.redis_writes.add_processed(processed)
        await self.store_serving_writes(events)
        self.hold_until_durable(events)
        await self.backpressure()

    async def store_serving_writes(self, events: Sequence[faust.EventT]) -> None:
        """Store the batch's queued Redis writes. While Redis is unreachable they stay queued
        and are retried in the background; the batch's offsets are held until they are
        stored, so the agent goes on (scoring, alerts, ClickHouse) and loses nothing."""
        messages = [event.message for event in events]
        for message in messages:
            message.incref()
        consumer = self.topology.app.consumer

        def release() -> None:
            for message in messages:
                message.ack(consumer)

        await self.redis_writes.flush(release)

    async def backpressure(self) -> None:
        """Pause intake while a sink's buffer is full (ClickHouse or Redis down for long)."""
        writer = self.clickhouse
        while not writer.has_capacity():
            await asyncio.to_thread(writer.wait_for_capacity, 1.0)
        await self.redis_writes.wait_for_capacity()

    # -- serving models (recommender, catalog, lanes, bought-together) -------------------------
    async def serving_models(self) -> ServingModels:
        """The worker's serving models, restored from the last checkpoint on first use."""
        if self._serving_load is None:
            self._serving_load = asyncio.ensure_future(self._load_serving_models())
        return await asyncio.shield(self._serving_load)

    async def _load_serving_models(self) -> ServingModels:
        blob = await retry_redis(
            lambda: self.redis.load_serving_checkpoint(self.settings.app_id),
            what="the serving models' checkpoint",
        )
        if blob is not None:
            try:
                restored = await asyncio.to_thread(ServingModels.from_checkpoint, blob)
            except Exception as exc:  # noqa: BLE001 - a bad image must not stop the worker
                log.warning("serving checkpoint unreadable, starting fresh: %s", exc)
            else:
                log.info("serving models restored: %s", restored.stats())
                self.serving = restored
        self.serving.logistics.late_margin_ms = int(
            self.settings.logistics_late_margin_h * 3_600_000
        )
        return self.serving

    async def checkpoint_serving_models(self) -> int:
        """Save the serving models (any worker of the app may start from them); bytes saved.

        They are soft state: after a crash a worker restarts from the last image and misses
        at most one interval of clicks in its *statistics*; profiles (a Faust table) and
        every sink lose nothing.
        """
        if self._serving_load is None or not self._serving_load.done():
            return 0  # nothing learned yet, and an unloaded checkpoint must not be overwritten
        pacer = self.checkpoint_pacers["serving"]
        if not pacer.due(time.monotonic()):
            return 0
        started = time.monotonic()
        image = self.serving.pickle()
        pacer.spent(time.monotonic() - started, time.monotonic())
        blob = await asyncio.to_thread(ServingModels.compress_checkpoint, image)
        stats = self.serving.stats()
        try:
            await self.redis.save_serving_checkpoint(
                self.settings.app_id, blob, {**stats, "saved_at_ms": wall_ms(), "bytes": len(blob)}
            )
        except RETRYABLE as exc:
            log.warning("serving checkpoint not saved (Redis unreachable), next interval: %s", exc)
            return 0
        self.clickhouse.add(
            "model_metrics",
            serving_metric_rows(
                self.settings.app_id, stats, self.serving.logistics.stats(), _now_utc()
            ),
        )
        return len(blob)

    def serve(self, profiles: dict[str, UserProfile]) -> list[UserState]:
        """Choose each user's recs, remember them in the profile (to score the next click),
        store the profiles in the table, and return the states to write to Redis (users
        with at least one click)."""
        table = self.topology.user_profiles
        top_n = self.settings.recs_top_n
        states = []
        for user_id, profile in profiles.items():
            if not profile.events:
                # Only shipment scans so far: nothing to recommend from, nothing to serve.
                table[user_id.encode()] = profile.to_bytes()
                continue
            chosen = self.serving.recommend_for(profile, n=top_n, policy=self.rerank_policy)
            event_ts, event_id = profile.freshness()
            profile.served_recs = [item_id for item_id, _ in chosen.items]
            profile.served_at_ts = event_ts
            table[user_id.encode()] = profile.to_bytes()
            states.append(
                UserState(
                    user_id,
                    event_id,
                    event_ts,
                    profile.to_redis_hash(),
                    chosen.items,
                    {"personalised": int(chosen.personalised), "basis": chosen.basis},
                )
            )
        return states

    def segmenter(self, partition: int) -> RfmSegmenter:
        return self.serving.segmenter(partition)

    # -- fraud engines (one per payments partition) -------------------------------------------
    def new_fraud_engine(self) -> FraudEngine:
        settings = self.settings
        policy = AlertPolicy(
            settings.fraud_alert_policy,
            threshold=settings.fraud_alert_threshold,
            target=settings.fraud_alert_target,
            daily_budget=settings.fraud_alert_daily_budget,
        )
        return FraudEngine(
            policy=policy,
            label_apply_delay_ms=int(settings.fraud_label_apply_delay_s * 1000),
            label_timeout_ms=int(settings.fraud_label_timeout_days * 86_400_000),
            snapshot_ttl_ms=int(settings.fraud_snapshot_ttl_days * 86_400_000),
            drift_reaction=settings.fraud_drift_reaction,
        )

    async def fraud_engine(self, partition: int) -> FraudEngine:
        """The partition's engine: in memory, else its last checkpoint, else a new one."""
        engine = self.fraud_engines.get(partition)
        if engine is not None:
            return engine
        # The payments and labels agents may both ask first: one load, shared by both.
        loading = self._engine_loads.get(partition)
        if loading is None:
            loading = self._engine_loads[partition] = asyncio.ensure_future(
                self._load_fraud_engine(partition)
            )
        try:
            engine = await asyncio.shield(loading)
        finally:
            if loading.done():
                self._engine_loads.pop(partition, None)
        return engine

    async def _load_fraud_engine(self, partition: int) -> FraudEngine:
        blob = await retry_redis(
            lambda: self.redis.load_checkpoint(self.settings.app_id, partition),
            what=f"the fraud engine checkpoint of partition {partition}",
        )
        if blob is not None:
            engine = await asyncio.to_thread(FraudEngine.from_checkpoint, blob)
            log.info("fraud engine of partition %d restored: %s", partition, engine.stats())
        else:
            engine = self.new_fraud_engine()
        self.fraud_engines[partition] = engine
        return engine

    def hold_until_checkpoint(self, partition: int, events: Sequence[faust.EventT]) -> None:
        """Delay the offset commit of ``events`` until the partition's engine is checkpointed,
        so a restarted worker never skips events its restored engine has not seen."""
        held = self._checkpoint_holds.setdefault(partition, [])
        for event in events:
            event.message.incref()
            held.append(event.message)

    async def checkpoint_fraud_engines(self, partitions: Iterable[int] | None = None) -> int:
        """Checkpoint engines with unsaved work to Redis, then release their held offsets.

        The timer's rounds (``partitions`` None) are paced (:class:`CheckpointPacer`); a
        round asked for by partition (a rebalance) always runs."""
        pacer = self.checkpoint_pacers["fraud"]
        if partitions is None and not pacer.due(time.monotonic()):
            return 0
        chosen = list(self._checkpoint_holds) if partitions is None else list(partitions)
        saved = 0
        pickling_s = 0.0
        consumer = self.topology.app.consumer
        redis_down = False
        for partition in chosen:
            engine = self.fraud_engines.get(partition)
            held = self._checkpoint_holds.pop(partition, [])
            if engine is None:
                continue
            if redis_down:  # one timeout per round is enough
                self._checkpoint_holds.setdefault(partition, [])[:0] = held
                continue
            # Pickled on the event loop (the only place the engine changes), so the image is
            # consistent; compressed off the loop.
            started = time.monotonic()
            image = engine.pickle()
            pickling_s += time.monotonic() - started
            blob = await asyncio.to_thread(FraudEngine.compress_checkpoint, image)
            try:
                await self.redis.save_checkpoint(
                    self.settings.app_id,
                    partition,
                    blob,
                    {**engine.stats(), "saved_at_ms": wall_ms(), "bytes": len(blob)},
                )  # fmt: skip
            except RETRYABLE as exc:
                # The offsets stay held (never committed past what a checkpoint covers);
                # the next interval tries again.
                log.warning("fraud checkpoint of partition %d not saved: %s", partition, exc)
                self._checkpoint_holds.setdefault(partition, [])[:0] = held
                redis_down = True
                continue
            saved += 1
            self.clickhouse.add(
                "model_metrics",
                fraud_metric_rows(self.settings.app_id, partition, engine, _now_utc()),
            )
            for message in held:
                message.ack(consumer)
        if pickling_s:
            pacer.spent(pickling_s, time.monotonic())
        return saved

    async def forget_fraud_engines(self, partitions: Iterable[int]) -> None:
        """On revocation: checkpoint, then drop, so the next owner starts from our state."""
        wanted = [p for p in partitions if p in self.fraud_engines]
        await self.checkpoint_fraud_engines(wanted)
        for partition in wanted:
            self.fraud_engines.pop(partition, None)
            # Not saved (Redis down): those offsets stay uncommitted, and the next owner
            # restores the last saved image and reads them again.
            self._checkpoint_holds.pop(partition, None)

    def labels_caught_up(self, partition: int) -> bool:
        """True when this worker has read everything currently in that fraud-labels partition."""
        tp = TP(self.settings.topic("fraud-labels"), partition)
        try:
            highwater = self.topology.app.consumer.highwater(tp)
        except AssertionError:  # not assigned to this worker: nothing to wait for
            return True
        if highwater is None:  # not fetched yet: its labels may still be on the way
            return False
        if highwater == 0:  # an empty partition
            return True
        seen = self.label_offsets.get(partition)
        return seen is not None and seen + 1 >= highwater


class InFlightBatches:
    """The micro-batches the agents are processing right now.

    A batch reads its users' state from the tables before its first write and writes their
    Redis keys at its end, with awaits in between. A forget (``streams/agents/privacy.py``)
    erases the tables first, then waits here for the batches that were already running, and
    only then deletes the Redis keys: none of those batches can write the keys back after it.
    Batches that start later read the erased state.
    """

    def __init__(self) -> None:
        self._running: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._running)

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        """Around one batch of an agent."""
        batch_id = next(self._ids)
        done = self._running[batch_id] = asyncio.get_running_loop().create_future()
        try:
            yield
        finally:
            del self._running[batch_id]
            done.set_result(None)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every batch running now has ended; False if some still run after
        ``timeout_s`` (e.g. held by back-pressure while ClickHouse is down)."""
        running = list(self._running.values())
        if not running:
            return True
        _, pending = await asyncio.wait(running, timeout=timeout_s)
        return not pending


def micro_batches(
    stream: faust.StreamT, settings: Settings
) -> AsyncIterator[Sequence[faust.EventT]]:
    """The agent's input as micro-batches of up to ``batch_max_events`` events (events keep
    their message metadata), sized by the load instead of by a clock.

    A batch is whatever arrived while the agent was busy with the previous one: taken at
    once when the agent is free. Only an idle agent waits, for the first event and then at
    most ``batch_within_s`` for more. So a light load gets small batches soon, a heavy one
    batches that grow until they amortise the per-batch work (up to ``batch_max_events``).
    Events are acknowledged when the agent asks for the next batch; a batch whose processing
    raised is *not* acknowledged (unlike Faust's ``take_events``), so its offsets are never
    committed and a restart processes it again; see :func:`adaptive_batches`.
    """
    faust_stream = cast(faust.Stream, stream)
    batches: AsyncIterator[Sequence[faust.EventT]] = adaptive_batches(
        faust_stream, settings.batch_max_events, settings.batch_within_s
    )
    metrics = find_metrics(getattr(faust_stream, "app", None))
    if metrics is not None:  # batch sizes and processing times, per agent
        batches = observed_batches(batches, metrics, current_agent_name())
    # Like take_events: registered so that stopping the stream closes (and acks) it.
    active = getattr(faust_stream, "_active_agens", None)
    if active is not None:
        active.add(batches)
    return batches


def _now_utc() -> datetime:
    """Wall-clock time for ``model_metrics.computed_at`` (which value is the newest)."""
    return datetime.now(UTC).replace(microsecond=0)


def wall_ms() -> int:
    """Wall-clock time for *operational* fields only (``updated_at``), never for results."""
    return int(time.time() * 1000)


async def adaptive_batches(
    stream: faust.Stream, max_events: int, max_wait_s: float
) -> AsyncIterator[list[faust.EventT]]:
    """Faust's ``Stream.take_events`` with a deadline per batch instead of a fixed window.

    ``take_events(n, within)`` waits ``within`` after every batch, even when events have been
    waiting all along, and stops filling its buffer while the caller processes a batch, so
    the events that queue meanwhile enter the buffer (at Faust's per-event cost) only during
    the next wait. Here the stream keeps filling the next batch while the current one is
    processed, and a batch is taken when it has ``max_events`` events or when its first event
    has waited ``max_wait_s`` (at once if that passed while the caller was busy). Otherwise
    the same contract: at most ``max_events`` per batch (the stream pauses while the next
    batch is full), acks off while buffering, each batch's events acked when the caller asks
    for the next one. A batch the caller did not finish (its body raised, or the agent was
    cancelled mid-batch) is not acked: Faust then never commits past it, so nothing it held
    is lost (``take_events`` acks it in a ``finally``, which loses the batch when a sink
    raised half-way).
    """
    loop = asyncio.get_running_loop()
    pending: list[faust.EventT] = []
    first_at = 0.0  # loop time the first event of ``pending`` arrived
    arrived = asyncio.Event()  # ``pending`` is not empty
    full = asyncio.Event()  # ``pending`` has ``max_events`` events
    room = asyncio.Event()  # ``pending`` has room
    room.set()

    async def add_to_buffer(value: Any) -> Any:
        nonlocal first_at
        event = stream.current_event
        if event is None:
            raise RuntimeError("adaptive_batches: stream has no current event")
        while len(pending) >= max_events:
            room.clear()
            if await stream.wait_for_stopped(cast(Any, room)):
                return value  # stopping: never acked, so the next owner gets it again
        if not pending:
            first_at = loop.time()
            arrived.set()
        pending.append(event)
        if len(pending) >= max_events:
            full.set()
        return value

    enable_acks = stream.enable_acks
    stream.enable_acks = False  # acked here, per batch, once processed
    stream.add_processor(add_to_buffer)
    stream._enable_passive(cast(faust.ChannelT, aiter(stream.channel)))
    try:
        while not stream.should_stop:
            if not pending:
                arrived.clear()
                await stream.wait_for_stopped(cast(Any, arrived), timeout=1.0)
                continue
            remaining = first_at + max_wait_s - loop.time()
            if remaining > 0 and len(pending) < max_events:
                await stream.wait_for_stopped(cast(Any, full), timeout=remaining)
            batch = pending[:]
            pending.clear()
            full.clear()
            room.set()
            try:
                yield batch
            except GeneratorExit:
                log.error(
                    "a micro-batch of %d events was not finished; not acknowledged, so its "
                    "offsets stay uncommitted until a restart processes it again",
                    len(batch),
                )
                raise
            for event in batch:
                await stream.ack(event)
    finally:
        stream.enable_acks = enable_acks
        stream._processors.remove(add_to_buffer)
