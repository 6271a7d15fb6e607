"""Plain confluent-kafka helpers for tools that write to Kafka outside the Faust worker.

The generator, the replayer and the benchmarks need a fast producer (confluent-kafka
produces 130k+ msg/s here, aiokafka one awaited send at a time ~25k) and a way to create the
contract topics before anything reads them. Nothing here imports Faust: these helpers run in
short-lived CLI processes where the worker's machinery would only cost start-up time.

Two details matter for correctness rather than speed:

* ``partitioner=murmur2_random``: librdkafka's default (``consistent_random``, CRC32) puts a
  key on a different partition than the Java/aiokafka murmur2 partitioner that Faust uses, so
  a user's events produced here would land on another partition than the ones the worker
  re-produces or co-partitions with. murmur2_random is byte-for-byte the Java behaviour for
  non-null keys.
* LZ4 is used only when the consumers can read it: aiokafka (Faust's client) decodes LZ4
  through the optional ``cramjam`` package; without it an LZ4 batch would crash the worker's
  fetcher, so messages then go uncompressed.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.config import Settings
from schemas.errors import BorderflowError

#: How often (in sends) the producer is polled to serve delivery callbacks.
_POLL_EVERY = 512


def consumers_read_lz4() -> bool:
    """True when aiokafka in this environment can decompress LZ4 batches (needs cramjam)."""
    return importlib.util.find_spec("cramjam") is not None


def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    timeout_s: float = 15.0,
) -> list[str]:
    """Create the missing topics among contract topics ``names``; return the ones created.

    Names are contract names (``clicks``...); the broker-side names carry
    ``settings.topic_prefix``. Idempotent: existing topics are left as they are, and a topic
    created concurrently by someone else (TOPIC_ALREADY_EXISTS) counts as success.
    """
    wanted = {settings.topic(name) for name in names}
    if not wanted:
        return []
    admin = AdminClient(dict(settings.confluent_config()))
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise BorderflowError(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {_kafka_reason(exc)}"
        ) from None
    missing = sorted(wanted - existing)
    if not missing:
        return []
    count = partitions if partitions is not None else settings.topic_partitions
    futures = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=count,
                replication_factor=settings.topic_replication_factor,
            )
            for name in missing
        ],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise BorderflowError(f"cannot create topic {name!r}: {_kafka_reason(exc)}") from None
    return sorted(created)


def _kafka_reason(exc: BaseException) -> str:
    error = exc.args[0] if exc.args else exc
    if isinstance(error, KafkaError):
        return error.str()
    return str(error)


class EventProducer:
    """A confluent-kafka producer for contract events: idempotent, murmur2-partitioned.

    Use as a context manager; delivery failures are collected by a callback and raised as one
    :class:`BorderflowError` from :meth:`flush` (also called on a clean ``with`` exit)::

        with EventProducer(settings) as producer:
            producer.send(settings.topic("clicks"), "u1", b'{...}', timestamp_ms=ts)
    """

    def __init__(self, settings: Settings, extra_config: dict[str, Any] | None = None) -> None:
        config: dict[str, Any] = {
            **settings.confluent_config(),
            "linger.ms": 5,
            "compression.type": "lz4" if consumers_read_lz4() else "none",
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            # Only failures produce a callback: ~200k successful reports per second would
            # otherwise cost more Python time than the produce calls themselves.
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
            "error_cb": self._on_error,
        }
        config.update(extra_config or {})
        self.bootstrap = settings.kafka_bootstrap
        self._producer = Producer(config)
        self.sent = 0
        self.failed = 0
        self._first_failure: str | None = None
        self._fatal: str | None = None

    # -- callbacks (run inside poll/flush) -----------------------------------------------------
    def _on_delivery(self, error: KafkaError | None, message: Any) -> None:
        if error is None:
            return
        self.failed += 1
        if self._first_failure is None:
            self._first_failure = f"{message.topic()}: {error.str()}"

    def _on_error(self, error: KafkaError) -> None:
        # Non-fatal errors (a broker briefly down) are retried by librdkafka; only a fatal
        # one (e.g. idempotence sequence broken) ends the producer.
        if error.fatal() and self._fatal is None:
            self._fatal = error.str()

    # -- API ----------------------------------------------------------------------------------
    def send(
        self, topic: str, key: str | bytes | None, value: bytes, timestamp_ms: int | None = None
    ) -> None:
        """Queue one message; blocks (serving callbacks) while the local queue is full."""
        if self._fatal is not None:
            raise BorderflowError(f"Kafka producer failed ({self.bootstrap}): {self._fatal}")
        while True:
            try:
                self._producer.produce(topic, value, key, timestamp=timestamp_ms or 0)
                break
            except BufferError:
                # Local queue full: wait for deliveries to free room, then try again.
                self._producer.poll(0.05)
        self.sent += 1
        if self.sent % _POLL_EVERY == 0:
            self._producer.poll(0)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery callbacks, waiting at most ``timeout`` seconds."""
        self._producer.poll(timeout)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` while still serving the producer (used for pacing)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._producer.poll(min(remaining, 0.1))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every queued message; raise :class:`BorderflowError` on any failure."""
        remaining = self._producer.flush(timeout)
        if self._fatal is not None:
            raise BorderflowError(f"Kafka producer failed ({self.bootstrap}): {self._fatal}")
        if remaining:
            raise BorderflowError(
                f"{remaining} messages not delivered to {self.bootstrap} within {timeout:g}s"
            )
        if self.failed:
            failed, first = self.failed, self._first_failure
            # Reported once: a later flush only reports failures that happen after this one.
            self.failed, self._first_failure = 0, None
            raise BorderflowError(f"{failed} messages could not be delivered; first: {first}")

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
        else:
            # Already failing: deliver what we can, but do not hide the original error.
            self._producer.flush(5.0)


class TopicReader:
    """Reads a topic from its beginning without joining a consumer group.

    Tools (demo, bench, ``alerts tail``, tests) only observe a topic; a group join would cost
    seconds on Tansu and commit offsets nobody needs. All partitions are assigned directly.
    """

    def __init__(self, settings: Settings, topic: str, *, from_beginning: bool = True) -> None:
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

        self._consumer = Consumer({
            **settings.confluent_config(),
            "group.id": "borderflow-observer",  # required by librdkafka; never joined
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        })  # fmt: skip
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        if not partitions:
            self._consumer.close()
            raise BorderflowError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap}")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        self._consumer.assign([TopicPartition(topic, p, start) for p in sorted(partitions)])

    def poll(self, timeout_s: float) -> list[Any]:
        """Messages that arrive within ``timeout_s`` (errors such as EOF are skipped)."""
        messages = self._consumer.consume(num_messages=1000, timeout=timeout_s)
        return [m for m in messages if not m.error()]

    def read_until_idle(self, idle_s: float = 1.0, max_s: float = 30.0) -> list[Any]:
        """Everything until nothing new arrived for ``idle_s`` (or ``max_s`` passed)."""
        out: list[Any] = []
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            batch = self.poll(idle_s)
            if not batch:
                break
            out.extend(batch)
        return out

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
