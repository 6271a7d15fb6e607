"""Access control on a second local stack with every credential set (docs/security.md).

The stack runs on its own ports and directory with a Redis pipeline user, a read-only
storefront user and no ``default`` user, and a ClickHouse writer plus a read-only analyst. A
worker processes a few events as the pipeline; then each user is checked for what it may and
may not do, and every log and CLI output of the run is searched for the passwords.

Kafka stays PLAINTEXT: Tansu (the local broker) can authenticate, but its memory storage has
no way to create the first SASL user. tests/unit/test_config_access.py checks that the SASL and
TLS settings reach both Faust and confluent-kafka.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from clickhouse_driver.errors import Error as ClickHouseError
from pydantic import SecretStr

from infra.processes import WorkerProcess, start_worker, wait_processed
from infra.stack import LocalStack
from schemas.config import Settings
from schemas.events import ALL_TOPICS
from sinks.clickhouse import clickhouse_client
from sinks.kafka import EventProducer, ensure_topics
from sinks.pseudonym import Pseudonymiser
from sinks.redis_store import RedisStore
from sinks.storefront_client import StorefrontClient
from tests.integration.test_pipeline import click, payment, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
#: ClickHouse's READONLY, DATABASE_ACCESS_DENIED.
READONLY, ACCESS_DENIED = 164, 291


@dataclass
class SecureStack:
    settings: Settings
    secrets: list[str]
    #: Output of every CLI command the run used (stack up/status/down, migrate).
    outputs: list[str] = field(default_factory=list)
    worker: WorkerProcess | None = None
    users: tuple[str, str] = ("", "")  # a user with recommendations, the "teacher"


def _cli(settings: Settings, *args: str, ok: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORDERFLOW_")}
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        env={**env, **settings.to_env()},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, f"borderflow {' '.join(args)}: {output}"
    return output


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    tag = uuid.uuid4().hex[:10]
    secrets = {
        "redis_password": f"redis-pipe-{tag}-never-logged",
        "storefront_redis_password": f"redis-shop-{tag}-never-logged",
        "clickhouse_password": f"ch-writer-{tag}-never-logged",
        "clickhouse_analyst_password": f"ch-analyst-{tag}-never-logged",
        "pseudonym_key": f"pseudonym-{tag}-never-logged",
    }
    secret_values: dict[str, Any] = {name: SecretStr(value) for name, value in secrets.items()}
    settings = Settings(
        kafka_bootstrap="127.0.0.1:55292",
        redis_url="redis://127.0.0.1:55479/0",
        clickhouse_port=55100,
        clickhouse_http_port=55223,
        stack_dir=tmp_path_factory.mktemp("access-stack"),
        redis_username="bf_pipeline",
        storefront_redis_username="bf_storefront",
        clickhouse_user="bf_writer",
        clickhouse_analyst_user="bf_analyst",
        **secret_values,
        topic_prefix=f"acc{tag}-",
        app_id=f"bf-acc{tag}",
        clickhouse_flush_interval_s=0.2,
        # Exercise every kind of Redis write the worker makes within the test's seconds.
        record_latency=True,
        fraud_checkpoint_interval_s=1.0,
        serving_checkpoint_interval_s=1.0,
    )
    secure = SecureStack(settings, list(secrets.values()))
    try:
        secure.outputs.append(_cli(settings, "stack", "up"))
        secure.outputs.append(_cli(settings, "stack", "status"))
        secure.outputs.append(_cli(settings, "stack", "status", "--json"))
        secure.outputs.append(_cli(settings, "migrate"))
        ensure_topics(settings, list(ALL_TOPICS))
        secure.worker = start_worker(settings, settings.stack_dir / "worker-logs", "worker")
        user, teacher = f"u-{tag}", f"t-{tag}"
        secure.users = (user, teacher)
        with EventProducer(settings) as producer:
            clicks = [
                (teacher, orjson.dumps(click(teacher, f"{teacher}-1", 0, item_id="i1"))),
                (teacher, orjson.dumps(click(teacher, f"{teacher}-2", 1, item_id="i2"))),
                (user, orjson.dumps(click(user, f"{user}-1", 2, item_id="i1"))),
            ]
            for key, value in clicks:
                producer.send(settings.topic("clicks"), key, value)
            producer.send(
                settings.topic("payments"), user, orjson.dumps(payment(user, f"{user}-p1", 3, 42.0))
            )
        wait_processed(settings, 4, secure.worker, timeout_s=120)
        yield secure
    finally:
        if secure.worker is not None:
            secure.worker.stop()
        try:
            secure.outputs.append(_cli(settings, "stack", "down"))
        finally:
            LocalStack(settings).down()  # by pid file; a no-op when the CLI stopped it


# --- Redis -------------------------------------------------------------------------------------


def test_redis_default_user_is_rejected(secure: SecureStack) -> None:
    port = secure.settings.redis_port
    password = secure.settings.redis_password
    assert password is not None
    attempts: list[dict[str, Any]] = [
        {},
        {"password": password.get_secret_value()},
        {"password": "nopass"},
    ]
    for kwargs in attempts:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, **kwargs)
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            client.ping()
        client.close()


def test_pipeline_user_writes_but_cannot_administer(secure: SecureStack) -> None:
    settings = secure.settings
    user, _ = secure.users
    # The worker, as the pipeline user, wrote the user's recommendations and counters.
    meta = wait_until(
        lambda: _redis(settings, "read_meta", user).get("last_event_id") == f"{user}-1",
        timeout_s=60,
        what="recs written by the worker",
    )
    assert meta
    assert sum(_redis(settings, "processed_counts").values()) >= 4
    assert wait_until(
        lambda: _redis(settings, "load_serving_checkpoint", settings.app_id),
        timeout_s=60,
        what="serving checkpoint",
    )

    client = redis.Redis.from_url(settings.redis_url, **settings.redis_credentials())
    try:
        # Fraud checkpoints and latency samples: the other kinds of write the worker makes.
        # SCAN is allowed (tests clean up their keys with it).
        for pattern in ("fraud:checkpoint:*", "stats:latency_ms:*"):
            match = f"{settings.redis_prefix}{pattern}"
            assert wait_until(
                lambda m=match: list(client.scan_iter(match=m)), timeout_s=60, what=pattern
            )
        client.hset(f"{settings.redis_prefix}access-test", "written", "1")
        assert client.hget(f"{settings.redis_prefix}access-test", "written") == b"1"
        for command in (
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "requirepass"),
            ("ACL", "LIST"),
            ("SCRIPT", "FLUSH"),
            ("SHUTDOWN",),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    finally:
        client.close()


def test_storefront_user_reads_recs_but_cannot_write(secure: SecureStack) -> None:
    settings = secure.settings
    user, _ = secure.users
    wait_until(
        lambda: _redis(settings, "read_meta", user).get("last_event_id") == f"{user}-1",
        timeout_s=60,
        what="recs",
    )
    with StorefrontClient.from_settings(settings) as shop:
        recs = shop.recommendations(user, 5)
        assert recs.item_ids and recs.basis == "session"
        assert recs.item_ids[0] == "i2"  # what followed i1 in the teacher's session
        assert shop.profile(user) is not None
        client = shop.client
        recs_key = f"{settings.redis_prefix}recs:{user}"
        writes: list[tuple[str, ...]] = [
            ("ZADD", recs_key, "1", "evil"),
            ("DEL", recs_key),
            ("HSET", f"{settings.redis_prefix}profile:{user}", "segment", "x"),
            ("SET", f"{settings.redis_prefix}new", "1"),
            ("EVAL", "return 1", "0"),
            ("FLUSHDB",),
            ("SCAN", "0"),
        ]
        for command in writes:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        # Keys outside the prefix are out of reach even for reads.
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("other:key")
        assert client.zrevrange(recs_key, 0, 0)  # unchanged


def _redis(settings: Settings, method: str, *args: Any) -> Any:
    import asyncio

    async def call() -> Any:
        store = RedisStore(settings)
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.aclose()

    return asyncio.run(call())


# --- ClickHouse --------------------------------------------------------------------------------


def test_clickhouse_writer_writes_the_facts(secure: SecureStack) -> None:
    settings = secure.settings
    user, _ = secure.users
    pseudonym = Pseudonymiser.from_settings(settings).pseudonym(user, "user")
    client = clickhouse_client(settings)
    try:
        rows = wait_until(
            lambda: client.execute(
                "SELECT count() FROM click_events WHERE user_id = %(u)s", {"u": pseudonym}
            )[0][0],
            timeout_s=60,
            what="the user's click in ClickHouse",
        )
        assert rows == 1
        assert client.execute("SELECT count() FROM schema_migrations")[0][0] >= 8
    finally:
        client.disconnect()


def test_clickhouse_analyst_reads_facts_and_nothing_else(secure: SecureStack) -> None:
    settings = secure.settings
    analyst = settings.as_clickhouse_analyst()
    database = settings.clickhouse_database
    # The writer makes a second database the analyst must not see.
    other = f"{database}_private"
    writer = clickhouse_client(settings)
    writer.execute(f"CREATE DATABASE IF NOT EXISTS {other}")
    writer.execute(f"CREATE TABLE IF NOT EXISTS {other}.secrets (x UInt8) ENGINE = Memory")
    writer.disconnect()

    client = clickhouse_client(analyst)
    try:
        wait_until(
            lambda: client.execute("SELECT count() FROM click_events")[0][0] >= 3,
            timeout_s=60,
            what="clicks visible to the analyst",
        )
        assert client.execute(f"SELECT count() FROM {database}.fraud_scores")[0][0] >= 1
        assert client.execute("SELECT count() FROM fraud_scores FINAL")[0][0] >= 1
        denied = {
            "INSERT": ("INSERT INTO schema_migrations (version) VALUES", [(9999,)]),
            "ALTER": ("ALTER TABLE click_events DELETE WHERE 1", None),
            "DROP": ("DROP TABLE click_events", None),
            "CREATE TABLE": ("CREATE TABLE scratch (x UInt8) ENGINE = Memory", None),
            "CREATE DATABASE": ("CREATE DATABASE scratch", None),
            "TRUNCATE": ("TRUNCATE TABLE click_events", None),
            "SET": ("SET readonly = 0", None),
        }
        for what, (sql, params) in denied.items():
            with pytest.raises(ClickHouseError) as error:
                client.execute(sql, params) if params else client.execute(sql)
            assert getattr(error.value, "code", None) == READONLY, what
        with pytest.raises(ClickHouseError) as error:
            client.execute(f"SELECT count() FROM {other}.secrets")
        assert getattr(error.value, "code", None) == ACCESS_DENIED
    finally:
        client.disconnect()
    # Nothing changed: the writer still sees every table.
    assert clickhouse_client(settings).execute("SELECT count() FROM click_events")[0][0] >= 3

    # Even a session that starts in another database is refused.
    elsewhere = clickhouse_client(analyst, "default")
    with pytest.raises((ClickHouseError, EOFError, OSError)):
        elsewhere.execute("SELECT 1")
    elsewhere.disconnect()


# --- secrets -----------------------------------------------------------------------------------


def test_a_wrong_password_is_refused_without_printing_either(secure: SecureStack) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    settings = secure.settings.model_copy(update={"clickhouse_password": SecretStr(wrong)})
    output = _cli(settings, "migrate", ok=False)
    secure.outputs.append(output)
    assert "error" in output.lower()
    assert wrong not in output


def test_secrets_are_in_no_log_and_no_output(secure: SecureStack) -> None:
    """Every file of the stack directory (server logs, generated configs, the worker's log,
    ClickHouse's data) and every CLI output: no password, no key, in any encoding we write."""
    assert secure.worker is not None
    secure.worker.stop()  # its shutdown lines too
    status = json.loads(secure.outputs[2])
    assert set(status["users"]["redis"]) == {"bf_pipeline", "bf_storefront"}
    assert set(status["users"]["clickhouse"]) == {"bf_writer", "bf_analyst"}

    log = secure.worker.log_path.read_text(errors="replace")
    assert "NOPERM" not in log and "NoPermission" not in log, "the pipeline ACL lacks a command"
    assert "Traceback" not in log, log[-3000:]

    haystacks: dict[str, bytes] = {
        f"output {n}": text.encode() for n, text in enumerate(secure.outputs)
    }
    files = [path for path in Path(secure.settings.stack_dir).rglob("*") if path.is_file()]
    assert any(path.name == "redis.log" for path in files)
    assert any(path.name == "clickhouse-server.log" for path in files)
    assert secure.worker.log_path in files
    for path in files:
        haystacks[str(path)] = path.read_bytes()
    for secret in secure.secrets:
        for name, content in haystacks.items():
            assert secret.encode() not in content, f"a secret is in {name}"
