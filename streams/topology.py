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
    any input that fails to decode or validate --> topic deadletter (reason + original bytes)

All four input topics are keyed by user_id and have the same partition count, so one user's
clicks, payments, labels and scans share a partition number and land on the same worker.
Each agent lives in its own module under ``streams/agents/``. Values are read as raw bytes
and decoded by the agents themselves, so that a bad message can be dead-lettered with its
reason instead of crashing the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import faust
from aiokafka.partitioner import murmur2
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
    credentials = None
    if settings.kafka_sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=settings.kafka_sasl_username or "",
            password=(
                settings.kafka_sasl_password.get_secret_value()
                if settings.kafka_sasl_password
                else ""
            ),
            mechanism=settings.kafka_sasl_mechanism,
        )
    return faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=credentials,
        store=settings.store,
        # exactly_once needs idempotent aiokafka producers, which Tansu rejects; sinks are
        # idempotent instead (see docs/architecture.md).
        processing_guarantee="at_least_once",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
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
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port,
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
        return (murmur2(want_bytes(key)) & 0x7FFFFFFF) % int(self.partitions or 1)
