"""Write-behind for the agents' Redis writes: one pipeline per batch, and no crash when Redis
is down.

Agents queue what a micro-batch wants storefronts to see (user states, item lists, shipment
views, fraud alerts, processed counters, latency samples) and call :meth:`RedisWriteBehind.flush`
at the batch's end, which writes it all in one pipeline. When Redis cannot be reached, the
writes stay queued, a background task retries with exponential backoff, and the agents go on
scoring, alerting and inserting into ClickHouse; the caller's ``on_stored`` callback runs once
the queued writes are stored (the runtime holds the batch's Kafka offsets until then, so a
crash meanwhile replays them).

Memory stays bounded because the queue *coalesces*: every serving key holds one value, the
newest by event time (the same rule as the Lua guards in ``sinks/redis_store.py``), so a long
outage costs one entry per user, item list or shipment touched, not one per event. Past
``max_pending`` entries :meth:`wait_for_capacity` pauses the agents (backpressure) instead of
growing without bound.

Only connection-level failures (refused, reset, timed out, Redis still loading its data) are
retried; any other Redis error is a bug or a misconfiguration and is raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sinks.redis_store import UserState

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Failures that mean "Redis is not reachable right now" (BusyLoadingError, raised while a
#: restarted Redis loads its AOF, is a ConnectionError).
RETRYABLE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
#: Latency samples kept while Redis is down (they are a sample; the oldest go first).
MAX_PENDING_LATENCIES = 10_000


@dataclass
class PendingWrites:
    """Queued serving writes, coalesced per key (newest event time wins)."""

    user_states: dict[str, UserState] = field(default_factory=dict)
    #: (kind, key) -> ranked items; kind is ``fbt`` or ``popular``.
    item_lists: dict[tuple[str, str], list[tuple[str, float]]] = field(default_factory=dict)
    #: order_id -> (shipment view fields, ttl_s).
    shipments: dict[str, tuple[Mapping[str, str | int | float], int]] = field(default_factory=dict)
    alerts: list[bytes] = field(default_factory=list)
    processed: Counter[str] = field(default_factory=Counter)
    #: stage -> producer timestamps (ms) of the events made visible; turned into latencies
    #: when they are stored.
    latency_origins: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        """Entries held (what the memory bound counts)."""
        return (
            len(self.user_states)
            + len(self.item_lists)
            + len(self.shipments)
            + len(self.alerts)
            + sum(len(v) for v in self.latency_origins.values())
        )

    def __bool__(self) -> bool:
        return bool(len(self) or self.processed)

    def add_user_state(self, state: UserState) -> None:
        held = self.user_states.get(state.user_id)
        if held is None or held.event_ts <= state.event_ts:
            self.user_states[state.user_id] = state

    def add_shipment(self, fields: Mapping[str, str | int | float], ttl_s: int) -> None:
        order_id = str(fields["order_id"])
        held = self.shipments.get(order_id)
        if held is None or int(held[0]["last_scan_ts"]) <= int(fields["last_scan_ts"]):
            self.shipments[order_id] = (fields, ttl_s)

    def add_latency_origins(self, stage: str, produced_ms: Iterable[int]) -> None:
        origins = self.latency_origins.setdefault(stage, [])
        origins.extend(produced_ms)
        if len(origins) > MAX_PENDING_LATENCIES:
            del origins[: len(origins) - MAX_PENDING_LATENCIES]

    def absorb_older(self, older: PendingWrites) -> None:
        """Put back writes that failed, under the ones queued since (which are newer)."""
        for state in older.user_states.values():
            self.add_user_state(state)
        for key, items in older.item_lists.items():
            self.item_lists.setdefault(key, items)
        for fields, ttl_s in older.shipments.values():
            self.add_shipment(fields, ttl_s)
        self.alerts[:0] = older.alerts
        self.processed.update(older.processed)
        for stage, origins in older.latency_origins.items():
            newer = self.latency_origins.get(stage, [])
            self.latency_origins[stage] = []
            self.add_latency_origins(stage, [*origins, *newer])

    def drop_user(self, user_id: str) -> int:
        """Forget the queued writes of one user (``borderflow forget``); entries dropped."""
        dropped = int(self.user_states.pop(user_id, None) is not None)
        theirs = [o for o, (f, _) in self.shipments.items() if f.get("user_id") == user_id]
        for order_id in theirs:
            del self.shipments[order_id]
        alerts = [a for a in self.alerts if orjson.loads(a).get("user_id") != user_id]
        dropped += len(self.alerts) - len(alerts)
        self.alerts = alerts
        return dropped + len(theirs)


class ServingStore(Protocol):
    """What the write-behind needs of ``sinks.redis_store.RedisStore``."""

    async def write_serving_batch(self, batch: PendingWrites, *, updated_at_ms: int) -> None: ...


class RedisWriteObserver(Protocol):
    """Told about failed and delayed writes (the worker's metrics implement it)."""

    def redis_write_failed(self, error: str) -> None: ...


class RedisWriteBehind:
    """Queue, coalesce and store the agents' serving writes; retry while Redis is down."""

    def __init__(
        self,
        store: ServingStore,
        *,
        max_pending: int = 100_000,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        observer: RedisWriteObserver | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self.max_pending = max_pending
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._observer = observer
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._pending = PendingWrites()
        #: Callbacks of flushes that could not store: run once their writes are stored.
        self._waiting: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self.failures = 0
        self.last_error: str | None = None
        #: Wall time (monotonic) of the first failure of the current outage; None when healthy.
        self.failing_since: float | None = None
        #: Seconds from the first failure to the stored retry, per recovered outage.
        self.recoveries_s: list[float] = []

    # -- queueing (never blocks) ----------------------------------------------------------
    def add_user_states(self, states: Iterable[UserState]) -> None:
        for state in states:
            self._pending.add_user_state(state)

    def add_item_lists(self, lists: Mapping[str, list[tuple[str, float]]], *, kind: str) -> None:
        for key, items in lists.items():
            self._pending.item_lists[(kind, key)] = items

    def add_shipments(
        self, shipments: Iterable[Mapping[str, str | int | float]], *, ttl_s: int
    ) -> None:
        for fields in shipments:
            self._pending.add_shipment(fields, ttl_s)

    def add_alerts(self, documents: Iterable[bytes]) -> None:
        self._pending.alerts.extend(documents)

    def add_processed(self, processed: Mapping[str, int]) -> None:
        self._pending.processed.update({k: v for k, v in processed.items() if v})

    def add_latency_origins(self, stage: str, produced_ms: Iterable[int]) -> None:
        self._pending.add_latency_origins(stage, produced_ms)

    def drop_user(self, user_id: str) -> int:
        return self._pending.drop_user(user_id)

    # -- state ----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def retrying(self) -> bool:
        return self._retry_task is not None and not self._retry_task.done()

    def has_capacity(self) -> bool:
        return len(self._pending) < self.max_pending

    async def wait_for_capacity(self) -> None:
        """Pause the caller while the queue is over its bound (Redis down for long)."""
        while not self.has_capacity() and self.retrying:
            self._drained.clear()
            await self._drained.wait()

    # -- storing --------------------------------------------------------------------------
    async def flush(self, on_stored: Callable[[], None] | None = None) -> bool:
        """Store everything queued now; True when stored. False when Redis is unreachable:
        the writes stay queued, retried in the background, and ``on_stored`` runs once they
        are stored (with everything queued up to then)."""
        if on_stored is not None:
            self._waiting.append(on_stored)
        if self.retrying:
            # Redis is down: don't make every batch wait for a connection error.
            return False
        async with self._lock:
            stored = await self._attempt()
        if not stored:
            self._start_retrying()
        return stored

    async def _attempt(self) -> bool:
        """One try at storing the queue (under ``_lock``); False on a connection failure.

        The queue and the callbacks waiting for it are taken together: writes queued while
        the pipeline is on its way belong to the next attempt, and so do their callbacks.
        """
        batch, self._pending = self._pending, PendingWrites()
        callbacks, self._waiting = self._waiting, []
        if batch:
            try:
                await self._store.write_serving_batch(batch, updated_at_ms=self._clock_ms())
            except RETRYABLE as exc:
                # Non-transactional pipeline: some commands may have run. Running them again
                # is harmless for the guarded states and replaced lists; alerts and counters
                # may be repeated (docs/operations.md, "Redis outages").
                self._pending.absorb_older(batch)
                self._waiting[:0] = callbacks
                self._failed(exc)
                return False
        for callback in callbacks:
            callback()
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("Redis writes failing, queued and retried: %s", self.last_error)
        if self._observer is not None:
            self._observer.redis_write_failed(self.last_error)

    def _start_retrying(self) -> None:
        if not self.retrying:
            self._retry_task = asyncio.ensure_future(self._retry_until_stored())

    async def _retry_until_stored(self) -> None:
        delay = self._retry_initial_s
        while True:
            await asyncio.sleep(delay)
            async with self._lock:
                if await self._attempt():
                    break
            delay = min(self._retry_max_s, delay * 2)
        if self.failing_since is not None:
            outage = time.monotonic() - self.failing_since
            self.recoveries_s.append(outage)
            log.warning("Redis writes stored again after %.1f s", outage)
        self.failing_since = None
        self._drained.set()

    async def close(self, timeout_s: float = 10.0) -> bool:
        """Final flush at shutdown; False if the queue could not be stored in time (its
        offsets were never committed, so the next owner redoes those batches)."""
        if self.retrying and self._retry_task is not None:
            done, _ = await asyncio.wait({self._retry_task}, timeout=timeout_s)
            if not done:
                self._retry_task.cancel()
                return False
        return await self.flush()


async def retry_redis(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    initial_s: float = 0.2,
    max_s: float = 5.0,
) -> T:
    """Run ``call`` until Redis answers it (backoff from ``initial_s`` to ``max_s``): for the
    reads and writes an agent cannot go on without (model checkpoints, forget requests)."""
    delay = initial_s
    warned = False
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            if not warned:
                log.warning("Redis unreachable for %s, retrying: %s", what, exc)
                warned = True
            await asyncio.sleep(delay)
            delay = min(max_s, delay * 2)


def describe(writes: RedisWriteBehind) -> dict[str, Any]:
    """The write-behind's state for ``/health``."""
    return {
        "pending_writes": writes.pending,
        "capacity": writes.max_pending,
        "retrying": writes.retrying,
        "failures": writes.failures,
        "last_error": writes.last_error,
    }
