"""The one settings class. Read once at the edge (CLI / worker start) and passed down.

Every field can be set from the environment with the ``BORDERFLOW_`` prefix, e.g.
``BORDERFLOW_KAFKA_BOOTSTRAP=kafka:9092``. The defaults point at the local stack started by
``borderflow stack up``; docker-compose.yml sets the same variables for the production path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the local stack keeps data, logs and pid files (git-ignored).
DEFAULT_STACK_DIR = Path(__file__).resolve().parent.parent / ".stack"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BORDERFLOW_", extra="forbid", frozen=True)

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:19092"
    #: Passed through to both aiokafka (Faust) and confluent-kafka.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    #: Prepended to every topic name; tests use it to isolate runs on one broker.
    topic_prefix: str = ""
    topic_partitions: int = Field(default=4, ge=1)

    # --- Faust worker --------------------------------------------------------------------
    app_id: str = "borderflow"
    #: ``memory://`` (state rebuilt from changelog topics at start) or ``rocksdb://``.
    store: str = "memory://"
    worker_web_port: int = 16066
    #: Address the worker's web server (/metrics, /health) binds: loopback by default;
    #: ``0.0.0.0`` in a container, so Prometheus on the container network can scrape it.
    worker_web_host: str = "127.0.0.1"
    #: Micro-batch: at most this many events; a batch is taken when the agent is free and
    #: its first event has waited ``batch_within_s`` (at once if that passed meanwhile).
    batch_max_events: int = Field(default=1000, ge=1)
    batch_within_s: float = Field(default=0.05, ge=0)
    #: How often the worker commits consumed offsets (of batches whose rows are durable).
    broker_commit_interval_s: float = Field(default=1.0, gt=0)
    #: Broker session timeout; Tansu needs a short one for a quick group join.
    broker_session_timeout_s: float = 6.0
    broker_heartbeat_interval_s: float = 1.0
    #: How long a fetch may wait at the broker for new data. Faust hard-codes 1500 ms;
    #: Tansu holds a fetch for the whole wait instead of answering when data arrives, which
    #: added up to 1.5 s of latency. A short wait costs a few idle fetches per second.
    consumer_fetch_max_wait_ms: int = Field(default=20, ge=1, le=5000)
    #: "batched" (production) or "naive" (per-event, the bench's baseline).
    pipeline: str = "batched"
    #: Record produce-to-visible latency samples in Redis (``stats:latency_ms:*``); the
    #: bench turns it on. Uses each message's producer timestamp (CreateTime).
    record_latency: bool = False

    # --- Redis ---------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_password: SecretStr | None = None
    #: Every Redis key starts with this (contract: ``bf:``); tests use their own.
    redis_prefix: str = "bf:"
    recs_top_n: int = Field(default=20, ge=1, le=500)
    #: Diversity: at most this many items of one category in a user's recs (0: no cap).
    recs_max_per_category: int = Field(default=6, ge=0, le=500)
    #: Logistics-aware ranking: expected extra delivery days (vs the fastest candidate, from
    #: the item's origin to the user's country) that halve an item's score (0: off).
    recs_delivery_half_days: float = Field(default=10.0, ge=0)
    #: Length of each ``bf:fbt:{item_id}`` list (frequently bought together).
    fbt_top_n: int = Field(default=20, ge=1, le=500)
    #: ``bf:shipment:{order_id}`` hashes expire this long after their last write (0: never).
    shipment_ttl_days: float = Field(default=60.0, ge=0)
    #: Logistics alert: predicted delivery later than the promise by more than this.
    logistics_late_margin_h: float = Field(default=12.0, ge=0)
    #: How often (wall clock) the worker saves its recommender, item catalog, delivery lanes
    #: and "bought together" statistics to Redis (restored at start-up).
    serving_checkpoint_interval_s: float = Field(default=60.0, gt=0)

    # --- ClickHouse ----------------------------------------------------------------------
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = 19000
    clickhouse_http_port: int = 18123
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")
    clickhouse_database: str = "borderflow"
    #: Rows are buffered and inserted in one columnar block at this size or age.
    clickhouse_flush_rows: int = Field(default=20_000, ge=1)
    clickhouse_flush_interval_s: float = Field(default=1.0, gt=0)
    #: Key of the keyed hash that replaces user and card ids before they reach ClickHouse
    #: (sinks/pseudonym.py). The default is for the local stack only: set your own secret in
    #: production, and keep it - a new key gives every user a new pseudonym.
    pseudonym_key: SecretStr = SecretStr("borderflow-local-stack-only")

    # --- Fraud ---------------------------------------------------------------------------
    #: How the alert threshold is set: "fixed" (fraud_alert_threshold), "alert_rate" (alert on
    #: about fraud_alert_target of payments) or "precision" (lowest threshold whose precision
    #: on recently labelled payments reaches fraud_alert_target).
    fraud_alert_policy: Literal["fixed", "alert_rate", "precision"] = "fixed"
    fraud_alert_threshold: float = Field(default=0.8, ge=0, le=1)
    fraud_alert_target: float = Field(default=0.01, gt=0, lt=1)
    #: Optional cap on alerts per event-time day and partition.
    fraud_alert_daily_budget: int | None = Field(default=None, ge=0)
    #: A payment with no label this long after its time is learned as legitimate.
    fraud_label_timeout_days: float = Field(default=30.0, gt=0)
    #: What drift on the model's error stream does besides a metric and a log line:
    #: "log" (nothing more) or "reset" (retrain the supervised learner from scratch).
    fraud_drift_reaction: Literal["log", "reset"] = "log"
    #: How often (wall clock) each partition's fraud engine is checkpointed to Redis; the
    #: offsets of payments and labels are committed only once a checkpoint holds them.
    fraud_checkpoint_interval_s: float = Field(default=5.0, gt=0)
    #: Labels are applied to the model once payments' event time passes label time + this
    #: delay, which makes scores independent of how the two topics interleave on arrival.
    fraud_label_apply_delay_s: float = Field(default=3600.0, ge=0)
    #: How long (wall clock) a payment batch may wait for the label stream to catch up in
    #: event time before it is scored anyway (only an idle or absent label stream waits).
    fraud_label_wait_s: float = Field(default=2.0, ge=0)
    #: Feature snapshots older than this (event time) are dropped; their labels count as late.
    fraud_snapshot_ttl_days: float = Field(default=60.0, gt=0)

    # --- Local stack ---------------------------------------------------------------------
    stack_dir: Path = DEFAULT_STACK_DIR

    def to_env(self) -> dict[str, str]:
        """These settings as BORDERFLOW_* variables, for child processes (workers, tests)."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"BORDERFLOW_{name.upper()}"] = str(value)
        return env

    def topic(self, name: str) -> str:
        """The broker-side name of contract topic ``name``."""
        return f"{self.topic_prefix}{name}"

    @property
    def redis_port(self) -> int:
        from urllib.parse import urlparse

        return urlparse(self.redis_url).port or 6379

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.rsplit(":", 1)[1])

    def confluent_config(self) -> dict[str, str]:
        """Security settings for confluent-kafka (librdkafka names)."""
        config = {"bootstrap.servers": self.kafka_bootstrap}
        if self.kafka_security_protocol != "PLAINTEXT":
            config["security.protocol"] = self.kafka_security_protocol
        if self.kafka_sasl_mechanism:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
            config["sasl.username"] = self.kafka_sasl_username or ""
            config["sasl.password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
            )
        return config
