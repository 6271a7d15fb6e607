"""The Redis serving store read by storefronts (keys documented in docs/contracts.md).

Per user, one Lua call writes the profile hash, the recommendation sorted set and its meta
hash atomically, and refuses to overwrite a state that reflects a *later* event time (feast's
"no older write" guard): replays and redeliveries can never make a storefront regress.
All users of a micro-batch go in one non-transactional pipeline: one round trip per batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis

from schemas.config import Settings

if TYPE_CHECKING:
    from sinks.redis_writes import PendingWrites

#: Length cap (approximate) of the ``bf:alerts`` stream.
ALERTS_MAX_LEN = 100_000
#: This process, as operators see it in ``stats:processed:{host}:{pid}``.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

# KEYS: profile hash, recs zset, recs meta hash
# ARGV: event_ts_ms, event_id, updated_at_ms, n_profile_pairs, n_meta_pairs,
#       <profile field, value>..., <meta field, value>..., then <score, item> pairs (may be none).
_WRITE_USER_STATE = """
local stored = redis.call('HGET', KEYS[3], 'last_event_ts')
local event_ts = tonumber(ARGV[1])
if stored and tonumber(stored) > event_ts then
  return 0
end
local n_profile = tonumber(ARGV[4])
local n_meta = tonumber(ARGV[5])
local profile_end = 5 + 2 * n_profile
local meta_end = profile_end + 2 * n_meta
if n_profile > 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 6, profile_end))
end
redis.call('DEL', KEYS[2])
if #ARGV > meta_end then
  redis.call('ZADD', KEYS[2], unpack(ARGV, meta_end + 1, #ARGV))
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'last_event_id', ARGV[2], 'last_event_ts', ARGV[1],
           'updated_at', ARGV[3])
if n_meta > 0 then
  redis.call('HSET', KEYS[3], unpack(ARGV, profile_end + 1, meta_end))
end
return 1
"""

# KEYS: shipment hash; ARGV: last_scan_ts_ms, ttl_s (0: none), then <field, value> pairs (which
# include last_scan_ts). Refuses to replace a state built from a later scan.
_WRITE_SHIPMENT = """
local stored = redis.call('HGET', KEYS[1], 'last_scan_ts')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, #ARGV))
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return 1
"""

# KEYS: shipment hashes; ARGV[1]: user_id. Deletes the hashes that belong to that user (their
# ``user_id`` field), so a forget never takes another user's order; returns how many went.
_DELETE_USER_SHIPMENTS = """
local n = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'user_id') == ARGV[1] then
    n = n + redis.call('DEL', KEYS[i])
  end
end
return n
"""

#: Alert stream entries read per round trip when a forget looks for a user's alerts.
ALERT_SCAN_CHUNK = 1000

# KEYS: one sorted set; ARGV: <score, member> pairs. Replaces the set atomically, so a reader
# never sees it half-written (used for ``fbt:{item_id}``).
_REPLACE_SORTED_SET = """
redis.call('DEL', KEYS[1])
if #ARGV > 0 then
  redis.call('ZADD', KEYS[1], unpack(ARGV))
end
return 1
"""


@dataclass(frozen=True, slots=True)
class UserState:
    """What one user's storefront reads, as of the event ``event_id`` at ``event_ts`` ms."""

    user_id: str
    event_id: str
    event_ts: int
    profile: Mapping[str, str | int | float]
    recs: list[tuple[str, float]]  # (item_id, score), best first
    #: Extra fields of ``recs:{user_id}:meta`` (e.g. ``personalised``, ``strategy``).
    meta: Mapping[str, str | int | float] = field(default_factory=dict)


