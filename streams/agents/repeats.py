"""Repeated events: a *replay* gets its rows rebuilt, a *duplicate* gets nothing.

Every agent's state remembers the events it applied (profiles their recent click ids, fraud
engines their payments' snapshots and the label events received, shipment books their scans),
and with each the Kafka position (partition, offset) it was *first* applied at. An event id
that comes again is then one of:

* a **replay**: the same message read again, at the position it was first applied at. That
  happens after a crash: the state change survived (Faust changelog, engine checkpoint) but
  the rows may not have reached ClickHouse, so they are rebuilt from the event and from what
  the state remembers; the written positions (``streams/facts.py``) drop them if ClickHouse
  has them. A position the state does not know (state stored before positions were kept) is
  treated as a replay too: what every repeat got before.
* a **duplicate**: the same event id at another position (a producer retry, a tracker sending
  it again), or a second time in one batch. Its rows were written with the first copy: it
  writes no fact row and no Redis state, and is counted (:func:`duplicates`), since the
  rollups (materialized views) would count every row again.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.runtime import Runtime

#: A Kafka position: (partition, offset).
Position = tuple[int, int]


class Repeat(enum.Enum):
    NEW = "new"
    REPLAY = "replay"
    DUPLICATE = "duplicate"


def duplicates(runtime: Runtime) -> Counter[str]:
    """Duplicate events dropped by this runtime's agents, per input topic (contract name)."""
    return runtime.duplicates


class Repeats:
    """Classifies one batch's events of one topic (see the module docstring)."""

    def __init__(self, runtime: Runtime, topic: str) -> None:
        self.topic = topic
        self.counter = duplicates(runtime)
        self._in_batch: set[str] = set()
        self.duplicates = 0

    def classify(
        self, event_id: str, position: Position, *, seen: bool, first: Position | None
    ) -> Repeat:
        """``seen``: the state held the event before this copy; ``first``: the position it
        was first applied at (None when unknown)."""
        in_batch = event_id in self._in_batch
        self._in_batch.add(event_id)
        if not seen and not in_batch:
            return Repeat.NEW
        if not in_batch and (first is None or first == position):
            return Repeat.REPLAY
        self.duplicates += 1
        self.counter[self.topic] += 1
        return Repeat.DUPLICATE
