"""Builds a runnable borderflow worker: topology + shared runtime + the agents.

``create_worker_app(settings)`` is what ``borderflow worker`` runs. The pipeline variant is
chosen by name (``settings.pipeline``): ``batched`` (production) or ``naive`` (bench baseline).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
import mode

from schemas.config import Settings
from schemas.errors import BorderflowError
from streams.agents import clicks, fraud_labels, logistics, naive, payments, privacy
from streams.metrics import add_pages
from streams.runtime import Runtime
from streams.topology import build_topology

log = logging.getLogger(__name__)


def _register_batched(runtime: Runtime) -> None:
    clicks.register(runtime)
    payments.register(runtime)
    fraud_labels.register(runtime)
    logistics.register(runtime)
    privacy.register(runtime)


PIPELINES: dict[str, Callable[[Runtime], object]] = {
    "batched": _register_batched,
    "naive": naive.register,
}


def create_worker_app(settings: Settings) -> tuple[faust.App, Runtime]:
    register = PIPELINES.get(settings.pipeline)
    if register is None:
        raise BorderflowError(
            f"unknown pipeline {settings.pipeline!r}; choose one of {', '.join(PIPELINES)}"
        )
    topology = build_topology(settings)
    runtime = Runtime(settings, topology)
    register(runtime)

    class RuntimeService(mode.Service):
        """Flushes ClickHouse and closes Redis when the worker stops."""

        async def on_stop(self) -> None:
            await runtime.close()

    topology.app.service(RuntimeService)
    add_pages(topology.app, runtime)  # /metrics (Prometheus) and /health

    @topology.app.timer(settings.fraud_checkpoint_interval_s)
    async def checkpoint_fraud_engines() -> None:
        await runtime.checkpoint_fraud_engines()

    @topology.app.timer(settings.serving_checkpoint_interval_s)
    async def checkpoint_serving_models() -> None:
        await runtime.checkpoint_serving_models()

    async def forget_revoked_fraud_engines(app: faust.App, revoked: set[Any], **_: Any) -> None:
        payments_topic = settings.topic("payments")
        await runtime.forget_fraud_engines(
            tp.partition for tp in revoked if tp.topic == payments_topic
        )

    async def flush_facts_of_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
        # The next owner reads where each fact table ends (streams/facts.py): our buffered
        # rows must be in ClickHouse before the rebalance goes on.
        if revoked:
            await asyncio.to_thread(runtime.clickhouse.flush)

    async def reread_positions_of_assigned(app: faust.App, assigned: set[Any], **_: Any) -> None:
        runtime.positions.forget(tp.partition for tp in assigned)

    # Faust calls receivers as (sender, revoked, signal=...); its stubs cannot say async.
    topology.app.on_partitions_revoked.connect(cast(Any, forget_revoked_fraud_engines))
    topology.app.on_partitions_revoked.connect(cast(Any, flush_facts_of_revoked))
    topology.app.on_partitions_assigned.connect(cast(Any, reread_positions_of_assigned))

    topology.app.task(_shorten_fetch_wait(topology.app, settings.consumer_fetch_max_wait_ms))
    topology.app.task(_widen_producer_buffer(topology.app, settings.batch_max_events))
    topology.app.task(_quiet_debug_logging)
    topology.app.task(_freeze_startup_heap)
    return topology.app, runtime


async def _quiet_debug_logging() -> None:
    """A start-up task that stops debug log records from being built at all.

    ``faust worker`` sets the root logger to DEBUG whatever ``--loglevel`` says (it feeds
    its start-up spinner), so every ``log.debug`` in aiokafka, Faust, redis-py and
    clickhouse-driver built a record (several per message sent or fetched) only for the
    handlers to drop it. The root level goes back to the lowest level a real handler shows.
    """
    from faust.utils.terminal.spinners import SpinnerHandler

    root = logging.getLogger()
    levels = [h.level for h in root.handlers if not isinstance(h, SpinnerHandler)]
    wanted = min(levels) if levels else logging.WARNING
    if root.level < wanted:
        root.setLevel(wanted)


async def _freeze_startup_heap() -> None:
    """A start-up task that takes the start-up heap out of the garbage collector's scans.

    The modules and objects loaded at start (Faust, aiokafka, River, scipy, numpy...) are
    hundreds of thousands of long-lived objects; every full collection walked them all and
    paused the event loop for 100-250 ms, which went straight into the latency tail.
    ``gc.freeze`` moves them to the permanent generation: still freed by reference counting,
    just not scanned for cycles. Objects created later are collected as before.
    """
    gc.collect()
    gc.freeze()


#: Changelog records a worker may have queued for sending before intake pauses, per event of
#: the largest micro-batch (each batch writes at most one record per user and table).
CHANGELOG_BUFFER_PER_BATCH_EVENT = 4


def _widen_producer_buffer(app: faust.App, batch_max_events: int) -> Callable[[], Awaitable[None]]:
    """A start-up task that lets a micro-batch's table writes queue without stalling intake.

    Faust pauses every input partition whenever more than 100 changelog records wait to be
    sent (``ProducerBuffer.max_messages``), and then waits for them one by one (a timed
    wait per record, logging "producer buffer full"). One micro-batch writes one record per
    user and table, often several hundred: each batch stalled intake. The limit becomes a
    multiple of the batch size, which still bounds the queue.
    """

    async def widen() -> None:
        app.producer.buffer.max_messages = max(
            app.producer.buffer.max_messages, batch_max_events * CHANGELOG_BUFFER_PER_BATCH_EVENT
        )

    return widen


def _shorten_fetch_wait(app: faust.App, wait_ms: int) -> Callable[[], Awaitable[None]]:
    """A start-up task that sets the consumer's fetch wait (Faust offers no setting for it).

    The aiokafka consumer is created by Faust's consumer thread after start; its fetcher reads
    ``_fetch_max_wait_ms`` for every request, so changing it once takes effect at once.
    """

    async def shorten() -> None:
        for _ in range(600):
            thread = getattr(app.consumer, "_thread", None)
            fetcher = getattr(getattr(thread, "_consumer", None), "_fetcher", None)
            if fetcher is not None:
                fetcher._fetch_max_wait_ms = wait_ms
                return
            await asyncio.sleep(0.1)
        log.warning("could not set the consumer fetch wait; latency may be higher")

    return shorten
