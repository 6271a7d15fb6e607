"""The one settings class. Read once at the edge (CLI / worker start) and passed down.

Every field can be set from the environment with the ``BORDERFLOW_`` prefix, e.g.
``BORDERFLOW_KAFKA_BOOTSTRAP=kafka:9092``. The defaults point at the local stack started by
``borderflow stack up``; docker-compose.yml sets the same variables for the production path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import ssl

    from faust.types.auth import CredentialsT

#: Where the local stack keeps data, logs and pid files (git-ignored).
DEFAULT_STACK_DIR = Path(__file__).resolve().parent.parent / ".stack"

#: User names that end up in server config files (ClickHouse users.xml element names, Redis
#: ACL lines): letters, digits and ``_ . -`` only, so they need no quoting anywhere.
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS_PROTOCOLS = ("SSL", "SASL_SSL")


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error must never echo a value (it may be a secret);
    # the CLI prints validation errors as they are.
    model_config = SettingsConfigDict(
        env_prefix="BORDERFLOW_", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:19092"
    #: Security of the connection to the brokers, for both Faust (aiokafka) and
    #: confluent-kafka (``faust_broker_credentials()`` / ``confluent_config()``).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: SASL (``SASL_PLAINTEXT`` / ``SASL_SSL`` only): mechanism, user and password.
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    #: TLS (``SSL`` / ``SASL_SSL`` only): CA bundle that signed the brokers' certificates
    #: (default: the system's), client certificate and key for mutual TLS, the key's password.
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    #: Verify that the broker's certificate names the host connected to.
    kafka_ssl_check_hostname: bool = True
    #: Prepended to every topic name; tests use it to isolate runs on one broker.
    topic_prefix: str = ""
    topic_partitions: int = Field(default=4, ge=1)
    #: Replicas of every topic borderflow or Faust creates (contract topics, changelogs):
    #: 1 on a single broker (Tansu, compose); 3 on a production cluster.
    topic_replication_factor: int = Field(default=1, ge=1)

    # --- Faust worker --------------------------------------------------------------------
    app_id: str = "borderflow"
    #: ``memory://``: state rebuilt from the changelog topics at every start (the only store
    #: borderflow's batch writes support today; see docs/operations.md, state and recovery).
    store: str = "memory://"
    #: Faust's data folder of the worker (Faust keeps table files there), one sub-folder per
    #: app id; unset: ``{stack_dir}/faust``.
    data_dir: Path | None = None
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
    #: Without credentials in it: they go in redis_username / redis_password.
    redis_url: str = "redis://127.0.0.1:16379/0"
    #: ACL user of the pipeline (workers, tools); unset: Redis's ``default`` user.
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    #: Read-only ACL user of storefronts (``StorefrontClient.from_settings``); unset: the
    #: storefront client uses the pipeline's credentials.
    storefront_redis_username: str | None = None
    storefront_redis_password: SecretStr | None = None
    #: Every Redis key starts with this (contract: ``bf:``); tests use their own.
    redis_prefix: str = "bf:"
    #: A Redis call (connect, or one pipeline) that takes longer fails and is retried:
    #: a hung Redis must not hang the agents.
    redis_socket_timeout_s: float = Field(default=5.0, gt=0)
    #: Serving writes queued while Redis is unreachable (coalesced: one per user, item list,
    #: shipment, alert); above it the agents pause (back-pressure). sinks/redis_writes.py.
    redis_max_pending_writes: int = Field(default=200_000, ge=1)
    #: Longest wait between two retries of queued Redis writes (backoff from 0.2 s).
    redis_retry_max_s: float = Field(default=5.0, gt=0)
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
    #: The writer: the pipeline's inserts and the migrations (DDL).
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")
    #: Read-only user for analysts and dashboards (SELECT on clickhouse_database only); the
    #: local stack creates it when set.
    clickhouse_analyst_user: str | None = None
    clickhouse_analyst_password: SecretStr | None = None
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
    #: Checkpoints (fraud engines, serving models) are pickled on the event loop: a round is
    #: skipped while the previous rounds would take more than this share of the loop's time
    #: (large models are then saved less often than their interval says).
    checkpoint_max_loop_share: float = Field(default=0.05, gt=0, le=1)
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

    @field_validator(
        "clickhouse_user", "clickhouse_analyst_user", "redis_username", "storefront_redis_username"
    )
    @classmethod
    def _plain_user_name(cls, value: str | None) -> str | None:
        if value is not None and not _USER_NAME.fullmatch(value):
            raise ValueError("use letters, digits and _ . - only (starting with a letter or _)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        # A password in the URL would be printed wherever the URL is (status, repr, logs).
        parsed = urlparse(value)
        if parsed.username or parsed.password:
            raise ValueError(
                "put Redis credentials in BORDERFLOW_REDIS_USERNAME / BORDERFLOW_REDIS_PASSWORD, "
                "not in the URL"
            )
        return value

    @model_validator(mode="after")
    def _consistent_credentials(self) -> Settings:
        problems = []
        sasl = self.kafka_security_protocol in _SASL_PROTOCOLS
        sasl_set = (self.kafka_sasl_mechanism, self.kafka_sasl_username, self.kafka_sasl_password)
        if sasl and not all(sasl_set):
            problems.append(
                f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        if not sasl and any(sasl_set):
            problems.append(
                "KAFKA_SASL_* settings need KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT or SASL_SSL"
            )
        tls_files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if self.kafka_security_protocol not in _TLS_PROTOCOLS and any(tls_files):
            problems.append("KAFKA_SSL_* files need KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL")
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            problems.append("KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE")
        if self.redis_username and self.redis_password is None:
            problems.append("REDIS_USERNAME needs REDIS_PASSWORD")
        if bool(self.storefront_redis_username) != (self.storefront_redis_password is not None):
            problems.append("set both STOREFRONT_REDIS_USERNAME and STOREFRONT_REDIS_PASSWORD")
        if self.storefront_redis_username == (self.redis_username or "default"):
            problems.append("STOREFRONT_REDIS_USERNAME must differ from the pipeline's user")
        if self.clickhouse_analyst_user == self.clickhouse_user:
            problems.append("CLICKHOUSE_ANALYST_USER must differ from CLICKHOUSE_USER")
        if problems:
            raise ValueError("; ".join(f"BORDERFLOW_{problem}" for problem in problems))
        return self

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

    def faust_datadir(self) -> Path:
        """Where this app's worker keeps local table state."""
        return (self.data_dir or self.stack_dir / "faust") / self.app_id

    @property
    def redis_port(self) -> int:
        from urllib.parse import urlparse

        return urlparse(self.redis_url).port or 6379

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.rsplit(":", 1)[1])

    # --- clients' credentials -----------------------------------------------------------------
    # The only places secrets leave their SecretStr: handed straight to a client library.

    def confluent_config(self) -> dict[str, str]:
        """Bootstrap and security settings for confluent-kafka (librdkafka names)."""
        config = {"bootstrap.servers": self.kafka_bootstrap}
        if self.kafka_security_protocol != "PLAINTEXT":
            config["security.protocol"] = self.kafka_security_protocol
        if self.kafka_security_protocol in _SASL_PROTOCOLS:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism or ""
            config["sasl.username"] = self.kafka_sasl_username or ""
            config["sasl.password"] = _reveal(self.kafka_sasl_password)
        if self.kafka_security_protocol in _TLS_PROTOCOLS:
            if self.kafka_ssl_cafile:
                config["ssl.ca.location"] = str(self.kafka_ssl_cafile)
            if self.kafka_ssl_certfile:
                config["ssl.certificate.location"] = str(self.kafka_ssl_certfile)
            if self.kafka_ssl_keyfile:
                config["ssl.key.location"] = str(self.kafka_ssl_keyfile)
            if self.kafka_ssl_key_password is not None:
                config["ssl.key.password"] = _reveal(self.kafka_ssl_key_password)
            # librdkafka verifies the certificate chain in any case (enable.ssl.certificate.
            # verification defaults to true); this switches the host name check.
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.kafka_ssl_check_hostname else "none"
            )
        return config

    def kafka_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for aiokafka (Faust), from the same settings as confluent_config()."""
        if self.kafka_security_protocol not in _TLS_PROTOCOLS:
            return None
        import ssl

        context = ssl.create_default_context(
            cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
        )
        if self.kafka_ssl_certfile:
            context.load_cert_chain(
                str(self.kafka_ssl_certfile),
                str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
                _reveal(self.kafka_ssl_key_password) or None,
            )
        # The chain is always verified (CERT_REQUIRED); only the host name check is optional.
        context.check_hostname = self.kafka_ssl_check_hostname
        return context

    def faust_broker_credentials(self) -> CredentialsT | None:
        """Faust's ``broker_credentials`` for these settings (None: PLAINTEXT)."""
        import faust

        context = self.kafka_ssl_context()
        if self.kafka_security_protocol in _SASL_PROTOCOLS:
            return faust.SASLCredentials(
                username=self.kafka_sasl_username,
                password=_reveal(self.kafka_sasl_password),
                mechanism=self.kafka_sasl_mechanism,
                ssl_context=context,
            )
        if context is not None:
            return faust.SSLCredentials(context)
        return None

    def redis_credentials(self) -> dict[str, Any]:
        """``username`` / ``password`` keyword arguments of the pipeline's Redis clients."""
        return {
            "username": self.redis_username,
            "password": _reveal(self.redis_password) if self.redis_password else None,
        }

    def storefront_redis_credentials(self) -> dict[str, Any]:
        """The storefront's read-only user, or the pipeline's credentials when none is set."""
        if self.storefront_redis_username is None:
            return self.redis_credentials()
        return {
            "username": self.storefront_redis_username,
            "password": _reveal(self.storefront_redis_password),
        }

    def as_clickhouse_analyst(self) -> Settings:
        """These settings with the read-only analyst user as the ClickHouse user."""
        if self.clickhouse_analyst_user is None:
            raise ValueError("BORDERFLOW_CLICKHOUSE_ANALYST_USER is not set")
        return self.model_copy(
            update={
                "clickhouse_user": self.clickhouse_analyst_user,
                "clickhouse_password": self.clickhouse_analyst_password or SecretStr(""),
                "clickhouse_analyst_user": None,
                "clickhouse_analyst_password": None,
            }
        )


def _reveal(secret: SecretStr | None) -> str:
    return secret.get_secret_value() if secret is not None else ""
