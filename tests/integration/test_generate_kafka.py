"""generate / replay / EventProducer against the running broker (isolated topic prefix)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from click.testing import CliRunner
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from infra.generator import INPUT_TOPICS, GeneratorConfig, generate_command, generate_to_list
from infra.replay import replay_command
from schemas.config import Settings
from sinks.kafka import EventProducer, ensure_topics

pytestmark = pytest.mark.integration


def consume_all(settings: Settings, topics: list[str], expected: int, timeout_s: float = 60.0):
    """Every message of ``topics`` (contract names) from the beginning, by assignment."""
    admin = AdminClient(settings.confluent_config())
    metadata = admin.list_topics(timeout=10)
    partitions = [
        TopicPartition(settings.topic(t), p, 0)  # offset 0: the topics are fresh
        for t in topics
        for p in metadata.topics[settings.topic(t)].partitions
    ]
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign(partitions)
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(10_000, 0.5):
                assert message.error() is None, message.error()
                messages.append(message)
        # A little longer: more messages than expected is a failure too.
        messages.extend(m for m in consumer.consume(10_000, 0.5) if m.error() is None)
    finally:
        consumer.close()
    return messages


def test_ensure_topics_is_idempotent(isolated_settings: Settings) -> None:
    created = ensure_topics(isolated_settings, INPUT_TOPICS)
    assert created == sorted(isolated_settings.topic(t) for t in INPUT_TOPICS)
    assert ensure_topics(isolated_settings, INPUT_TOPICS) == []
    metadata = AdminClient(isolated_settings.confluent_config()).list_topics(timeout=10)
    for topic in created:
        assert len(metadata.topics[topic].partitions) == isolated_settings.topic_partitions
    assert ensure_topics(isolated_settings, ["deadletter"], partitions=1) == [
        isolated_settings.topic("deadletter")
    ]


def test_generate_to_kafka_keys_partitions_and_timestamps(isolated_settings: Settings) -> None:
    args = ["--users", "60", "--days", "3", "--seed", "5", "--quiet"]
    result = CliRunner().invoke(generate_command, args, obj=isolated_settings)
    assert result.exit_code == 0, result.output
    expected = generate_to_list(GeneratorConfig(users=60, days=3, seed=5))
    messages = consume_all(isolated_settings, list(INPUT_TOPICS), len(expected))
    assert len(messages) == len(expected)
    assert Counter(m.topic() for m in messages) == Counter(
        isolated_settings.topic(e.topic) for e in expected
    )
    n_partitions = isolated_settings.topic_partitions
    all_partitions = list(range(n_partitions))
    by_id = {(isolated_settings.topic(e.topic), e.value["event_id"]): e for e in expected}
    for message in messages:
        value = orjson.loads(message.value())
        event = by_id[(message.topic(), value["event_id"])]
        assert value == event.value
        assert message.key() == event.key.encode()
        assert message.timestamp()[1] == event.ts
        # The same partition Faust's (aiokafka's, Java's) murmur2 partitioner would pick.
        assert message.partition() == DefaultPartitioner()(
            message.key(), all_partitions, all_partitions
        )


def test_replay_delivers_invalid_rows_too(isolated_settings: Settings, tmp_path: Path) -> None:
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(
        b'{"topic":"payments","key":"u1","value":{"event_id":"t1","ts":1767225600000,'
        b'"user_id":"u1","card_id":"c","merchant_id":"m","amount":5,"currency":"EUR"}}\n'
        b'{"topic":"payments","value":{"event_id":"t2","user_id":"u2","amount":-1}}\n'
    )
    csv = tmp_path / "clicks.csv"
    csv.write_text(
        "event_id,ts,user_id,session_id,type,item_id\n"
        "c1,1767225600000,u3,s1,view,i1\n"
        "c2,not-a-time,u4,s1,view,\n"
    )
    result = CliRunner().invoke(
        replay_command,
        [str(jsonl), str(csv), "--topic", "clicks", "--quiet"],
        obj=isolated_settings,
    )
    assert result.exit_code == 0, result.output
    assert "replayed 4 events" in result.output
    messages = consume_all(isolated_settings, ["payments", "clicks"], 4)
    got = {orjson.loads(m.value())["event_id"]: m for m in messages}
    assert set(got) == {"t1", "t2", "c1", "c2"}
    assert got["t2"].key() == b"u2"
    assert orjson.loads(got["c2"].value())["ts"] == "not-a-time"  # untouched, for the worker
    assert got["c1"].timestamp()[1] == 1767225600000


def test_replay_speed_paces_by_event_time(isolated_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "paced.jsonl"
    lines = [
        orjson.dumps(
            {"topic": "clicks", "value": {"user_id": "u1", "ts": 1767225600000 + k * 2000}}
        )
        for k in range(3)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    began = time.monotonic()
    result = CliRunner().invoke(
        replay_command, [str(path), "--speed", "4", "--quiet"], obj=isolated_settings
    )
    assert result.exit_code == 0, result.output
    assert time.monotonic() - began >= 1.0  # 4 s of event time at 4x real time


def test_event_producer_counts_and_flushes(isolated_settings: Settings) -> None:
    ensure_topics(isolated_settings, ["clicks"])
    topic = isolated_settings.topic("clicks")
    with EventProducer(isolated_settings) as producer:
        for k in range(5000):
            producer.send(topic, f"u{k % 50}", b'{"k":%d}' % k)
    assert producer.sent == 5000 and producer.failed == 0
    assert len(consume_all(isolated_settings, ["clicks"], 5000)) == 5000
