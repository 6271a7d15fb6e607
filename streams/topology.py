"""The whole borderflow topology on one screen: the Faust app, its topics and its tables.

    clicks        --> update_profiles_and_recs --> table user_profiles
      (key user_id)                             --> Redis bf:profile:{u}, bf:recs:{u}, :meta,
                                                    bf:fbt:{item}, bf:popular:{country}
                                                --> ClickHouse rec_predictions,
                                                    events_per_minute, segment_mix_per_hour
    payments      --> score_payments           --> ClickHouse fraud_scores, events_per_minute
      (key user_id)                             --> topic fraud-alerts (score >= threshold)
    fraud-labels  --> learn_fraud_labels       --> fraud model of the payment's partition
      (key user_id)                             --> ClickHouse fraud_labels
    logistics     --> track_shipments          --> tables user_shipments, user_profiles
      (key user_id)                             --> Redis bf:shipment:{order}, bf:profile:{u}
                                                --> topic logistics-alerts (delays)
                                                --> ClickHouse shipment_events, shipments,
                                                    shipment_predictions, events_per_minute
    privacy-requests --> forget_users          --> erases the user from both tables, the
      (key user_id)                                 fraud engine, serving models and Redis;
                                                --> Redis receipt bf:privacy:{request_id}
    any input that fails to decode or validate --> topic deadletter (reason + original bytes)

All four input topics are keyed by user_id and have the same partition count, so one user's
clicks, payments, labels and scans share a partition number and land on the same worker.
Each agent lives in its own module under ``streams/agents/``. Values are read as raw bytes
and decoded by the agents themselves, so that a bad message can be dead-lettered with its
reason instead of crashing the stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import faust
from aiokafka.partitioner import murmur2
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.transport.consumer import RecordMap
from faust.transport.drivers import aiokafka as kafka_driver
from faust.types import TP
from faust.types.transports import TransportT
from mode.utils.text import want_bytes

from schemas.config import Settings
from schemas.events import (
    CLICKS,
    DEADLETTER,
    FRAUD_ALERTS,
    FRAUD_LABELS,
    LOGISTICS,
    LOGISTICS_ALERTS,
    PAYMENTS,
    PRIVACY_REQUESTS,
)


@dataclass(frozen=True)
class Topology:
    app: faust.App
    clicks: faust.TopicT
    payments: faust.TopicT
    fraud_labels: faust.TopicT
    logistics: faust.TopicT
    fraud_alerts: faust.TopicT
    logistics_alerts: faust.TopicT
    deadletter: faust.TopicT
    #: ``borderflow forget`` requests (key user_id, co-partitioned with the inputs).
    privacy_requests: faust.TopicT
    #: user_id (bytes) -> UserProfile.to_bytes(); changelog-backed, so it survives restarts.
    user_profiles: faust.Table
    #: user_id (bytes) -> ShipmentBook.to_bytes(): the user's shipments in flight.
    user_shipments: faust.Table

    @property
    def input_topics(self) -> dict[str, faust.TopicT]:
        return {
            CLICKS: self.clicks,
            PAYMENTS: self.payments,
            FRAUD_LABELS: self.fraud_labels,
            LOGISTICS: self.logistics,
        }


def build_app(settings: Settings) -> faust.App:
    """A Faust app configured for at-least-once processing against ``settings``' broker."""
    datadir = settings.faust_datadir()
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    return BorderflowApp(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        # SASL and/or TLS, the same settings confluent-kafka gets (docs/security.md).
        broker_credentials=settings.faust_broker_credentials(),
        store=settings.store,
        # Not Faust's default ``{app_id}-data`` in the working directory.
        datadir=str(datadir),
        # exactly_once needs idempotent aiokafka producers, which Tansu rejects; sinks are
        # idempotent instead (see docs/architecture.md).
        processing_guarantee="at_least_once",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_commit_interval=settings.broker_commit_interval_s,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        stream_buffer_maxsize=max(4096, 2 * settings.batch_max_events),
        # Offsets are held until ClickHouse and the fraud checkpoints have the batch; waiting
        # for every message to be acked before a rebalance or shutdown could then stall for a
        # checkpoint interval or forever. Unacked offsets are simply not committed: the next
        # owner processes them again, and every sink and model absorbs the repeat.
        stream_wait_empty=False,
        producer_linger=0.005,
        # web_bind is the listening address; web_host only names the worker in its URL.
        web_bind=settings.worker_web_host,
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port,
        # Stream partitions resume only after the seek and the queue reset (see the class).
        TableManager=SeekFirstTableManager,
    )


