"""``borderflow forget USER_ID``: erase one user from Redis, the workers' state and ClickHouse.

1. **Plan** (read only): the user's ClickHouse pseudonym (``sinks/pseudonym.py``), how many
   rows each table with a personal column (``PERSONAL_COLUMNS``) holds for it, and the user's
   order ids (``shipment_events``, ``shipments``, ``logistics_alerts``), whose
   ``shipment_predictions`` rows carry no user column but belong to the user all the same.
   ``--dry-run`` stops here and also counts the Redis keys.
2. **Request**: a :class:`schemas.events.PrivacyRequest` on ``privacy-requests``, keyed by
   user id like the input topics, so it reaches the worker that owns the user; that worker
   erases its state (``streams/agents/privacy.py``) and writes the receipt
   ``bf:privacy:{request_id}``.
3. **Redis**, directly: profile, recs, recs meta, the shipment hashes of the orders found in
   ClickHouse (only those whose ``user_id`` is the user's) and the ``bf:alerts`` entries that
   name the user. The worker deletes them again after its own erasure.
4. **Receipt**: waited for up to ``--wait`` seconds. Without one (no worker running, or
   lagging) the workers' part is *pending*: the request stays in the topic and is applied when
   the owning worker reads it.
5. **ClickHouse**: ``ALTER TABLE ... DELETE WHERE user_id = '<pseudonym>'`` on every such
   table (and ``shipment_predictions`` by order id), after the receipt, because the worker
   flushes the user's buffered rows before writing it; then waits for the mutations.

Every step is idempotent: running the command again is how a pending erasure is confirmed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from infra.retention import wait_for_mutations
from schemas.config import Settings
from schemas.errors import BorderflowError
from schemas.events import PRIVACY_REQUESTS, PrivacyRequest
from sinks.clickhouse import PERSONAL_COLUMNS, clickhouse_client
from sinks.pseudonym import Pseudonymiser
from sinks.redis_store import RedisStore

#: Tables whose rows belong to a user through ``order_id`` (no user column of their own).
ORDER_TABLES = ("shipment_predictions",)
#: Tables that name the user's orders.
ORDER_SOURCES = ("shipment_events", "shipments", "logistics_alerts")
#: Exit code of ``borderflow forget`` when the workers' part is still pending.
EXIT_PENDING = 3


@dataclass
class ForgetReport:
    user_id: str
    pseudonym: str
    request_id: str = ""
    dry_run: bool = False
    #: ClickHouse rows per table (to delete, or deleted).
    clickhouse: dict[str, int] = field(default_factory=dict)
    order_ids: list[str] = field(default_factory=list)
    #: Redis keys deleted (or present, in a dry run) by the command itself.
    redis: dict[str, int] = field(default_factory=dict)
    #: The worker's receipt (empty: none arrived in time).
    receipt: dict[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return not self.dry_run and self.receipt.get("status") != "done"

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        head = f"forget {self.user_id}"
        if self.request_id:
            head += f" (request {self.request_id})"
        out = [f"{head}; ClickHouse pseudonym {self.pseudonym}"]
        rows = ", ".join(f"{t} {n}" for t, n in sorted(self.clickhouse.items()) if n) or "no rows"
        out.append(f"  clickhouse  {verb}: {rows}")
        # Deleted by the command, or by the worker after its erasure (whichever came first).
        redis = {
            key: count + int(self.receipt.get(f"redis_{key}", 0) or 0)
            for key, count in self.redis.items()
        }
        out.append(f"  redis       {verb}: {_redis_text(redis)}")
        if self.dry_run:
            out.append("  workers     not asked (a dry run sends no request)")
        elif self.receipt.get("status") == "done":
            out.append(f"  workers     {_receipt_text(self.receipt)}")
        elif self.receipt.get("status") == "failed":
            out.append(
                f"  workers     FAILED on partition {self.receipt.get('partition', '?')}: "
                f"{self.receipt.get('error', 'unknown error')}; run the command again"
            )
        else:
            out.append(
                f"  workers     pending: no receipt yet; the request waits in topic "
                f"{PRIVACY_REQUESTS!r} and is applied when the worker owning the user reads it "
                "(run the command again to confirm)"
            )
        out.append(
            "  kafka       raw events stay in the input topics until their retention expires "
            "(docs/privacy.md)"
        )
        return out


def _redis_text(counts: Mapping[str, int]) -> str:
    names = (("profile", "profile"), ("recs", "recs keys"), ("shipments", "shipment hashes"),
             ("alerts", "alert entries"))  # fmt: skip
    parts = [f"{label} {counts.get(key, 0)}" for key, label in names]
    return ", ".join(parts)


#: Receipt fields, as the summary names them.
_RECEIPT_LABELS = (
    ("table_user_profiles", "user_profiles entry"),
    ("table_user_shipments", "user_shipments entry"),
    ("orders", "orders"),
    ("fraud_users", "fraud user state"),
    ("fraud_cards", "card states"),
    ("fraud_devices", "device states"),
    ("fraud_snapshots", "payment snapshots"),
    ("fraud_pending_labels", "queued labels"),
    ("serving_sessions", "recommender sessions"),
    ("serving_customs_watch", "customs watches"),
)


def _receipt_text(receipt: Mapping[str, str]) -> str:
    parts = [f"{label} {receipt.get(key, '0')}" for key, label in _RECEIPT_LABELS]
    text = f"removed on partition {receipt.get('partition', '?')}: " + ", ".join(parts)
    if receipt.get("drained") == "0":
        text += "; some batches were still running after 30 s: run the command again"
    if receipt.get("clickhouse_flushed") == "0":
        text += "; the worker's buffered rows were not stored yet: run the command again"
    return text


# -- ClickHouse ---------------------------------------------------------------------------------
def _user_tables(client: Any, database: str) -> list[str]:
    existing = {
        name
        for name, engine in client.execute(
            "SELECT name, engine FROM system.tables WHERE database = %(db)s", {"db": database}
        )
        if not engine.endswith("View")
    }
    return sorted(t for t, cols in PERSONAL_COLUMNS.items() if "user_id" in cols and t in existing)


def plan_clickhouse(
    client: Any, database: str, pseudonym: str, known_orders: Iterable[str] = ()
) -> tuple[dict[str, int], list[str]]:
    """Rows per table for ``pseudonym`` (tables with a user column, then the order tables by
    the user's order ids) and those order ids (found, plus ``known_orders``)."""
    counts: dict[str, int] = {}
    orders = set(known_orders)
    for table in _user_tables(client, database):
        [(n_rows,)] = client.execute(
            f"SELECT count() FROM {database}.{table} WHERE user_id = %(p)s", {"p": pseudonym}
        )
        counts[table] = int(n_rows)
        if table in ORDER_SOURCES and n_rows:
            found = client.execute(
                f"SELECT DISTINCT order_id FROM {database}.{table} WHERE user_id = %(p)s",
                {"p": pseudonym},
            )
            orders.update(order_id for (order_id,) in found)
    existing = {name for (name,) in client.execute(f"SHOW TABLES FROM {database}")}
    for table in ORDER_TABLES:
        if table in existing and orders:
            [(n_rows,)] = client.execute(
                f"SELECT count() FROM {database}.{table} WHERE order_id IN %(orders)s",
                {"orders": tuple(sorted(orders))},
            )
            counts[table] = int(n_rows)
    return counts, sorted(orders)


def delete_clickhouse(
    client: Any, database: str, pseudonym: str, known_orders: Iterable[str] = ()
) -> dict[str, int]:
    """Delete the user's rows and wait for the mutations; rows per table. They are counted
    first, since ClickHouse does not say how many rows a mutation removed."""
    counts, orders = plan_clickhouse(client, database, pseudonym, known_orders)
    for table, n_rows in counts.items():
        if not n_rows:
            continue
        params: dict[str, Any]
        if table in ORDER_TABLES:
            condition, params = "order_id IN %(orders)s", {"orders": tuple(orders)}
        else:
            condition, params = "user_id = %(p)s", {"p": pseudonym}
        client.execute(f"ALTER TABLE {database}.{table} DELETE WHERE {condition}", params)
    wait_for_mutations(client, database, what="ClickHouse deletes")
    return counts


# -- Redis ----------------------------------------------------------------------------------------
async def _redis_present(store: RedisStore, user_id: str, orders: list[str]) -> dict[str, int]:
    """What the Redis part would delete (a dry run)."""
    client = store.client
    profile = int(await client.exists(store.profile_key(user_id)))
    recs = int(await client.exists(store.recs_key(user_id), store.recs_meta_key(user_id)))
    shipments = 0
    for order_id in orders:
        owner: Any = await client.hget(store.shipment_key(order_id), "user_id")
        shipments += int(owner is not None and bytes(owner).decode() == user_id)
    alerts = 0
    for _, document in await _all_alerts(store):
        try:
            alerts += int(orjson.loads(document).get("user_id") == user_id)
        except (orjson.JSONDecodeError, AttributeError):
            continue
    return {"profile": profile, "recs": recs, "shipments": shipments, "alerts": alerts}


async def _all_alerts(store: RedisStore) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    last = "0-0"
    while True:
        chunk = await store.read_alerts(last, count=1000)
        if not chunk:
            return out
        out.extend(chunk)
        last = chunk[-1][0]


async def _redis_forget(store: RedisStore, user_id: str, orders: list[str]) -> dict[str, int]:
    counts = await store.forget_user(user_id, orders)
    counts["alerts"] = await store.forget_alerts(user_id)
    return counts


async def _wait_for_receipt(store: RedisStore, request_id: str, wait_s: float) -> dict[str, str]:
    deadline = time.monotonic() + wait_s
    while True:
        receipt = await store.read_privacy_receipt(request_id)
        if receipt.get("status") in ("done", "failed") or time.monotonic() >= deadline:
            return receipt
        await asyncio.sleep(0.2)


def _redis(settings: Settings, work: Any) -> Any:
    """Run ``work(store)`` on a fresh store; connection trouble becomes one readable line."""
    import redis

    async def run() -> Any:
        store = RedisStore(settings)
        try:
            return await work(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(run())
    except redis.RedisError as exc:
        raise BorderflowError(f"Redis at {settings.redis_url} failed: {exc}") from None


# -- the command ----------------------------------------------------------------------------------
def send_request(settings: Settings, user_id: str) -> str:
    """Put a forget request for ``user_id`` on ``privacy-requests``; returns its id."""
    from sinks.kafka import EventProducer, ensure_topics

    request = PrivacyRequest(
        request_id=uuid.uuid4().hex, user_id=user_id, requested_at=int(time.time() * 1000)
    )
    ensure_topics(settings, [PRIVACY_REQUESTS])
    with EventProducer(settings) as producer:
        producer.send(
            settings.topic(PRIVACY_REQUESTS),
            user_id,
            orjson.dumps(request.model_dump()),
            timestamp_ms=request.requested_at,
        )
        producer.flush(15)
    return request.request_id


def _clickhouse(settings: Settings, work: Any) -> Any:
    database = settings.clickhouse_database
    try:
        client = clickhouse_client(settings, database)
        try:
            return work(client, database)
        finally:
            client.disconnect()
    except BorderflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - one readable line for the CLI
        reason = " ".join(str(exc).split("Stack trace")[0].split())[:300]
        raise BorderflowError(f"ClickHouse ({database}) failed: {reason}") from None


def run_forget(
    settings: Settings, user_id: str, *, wait_s: float = 60.0, dry_run: bool = False
) -> ForgetReport:
    if not 1 <= len(user_id) <= 128:
        raise BorderflowError("a user id has 1 to 128 characters")
    pseudonym = Pseudonymiser.from_settings(settings).pseudonym(user_id, "user")
    report = ForgetReport(user_id, pseudonym, dry_run=dry_run)
    # 1. What ClickHouse holds (read only): fails before anything is erased.
    counts, orders = _clickhouse(
        settings, lambda client, db: plan_clickhouse(client, db, pseudonym)
    )
    report.clickhouse, report.order_ids = counts, orders
    if dry_run:
        report.redis = _redis(settings, lambda store: _redis_present(store, user_id, orders))
        return report
    # 2. The request for the worker that owns the user.
    report.request_id = send_request(settings, user_id)
    # 3. Redis keys the command can find itself (the worker deletes them again).
    report.redis = _redis(settings, lambda store: _redis_forget(store, user_id, orders))
    # 4. The worker's receipt: its state is erased and its buffered rows are in ClickHouse.
    report.receipt = _redis(
        settings, lambda store: _wait_for_receipt(store, report.request_id, wait_s)
    )
    # 5. ClickHouse rows (counted again: the worker may have flushed more).
    report.clickhouse = _clickhouse(
        settings, lambda client, db: delete_clickhouse(client, db, pseudonym, orders)
    )
    return report
