"""Keyed pseudonyms for the personal identifiers that reach ClickHouse.

Analysts need to count and join by user ("how many buyers", "repeat customers") but have no
business knowing who a user is, and ClickHouse is the store the most people can read. So the
ClickHouse writer replaces every personal identifier column (``PERSONAL_COLUMNS`` in
``sinks/clickhouse.py``) with a keyed BLAKE2b hash before the insert:

- *keyed*, so someone holding the table but not ``BORDERFLOW_PSEUDONYM_KEY`` cannot confirm a
  guess by hashing a known user id (a plain hash of an e-mail-like id is a lookup away);
- *deterministic*, so counts, distinct users and joins across tables stay exact;
- *domain-separated* (``person``), so a user id and a card id with the same text do not get the
  same pseudonym and cannot be linked through it.

Redis and Kafka keep the real ids: the storefront reads recommendations by user id and risk
teams need the real card on an alert. ``borderflow pseudonym USER_ID`` prints a user's
pseudonym for support staff who hold the key (and ``borderflow forget`` uses it).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Literal

from schemas.config import Settings

#: What an identifier is; each kind hashes in its own domain.
IdKind = Literal["user", "card"]

#: 16 bytes = 32 hex characters: collisions are out of reach for any realistic user count.
DIGEST_BYTES = 16


class Pseudonymiser:
    """Maps identifiers to stable keyed pseudonyms (hex strings); caches recent ones."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("the pseudonym key must not be empty")
        # BLAKE2b takes keys up to 64 bytes; a longer secret is first reduced to 64.
        self._key = key if len(key) <= 64 else hashlib.blake2b(key).digest()
        # The hot path sees the same active users batch after batch: a cache saves the hash.
        self.pseudonym = lru_cache(maxsize=200_000)(self._pseudonym)

    @classmethod
    def from_settings(cls, settings: Settings) -> Pseudonymiser:
        return cls(settings.pseudonym_key.get_secret_value().encode())

    def _pseudonym(self, value: str, kind: IdKind = "user") -> str:
        if not value:
            return ""  # "no id" stays visibly empty rather than hashing to a fake id
        return hashlib.blake2b(
            value.encode(), key=self._key, digest_size=DIGEST_BYTES, person=kind.encode()
        ).hexdigest()