def build_topology(settings: Settings, app: faust.App | None = None) -> Topology:
    app = app or build_app(settings)

    def topic(name: str) -> faust.TopicT:
        return app.topic(
            settings.topic(name),
            partitions=settings.topic_partitions,
            key_serializer="raw",
            value_serializer="raw",
        )

    def user_table(name: str) -> faust.Table:
        table = UserPartitionedTable(
            app,
            name=f"{settings.topic_prefix}{name}",
            default=None,
            beacon=app.tables.beacon,
            partitions=settings.topic_partitions,
            key_type=bytes,
            value_type=bytes,
        )
        return cast(faust.Table, app.tables.add(table))

    return Topology(
        app=app,
        clicks=topic(CLICKS),
        payments=topic(PAYMENTS),
        fraud_labels=topic(FRAUD_LABELS),
        logistics=topic(LOGISTICS),
        fraud_alerts=topic(FRAUD_ALERTS),
        logistics_alerts=topic(LOGISTICS_ALERTS),
        deadletter=topic(DEADLETTER),
        privacy_requests=topic(PRIVACY_REQUESTS),
        user_profiles=user_table("user_profiles"),
        user_shipments=user_table("user_shipments"),
    )


class UserPartitionedTable(faust.Table):
    """A table whose changelog partition is Kafka's default partition for the key.

    Faust normally writes a key's changelog to "the partition of the current event", which
    is undefined for writes made once per micro-batch (a batch mixes partitions). Hashing the
    user_id with murmur2 like the producers of the input topics puts each user's state on the
    same partition number as the user's events, so it moves with them on a rebalance. It is
    computed here rather than by the producer, which may not have the topic's metadata yet.
    """

    def partition_for_key(self, key: Any) -> int:
        return user_partition(want_bytes(key), int(self.partitions or 1))


def user_partition(key: bytes, partitions: int) -> int:
    """Kafka's default (murmur2) partition of ``key``: where the user's events and state go."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class SeekFirstRecovery(Recovery):
    """Faust's recovery, except that stream partitions resume only once the queues are reset.

    When table recovery ends, Faust 0.15.3 (and its master, faust-streaming issue #596)
    resumes fetching from the stream partitions, *then* seeks them to their committed offsets
    and only then calls ``flow_control.resume()``, which empties every agent's channel queue.
    Whatever the running fetcher delivered in between is thrown away although the consumer's
    position is already past it: those offsets are never processed nor acked. Faust then
    never commits past the hole, and the partition's later events still write their rows, so
    ClickHouse holds a partition's offsets with a gap below its written position, which
    every later owner skips (``streams/facts.py``). Seen as a worker that stops committing
    and facts that never complete after a restart. Here the stream partitions stay paused
    until the seek is done and the queues are emptied; the rest is Faust's code unchanged.
    """

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        app = cast(Any, self.app)
        consumer = app.consumer
        self.log.info("Restore complete!")
        await app.on_rebalance_complete.send()
        self._set_recovery_ended()
        tables = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if tables:
            await asyncio.wait(tables)
        assignment = consumer.assignment()
        if app.consumer_generation_id != generation_id:
            self.log.warning(
                f"Recovery rebalancing again app id {app.consumer_generation_id} "
                f"param {generation_id}"
            )
            return
        if assignment:
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        self.completed.set()
        app.flow_control.resume()  # empties every channel queue
        consumer.resume_flow()
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class SeekFirstTableManager(TableManager):
    """Faust's table manager with :class:`SeekFirstRecovery`."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = SeekFirstRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


class SnapshotConsumer(kafka_driver.Consumer):
    """Faust's aiokafka consumer, asking for records of a *copy* of its active partitions.

    Faust hands its live set of active (unpaused) partitions to the consumer thread, and
    aiokafka's ``fetched_records`` returns the buffered records of *every* partition when that
    set is empty. aiokafka keeps prefetching partitions Faust has paused (Faust pauses only in
    its own set), so when recovery pauses the changelog partitions while a fetch is served
    (the set just became empty), aiokafka hands over the prefetched records of the still
    paused input partitions; Faust drops them as inactive, but aiokafka's position has moved
    past them: never processed, never acked. Seen after a restart as a worker that processes
    nothing (offsets uncommitted) or stops committing.
    """

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> RecordMap:
        if active_partitions is not None:
            active_partitions = set(active_partitions)
            if not active_partitions:
                return {}
        return await super()._getmany(active_partitions=active_partitions, timeout=timeout)


class SnapshotTransport(kafka_driver.Transport):
    Consumer = SnapshotConsumer


class BorderflowApp(faust.App):
    """A Faust app on :class:`SnapshotTransport` (borderflow's broker is always ``kafka://``)."""

    def _new_transport(self) -> TransportT:
        return SnapshotTransport(self.conf.broker_consumer, self)
