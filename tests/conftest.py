"""Shared fixtures: the running local stack, and per-test isolated names on it.

``make test`` starts the stack before pytest; plain ``pytest`` works too because ``stack``
calls the idempotent ``LocalStack.up()``. Nothing here stops the stack: ``make test`` /
``make down`` own its lifetime, and restarting ClickHouse per session would cost seconds.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator

import pytest

from infra.stack import LocalStack
from schemas.config import Settings


@pytest.fixture(scope="session")
def stack() -> Settings:
    """Settings (from BORDERFLOW_* env, default ports) for a local stack that is up.

    A stack that cannot start fails the requesting tests with the reason (never skips).
    """
    settings = Settings()
    LocalStack(settings).up()
    return settings


@pytest.fixture
def isolated_settings(stack: Settings) -> Iterator[Settings]:
    """``stack`` with names unique to this test: topics, Redis keys, ClickHouse database, app.

    Tests can share one broker, Redis and ClickHouse without seeing each other's data. Redis
    keys and the ClickHouse database are dropped afterwards so the shared dev stack does not
    fill up; topics stay (the broker is memory-only and forgets them on restart).
    """
    tag = f"t{uuid.uuid4().hex[:8]}"
    settings = stack.model_copy(
        update={
            "topic_prefix": f"{tag}-",
            "redis_prefix": f"{tag}:",
            "clickhouse_database": f"bf_{tag}",
            "app_id": f"borderflow-{tag}",
        }
    )
    yield settings
    _drop_test_data(settings)


def _drop_test_data(settings: Settings) -> None:
    """Best effort: a failed cleanup must not turn a passing test into an error."""
    import redis
    from clickhouse_driver import Client

    try:
        client = redis.Redis.from_url(settings.redis_url, **settings.redis_credentials())
        try:
            keys = list(client.scan_iter(match=f"{settings.redis_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
    except redis.RedisError as exc:
        warnings.warn(f"could not delete test Redis keys: {exc}", stacklevel=1)

    clickhouse = Client(
        settings.clickhouse_host,
        port=settings.clickhouse_port,
        user=settings.clickhouse_user,
        password=settings.clickhouse_password.get_secret_value(),
    )
    try:
        clickhouse.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    except Exception as exc:  # clickhouse_driver raises its own errors and socket errors
        warnings.warn(f"could not drop test ClickHouse database: {exc}", stacklevel=1)
    finally:
        clickhouse.disconnect()
