"""Frequently bought together: items bought in the same session, per item, in event time.

Every purchase pairs the item with the items the user already bought in the same session
(``models.profile.UserProfile.session_purchases``); pair counts decay with a 30-day
half-life (:class:`models.decay.GrowingWeight`), so seasonal bundles fade. The list for an
item ranks partners by the decayed estimate of P(partner bought | item bought in a basket).

>>> fbt = FrequentlyBoughtTogether()
>>> fbt.observe_purchase(["phone"], "case", ts_ms=0)
>>> fbt.observe_purchase(["phone"], "charger", ts_ms=0)
>>> fbt.observe_purchase(["phone", "charger"], "case", ts_ms=0)
>>> [item for item, _ in fbt.top("phone")], sorted(fbt.drain_changed())
(['case', 'charger'], ['case', 'charger', 'phone'])
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from models.decay import GrowingWeight

FBT_HALF_LIFE_MS = 30 * 86_400_000


class FrequentlyBoughtTogether:
    def __init__(
        self, *, half_life_ms: float = FBT_HALF_LIFE_MS, partners_per_item: int = 100
    ) -> None:
        self.partners_per_item = partners_per_item
        self._weight = GrowingWeight(half_life_ms)
        #: item -> partner -> decayed number of baskets holding both.
        self.pairs: dict[str, dict[str, float]] = {}
        #: item -> decayed number of baskets holding it with at least one other item.
        self.baskets: dict[str, float] = {}
        self._changed: set[str] = set()

    def observe_purchase(self, basket: Sequence[str], item_id: str, *, ts_ms: int) -> None:
        """``item_id`` was bought after the session's earlier purchases ``basket``.

        Buying an item already in the basket again adds nothing (a basket holds an item once).
        """
        if item_id in basket:
            return
        partners = sorted(set(basket))
        if not partners:
            return
        if self._weight.needs_rebase(ts_ms):
            factor = self._weight.rebase(ts_ms)
            for row in self.pairs.values():
                for key in row:
                    row[key] *= factor
            for key in self.baskets:
                self.baskets[key] *= factor
        weight = self._weight.weight(ts_ms)
        for other in partners:
            self._bump(item_id, other, weight)
            self._bump(other, item_id, weight)
        # Baskets are counted once they hold two items: this one now, and the session's first
        # item when this is its first partner (the later items were counted when bought).
        opened = [item_id, partners[0]] if len(partners) == 1 else [item_id]
        for item in opened:
            self.baskets[item] = self.baskets.get(item, 0.0) + weight
        self._changed.add(item_id)
        self._changed.update(partners)

    def _bump(self, source: str, target: str, amount: float) -> None:
        row = self.pairs.setdefault(source, {})
        row[target] = row.get(target, 0.0) + amount
        if len(row) > 2 * self.partners_per_item:
            self.pairs[source] = dict(
                heapq.nlargest(self.partners_per_item, row.items(), key=lambda kv: kv[1])
            )

    def top(self, item_id: str, n: int = 20) -> list[tuple[str, float]]:
        """Partners of ``item_id``, best first, with P(partner | item) estimates."""
        row = self.pairs.get(item_id)
        if not row:
            return []
        best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:n]  # ties: by item id
        total = max(self.baskets.get(item_id, 0.0), best[0][1])  # guards float rounding
        return [(partner, float(f"{min(1.0, value / total):.6g}")) for partner, value in best]

    def drain_changed(self) -> set[str]:
        """Items whose lists changed since the last call (to write to Redis)."""
        changed, self._changed = self._changed, set()
        return changed
