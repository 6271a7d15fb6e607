"""Delivery lanes: how many days shipments take from an origin country to a destination.

Learned online from completed deliveries (the logistics agent's ``DeliveredRecord``), with
exponential decay in *event time* (half-life 30 days) so a carrier that got slower shows up
within weeks. The recommender's logistics-aware re-ranking (``models.rerank``) asks it for the
expected delivery days of an item shipping from its origin to the user's country.

>>> lanes = DeliveryLanes(min_weight=1.0)
>>> for days in (2.0, 4.0):
...     lanes.observe("DE", "FR", days, ts_ms=0)
>>> lanes.expected_days("DE", "FR"), lanes.expected_days("CN", "FR")
(3.0, 3.0)
>>> lanes.expected_days("CN", "US") is None
True
"""

from __future__ import annotations

from models.decay import DecayedSum

#: Lanes forget half their history every 30 days of event time.
LANE_HALF_LIFE_MS = 30 * 86_400_000


class DeliveryLanes:
    """Decayed mean delivery days per (origin, destination) lane.

    An unknown or thin lane (decayed weight below ``min_weight``) falls back to the mean of
    all lanes into the destination, then None (no opinion).
    """

    def __init__(self, *, half_life_ms: float = LANE_HALF_LIFE_MS, min_weight: float = 3.0) -> None:
        self.half_life_ms = half_life_ms
        self.min_weight = min_weight
        #: (origin, dest) -> (decayed sum of days, decayed count); both keyed "*" for dest means.
        self.lanes: dict[tuple[str, str], tuple[DecayedSum, DecayedSum]] = {}
        self.newest_ts = 0

    def observe(self, origin: str, dest: str, days: float, *, ts_ms: int) -> None:
        self.newest_ts = max(self.newest_ts, ts_ms)
        for key in ((origin, dest), ("*", dest)):
            total, count = self.lanes.get(key, (DecayedSum.empty(), DecayedSum.empty()))
            self.lanes[key] = (
                total.add(days, ts_ms, self.half_life_ms),
                count.add(1.0, ts_ms, self.half_life_ms),
            )

    def _mean(self, key: tuple[str, str]) -> float | None:
        stats = self.lanes.get(key)
        if stats is None:
            return None
        total, count = stats
        # Both sums decay alike, so their ratio needs no decay; the weight does.
        weight = count.value_at(self.newest_ts, self.half_life_ms)
        if weight < self.min_weight or count.value <= 0:
            return None
        return total.value / count.value

    def expected_days(self, origin: str | None, dest: str | None) -> float | None:
        """Expected delivery days from ``origin`` to ``dest``, or None when unknown."""
        if not dest:
            return None
        if origin:
            lane = self._mean((origin, dest))
            if lane is not None:
                return lane
        return self._mean(("*", dest))

    def table(self) -> list[tuple[str, str, float, float]]:
        """(origin, dest, mean days, decayed deliveries) per known lane, for docs and demos."""
        rows = []
        for (origin, dest), (total, count) in sorted(self.lanes.items()):
            if origin != "*" and count.value > 0:
                weight = count.value_at(self.newest_ts, self.half_life_ms)
                rows.append((origin, dest, total.value / count.value, weight))
        return rows
