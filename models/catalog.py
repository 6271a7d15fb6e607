"""What the pipeline has learned about items from clicks: category, origin country, price.

Bounded (least recently clicked items are forgotten beyond ``capacity``) and fed only from
the ``clicks`` topic, so it is rebuilt by replay and needs no separate feed.

>>> catalog = ItemCatalog(capacity=2)
>>> catalog.observe("i1", category="shoes", origin_country="IT", price_usd=80.0)
>>> catalog.observe("i2", category=None, origin_country=None, price_usd=None)
>>> catalog.observe("i3", category="bags", origin_country="CN", price_usd=20.0)
>>> catalog.origin("i1"), catalog.category("i3"), len(catalog)
(None, 'bags', 2)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple


class ItemFacts(NamedTuple):
    category: str | None
    origin_country: str | None
    price_usd: float | None


class ItemCatalog:
    def __init__(self, capacity: int = 500_000) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, ItemFacts] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def observe(
        self,
        item_id: str,
        *,
        category: str | None,
        origin_country: str | None,
        price_usd: float | None,
    ) -> None:
        """Record what a click says about ``item_id``; a missing value keeps the known one."""
        known = self.items.pop(item_id, None)
        if known is not None:
            category = category or known.category
            origin_country = origin_country or known.origin_country
            price_usd = price_usd if price_usd is not None else known.price_usd
        self.items[item_id] = ItemFacts(category, origin_country, price_usd)
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def category(self, item_id: str) -> str | None:
        facts = self.items.get(item_id)
        return facts.category if facts else None

    def origin(self, item_id: str) -> str | None:
        facts = self.items.get(item_id)
        return facts.origin_country if facts else None