class RedisStore:
    """Async Redis access for the serving keys, under ``settings.redis_prefix`` (``bf:``)."""

    def __init__(self, settings: Settings, client: aioredis.Redis | None = None) -> None:
        self.prefix = settings.redis_prefix
        # The pipeline's ACL user (BORDERFLOW_REDIS_USERNAME/_PASSWORD; docs/security.md).
        self.client = client or aioredis.Redis.from_url(
            settings.redis_url,
            decode_responses=False,
            socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s,
            **settings.redis_credentials(),
        )
        self._write_user_state = self.client.register_script(_WRITE_USER_STATE)
        self._replace_sorted_set = self.client.register_script(_REPLACE_SORTED_SET)
        self._write_shipment = self.client.register_script(_WRITE_SHIPMENT)
        self._delete_user_shipments = self.client.register_script(_DELETE_USER_SHIPMENTS)

    # -- key names (the contract) -----------------------------------------------------------
    def recs_key(self, user_id: str) -> str:
        return f"{self.prefix}recs:{user_id}"

    def recs_meta_key(self, user_id: str) -> str:
        return f"{self.prefix}recs:{user_id}:meta"

    def profile_key(self, user_id: str) -> str:
        return f"{self.prefix}profile:{user_id}"

    def shipment_key(self, order_id: str) -> str:
        return f"{self.prefix}shipment:{order_id}"

    def item_list_key(self, kind: str, key: str) -> str:
        """``fbt:{item_id}`` or ``popular:{country|global}``."""
        return f"{self.prefix}{kind}:{key}"

    def stats_key(self, worker: str | None = None) -> str:
        """Events processed per topic: all workers, or one (``host:pid``)."""
        suffix = f":{worker}" if worker else ""
        return f"{self.prefix}stats:processed{suffix}"

    # -- writes ---------------------------------------------------------------------------------
    async def write_user_states(
        self, states: Iterable[UserState], *, updated_at_ms: int, processed: Mapping[str, int]
    ) -> list[int]:
        """Write every user's state in one pipeline; returns 1 (written) / 0 (older, skipped).

        ``processed`` adds per-topic event counts to the ``stats:processed`` hash in the same
        round trip (operators and the bench read it).
        """
        pipe = self.client.pipeline(transaction=False)
        n_states = await self._queue_user_states(pipe, states, updated_at_ms)
        self._count_processed(pipe, processed)
        results = await pipe.execute()
        return [int(r) for r in results[:n_states]]

    async def write_item_lists(
        self, lists: Mapping[str, list[tuple[str, float]]], *, kind: str = "fbt"
    ) -> None:
        """Replace ``{prefix}{kind}:{key}`` sorted sets (item -> score), one round trip
        (``fbt:{item_id}``, ``popular:{country}``)."""
        if not lists:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, ranked in lists.items():
            await self._queue_item_list(pipe, kind, key, ranked)
        await pipe.execute()

    async def write_shipments(
        self, shipments: Iterable[Mapping[str, str | int | float]], *, ttl_s: int = 0
    ) -> list[int]:
        """Write ``shipment:{order_id}`` hashes (each mapping holds ``order_id`` and
        ``last_scan_ts``) in one pipeline; 1 written, 0 refused (a later scan is stored)."""
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for fields in shipments:
            await self._queue_shipment(pipe, fields, ttl_s)
            n += 1
        if not n:
            return []
        return [int(r) for r in await pipe.execute()]

    async def write_serving_batch(self, batch: PendingWrites, *, updated_at_ms: int) -> None:
        """Everything a micro-batch (or, after an outage, many) queued for storefronts, in one
        pipeline (``sinks/redis_writes.py``): user states, item lists, shipment views, alerts,
        processed counters and latency samples (produce -> now)."""
        pipe = self.client.pipeline(transaction=False)
        await self._queue_user_states(pipe, batch.user_states.values(), updated_at_ms)
        for (kind, key), ranked in batch.item_lists.items():
            await self._queue_item_list(pipe, kind, key, ranked)
        for fields, ttl_s in batch.shipments.values():
            await self._queue_shipment(pipe, fields, ttl_s)
        self._queue_alerts(pipe, batch.alerts)
        self._count_processed(pipe, batch.processed)
        for stage, produced in batch.latency_origins.items():
            self._queue_latencies(pipe, stage, [updated_at_ms - ts for ts in produced])
        await pipe.execute()

    async def _queue_user_states(
        self, pipe: Any, states: Iterable[UserState], updated_at_ms: int
    ) -> int:
        n_states = 0
        for state in states:
            args: list[Any] = [
                state.event_ts,
                state.event_id,
                updated_at_ms,
                len(state.profile),
                len(state.meta),
            ]
            for mapping in (state.profile, state.meta):
                for field_name, value in mapping.items():
                    args.append(field_name)
                    args.append(value)
            for item_id, score in state.recs:
                args.append(score)
                args.append(item_id)
            keys = [
                self.profile_key(state.user_id),
                self.recs_key(state.user_id),
                self.recs_meta_key(state.user_id),
            ]
            await self._write_user_state(keys=keys, args=args, client=pipe)
            n_states += 1
        return n_states

    async def _queue_item_list(
        self, pipe: Any, kind: str, key: str, ranked: list[tuple[str, float]]
    ) -> None:
        args: list[Any] = []
        for partner, score in ranked:
            args.append(score)
            args.append(partner)
        await self._replace_sorted_set(keys=[self.item_list_key(kind, key)], args=args, client=pipe)

    async def _queue_shipment(
        self, pipe: Any, fields: Mapping[str, str | int | float], ttl_s: int
    ) -> None:
        args: list[Any] = [fields["last_scan_ts"], ttl_s]
        for name, value in fields.items():
            args.append(name)
            args.append(value)
        key = self.shipment_key(str(fields["order_id"]))
        await self._write_shipment(keys=[key], args=args, client=pipe)

    async def read_shipment(self, order_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(self.shipment_key(order_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def count_processed(self, processed: Mapping[str, int]) -> None:
        if not any(processed.values()):
            return
        pipe = self.client.pipeline(transaction=False)
        self._count_processed(pipe, processed)
        await pipe.execute()

    def _count_processed(self, pipe: Any, processed: Mapping[str, int]) -> None:
        for topic, count in processed.items():
            if count:
                pipe.hincrby(self.stats_key(), topic, count)
                pipe.hincrby(self.stats_key(WORKER_ID), topic, count)

    # -- fraud alerts stream and model checkpoints ------------------------------------------------
    def alerts_key(self) -> str:
        return f"{self.prefix}alerts"

    async def publish_alerts(self, alerts: Iterable[bytes]) -> None:
        """Append alert JSON documents to the capped stream ``bf:alerts`` (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        if self._queue_alerts(pipe, alerts):
            await pipe.execute()

    def _queue_alerts(self, pipe: Any, alerts: Iterable[bytes]) -> int:
        n = 0
        for alert in alerts:
            pipe.xadd(self.alerts_key(), {"alert": alert}, maxlen=ALERTS_MAX_LEN, approximate=True)
            n += 1
        return n

    async def read_alerts(
        self, last_id: str = "0-0", count: int = 100, block_ms: int | None = None
    ) -> list[tuple[str, bytes]]:
        """Alerts after ``last_id`` (``$`` for only new ones), as (stream id, alert JSON)."""
        response: Any = await self.client.xread(
            {self.alerts_key(): last_id}, count=count, block=block_ms
        )
        out: list[tuple[str, bytes]] = []
        for _, entries in response or []:
            for entry_id, fields in entries:
                out.append((_text(entry_id), fields[b"alert"]))
        return out

    def checkpoint_key(self, app_id: str, partition: int) -> str:
        return f"{self.prefix}fraud:checkpoint:{app_id}:{partition}"

    async def save_checkpoint(
        self, app_id: str, partition: int, blob: bytes, meta: Mapping[str, str | int | float]
    ) -> None:
        mapping: Any = {"blob": blob, **meta}
        await self.client.hset(self.checkpoint_key(app_id, partition), mapping=mapping)

    async def load_checkpoint(self, app_id: str, partition: int) -> bytes | None:
        blob: Any = await self.client.hget(self.checkpoint_key(app_id, partition), "blob")
        return bytes(blob) if blob is not None else None

    def serving_checkpoint_key(self, app_id: str) -> str:
        return f"{self.prefix}serving:checkpoint:{app_id}"

    async def save_serving_checkpoint(
        self, app_id: str, blob: bytes, meta: Mapping[str, str | int | float]
    ) -> None:
        mapping: Any = {"blob": blob, **meta}
        await self.client.hset(self.serving_checkpoint_key(app_id), mapping=mapping)

    async def load_serving_checkpoint(self, app_id: str) -> bytes | None:
        blob: Any = await self.client.hget(self.serving_checkpoint_key(app_id), "blob")
        return bytes(blob) if blob is not None else None

    def latency_key(self, stage: str) -> str:
        return f"{self.prefix}stats:latency_ms:{stage}"

    async def record_latencies(
        self, stage: str, samples_ms: list[float], cap: int = 200_000
    ) -> None:
        """Append produce-to-visible latency samples (a capped list; the bench reads it)."""
        if not samples_ms:
            return
        pipe = self.client.pipeline(transaction=False)
        self._queue_latencies(pipe, stage, samples_ms, cap)
        await pipe.execute()

    def _queue_latencies(
        self, pipe: Any, stage: str, samples_ms: list[float], cap: int = 200_000
    ) -> None:
        if samples_ms:
            pipe.rpush(self.latency_key(stage), *[round(v, 3) for v in samples_ms])
            pipe.ltrim(self.latency_key(stage), -cap, -1)

    async def read_latencies(self, stage: str) -> list[float]:
        return [float(v) for v in await self.client.lrange(self.latency_key(stage), 0, -1)]

    async def processed_counts(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.stats_key())
        return {_text(k): int(v) for k, v in raw.items()}

    # -- personal data (borderflow forget; docs/privacy.md) --------------------------------------
    def privacy_key(self, request_id: str) -> str:
        """The receipt of one forget request (a hash, expires)."""
        return f"{self.prefix}privacy:{request_id}"

    async def forget_user(self, user_id: str, order_ids: Iterable[str] = ()) -> dict[str, int]:
        """Delete a user's serving keys (profile, recs, recs meta) and the shipment hashes of
        ``order_ids`` that belong to the user, in one round trip; counts of keys deleted."""
        orders = sorted(set(order_ids))
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.profile_key(user_id))
        pipe.delete(self.recs_key(user_id))
        pipe.delete(self.recs_meta_key(user_id))
        if orders:
            keys = [self.shipment_key(order_id) for order_id in orders]
            await self._delete_user_shipments(keys=keys, args=[user_id], client=pipe)
        results = await pipe.execute()
        return {
            "profile": int(results[0]),
            "recs": int(results[1]) + int(results[2]),
            "shipments": int(results[3]) if orders else 0,
        }

    async def forget_alerts(self, user_id: str) -> int:
        """Delete the entries of the ``alerts`` stream that name the user; how many went.

        The stream is capped (about 100,000 entries), so it is read through in chunks."""
        key = self.alerts_key()
        start = "-"
        removed = 0
        while True:
            entries: Any = await self.client.xrange(key, min=start, max="+", count=ALERT_SCAN_CHUNK)
            if not entries:
                return removed
            theirs = []
            for entry_id, fields in entries:
                try:
                    named = orjson.loads(fields.get(b"alert", b"{}")).get("user_id")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if named == user_id:
                    theirs.append(entry_id)
            if theirs:
                removed += int(await self.client.xdel(key, *theirs))
            if len(entries) < ALERT_SCAN_CHUNK:
                return removed
            start = _next_stream_id(_text(entries[-1][0]))

    async def save_privacy_receipt(
        self, request_id: str, fields: Mapping[str, str | int | float], ttl_s: int
    ) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.privacy_key(request_id))
        mapping: Any = dict(fields)
        pipe.hset(self.privacy_key(request_id), mapping=mapping)
        if ttl_s > 0:
            pipe.expire(self.privacy_key(request_id), ttl_s)
        await pipe.execute()

    async def read_privacy_receipt(self, request_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(self.privacy_key(request_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    # -- reads (the storefront's view; also used by tests and the demo) -------------------------
    async def read_recs(self, user_id: str, n: int = 20) -> list[tuple[str, float]]:
        rows: Any = await self.client.zrevrange(self.recs_key(user_id), 0, n - 1, withscores=True)
        return [(_text(item), float(score)) for item, score in rows]

    async def read_meta(self, user_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(self.recs_meta_key(user_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def read_profile(self, user_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(self.profile_key(user_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def aclose(self) -> None:
        await self.client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _next_stream_id(entry_id: str) -> str:
    """The smallest stream id after ``entry_id`` (``ms-seq``)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
