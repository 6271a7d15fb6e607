"""The storefront's read client for borderflow's Redis keys (docs/contracts.md, "Redis").

Synchronous (page renderers usually are), one round trip per call, and consistent: a user's
recommendations and their meta are read in one ``MULTI``/``EXEC``, and the worker writes
both in one Lua call, so the list always matches the event its meta names.

    from sinks.storefront_client import StorefrontClient

    shop = StorefrontClient("redis://127.0.0.1:16379/0")   # or with username=, password=
    recs = shop.recommendations("u42", n=10, country="DE")
    recs.item_ids          # ['i17', 'i3', ...] best first
    recs.basis             # 'session', 'profile', 'popular-country', 'popular-global'
    recs.event_ts          # event time (epoch ms) of the newest event they reflect
    shop.profile("u42")    # typed dict, or None for an unknown user
    shop.bought_together("i17", n=5)

The client only reads: give it Redis's read-only storefront user (docs/security.md), which
may read the ``bf:*`` keys and nothing else, and can write nothing.

A user without recommendations yet (never seen) gets the country's popular items, then the
global ones (``bf:popular:{country}``, ``bf:popular:global``), with ``basis`` saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

#: Profile fields holding JSON text in the hash.
_JSON_FIELDS = frozenset({"peak_hours", "top_categories"})
#: Profile fields that are text; every other field is a number.
_TEXT_FIELDS = frozenset(
    {"user_id", "country", "currency", "lang", "device", "segment", "price_band"}
)
GLOBAL_POPULAR = "global"


@dataclass(frozen=True, slots=True)
class Recommendations:
    user_id: str
    items: list[tuple[str, float]]  # (item_id, score), best first
    basis: str  # session | profile | popular-country | popular-global | none
    personalised: bool
    #: The newest event the list reflects (None for a fallback list).
    event_id: str | None = None
    event_ts: int | None = None
    #: Wall-clock time (epoch ms) the worker wrote it: operators' freshness check.
    updated_at: int | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def item_ids(self) -> list[str]:
        return [item_id for item_id, _ in self.items]


class StorefrontClient:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:16379/0",
        *,
        prefix: str = "bf:",
        username: str | None = None,
        password: str | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.prefix = prefix
        self.client = client or redis.Redis.from_url(url, username=username, password=password)

    @classmethod
    def from_settings(cls, settings: Any) -> StorefrontClient:
        """From borderflow's :class:`schemas.config.Settings` (the same environment), as the
        read-only storefront user when one is set (``BORDERFLOW_STOREFRONT_REDIS_USERNAME`` /
        ``_PASSWORD``), else with the pipeline's credentials."""
        credentials = settings.storefront_redis_credentials()
        return cls(settings.redis_url, prefix=settings.redis_prefix, **credentials)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> StorefrontClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------------
    def recommendations(
        self, user_id: str, n: int = 20, *, country: str | None = None
    ) -> Recommendations:
        """The user's top ``n``; for an unknown user, ``country``'s popular items, then the
        global ones (``basis`` says which; ``items`` is empty only when nothing is known)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrevrange(f"{self.prefix}recs:{user_id}", 0, n - 1, withscores=True)
        pipe.hgetall(f"{self.prefix}recs:{user_id}:meta")
        if country:
            pipe.zrevrange(f"{self.prefix}popular:{country}", 0, n - 1, withscores=True)
        pipe.zrevrange(f"{self.prefix}popular:{GLOBAL_POPULAR}", 0, n - 1, withscores=True)
        results = pipe.execute()
        rows, raw_meta = results[0], results[1]
        meta = {_text(k): _text(v) for k, v in raw_meta.items()}
        if rows:
            return Recommendations(
                user_id=user_id,
                items=_pairs(rows),
                basis=meta.get("basis", "session"),
                personalised=meta.get("personalised", "1") == "1",
                event_id=meta.get("last_event_id"),
                event_ts=_int(meta.get("last_event_ts")),
                updated_at=_int(meta.get("updated_at")),
                meta=meta,
            )
        country_rows = results[2] if country else []
        if country_rows:
            return Recommendations(user_id, _pairs(country_rows), "popular-country", False)
        global_rows = results[-1]
        basis = "popular-global" if global_rows else "none"
        return Recommendations(user_id, _pairs(global_rows), basis, False)

    def profile(self, user_id: str) -> dict[str, Any] | None:
        """The ``bf:profile:{user_id}`` hash with typed values (numbers, lists; None for an
        unknown value such as the delivery days of a user without deliveries)."""
        raw = self.client.hgetall(f"{self.prefix}profile:{user_id}")
        if not raw:
            return None
        return {_text(k): _typed(_text(k), _text(v)) for k, v in raw.items()}

    def bought_together(self, item_id: str, n: int = 10) -> list[tuple[str, float]]:
        """Items bought in the same session as ``item_id``, with P(item | ``item_id``)."""
        rows = self.client.zrevrange(f"{self.prefix}fbt:{item_id}", 0, n - 1, withscores=True)
        return _pairs(rows)

    def popular(self, country: str | None = None, n: int = 20) -> list[tuple[str, float]]:
        """Trending items of ``country`` (decayed popularity), or global ones."""
        key = f"{self.prefix}popular:{country or GLOBAL_POPULAR}"
        return _pairs(self.client.zrevrange(key, 0, n - 1, withscores=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(rows: Any) -> list[tuple[str, float]]:
    return [(_text(item), float(score)) for item, score in rows]


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _typed(name: str, value: str) -> Any:
    if name in _JSON_FIELDS:
        return orjson.loads(value) if value else []
    if name in _TEXT_FIELDS:
        return value
    if value == "":
        return None
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number
