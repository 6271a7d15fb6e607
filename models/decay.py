"""Exponentially decayed counters in event time.

A decayed counter answers "how much happened recently" with O(1) memory: every observation
adds its weight, and the total halves every ``half_life`` of *event* time. Replaying the same
events at any speed gives the same values, because only event timestamps are used.

>>> c = DecayedSum.empty()
>>> c = c.add(1.0, ts_ms=0, half_life_ms=1000).add(1.0, ts_ms=1000, half_life_ms=1000)
>>> round(c.value_at(1000, half_life_ms=1000), 3)
1.5
"""

from __future__ import annotations

import math
from typing import NamedTuple


class DecayedSum(NamedTuple):
    value: float
    ts_ms: int

    @classmethod
    def empty(cls) -> DecayedSum:
        return cls(0.0, 0)

    def value_at(self, ts_ms: int, half_life_ms: float) -> float:
        """The decayed total as seen at ``ts_ms`` (an older ``ts_ms`` sees no decay)."""
        age = ts_ms - self.ts_ms
        if age <= 0 or self.value == 0.0:
            return self.value
        return self.value * math.exp2(-age / half_life_ms)

    def add(self, weight: float, ts_ms: int, half_life_ms: float) -> DecayedSum:
        """Add ``weight`` at ``ts_ms``; an out-of-order event is decayed to the stored time."""
        if ts_ms >= self.ts_ms:
            return DecayedSum(self.value_at(ts_ms, half_life_ms) + weight, ts_ms)
        return DecayedSum(
            self.value + weight * math.exp2(-(self.ts_ms - ts_ms) / half_life_ms), self.ts_ms
        )


class GrowingWeight:
    """Time decay for large score tables without touching every entry.

    Instead of shrinking all old scores, new increments grow as ``2 ** ((t - t0) / half_life)``;
    ranking by the stored sums is then the same as ranking by decayed sums. When the weight
    would get large, the owner rebases: it multiplies every stored score by the factor
    ``rebase`` returns (which may underflow to 0.0 after a jump of centuries) and goes on.
    """

    #: log2 of the largest weight handed out before a rebase (2**40 ~ 1e12).
    MAX_EXPONENT = 40.0

    def __init__(self, half_life_ms: float) -> None:
        self.half_life_ms = half_life_ms
        self.origin_ms: int | None = None

    def _exponent(self, ts_ms: int) -> float:
        if self.origin_ms is None:
            self.origin_ms = ts_ms
        return (ts_ms - self.origin_ms) / self.half_life_ms

    def weight(self, ts_ms: int) -> float:
        """Weight of an observation at ``ts_ms``; call ``needs_rebase`` first."""
        return math.exp2(min(self._exponent(ts_ms), 1000.0))

    def needs_rebase(self, ts_ms: int) -> bool:
        return self._exponent(ts_ms) > self.MAX_EXPONENT

    def rebase(self, ts_ms: int) -> float:
        """Move the origin to ``ts_ms``; returns the factor to multiply stored scores by."""
        exponent = self._exponent(ts_ms)
        self.origin_ms = ts_ms
        return math.exp2(-exponent) if exponent < 1000 else 0.0
