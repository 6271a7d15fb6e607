"""Versioned, compressed pickle images of online models (fraud engines, serving models,
the logistics engine): one format for every checkpoint the workers keep in Redis.

An image is two bytes of format version, then the zlib-compressed pickle. Pickling must
happen where nothing mutates the object (the worker's event loop); compressing can happen
elsewhere (``asyncio.to_thread``), hence the two steps.
"""

from __future__ import annotations

import pickle
import zlib
from typing import ClassVar, Self


class Checkpointable:
    #: Bump when the pickled layout changes: an old image is then refused, not misread.
    CHECKPOINT_FORMAT: ClassVar[int] = 1

    def to_checkpoint(self) -> bytes:
        return self.compress_checkpoint(self.pickle())

    def pickle(self) -> bytes:
        """A consistent image: call it where nothing else mutates the object."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def compress_checkpoint(cls, pickled: bytes) -> bytes:
        return cls.CHECKPOINT_FORMAT.to_bytes(2, "big") + zlib.compress(pickled, 1)

    @classmethod
    def from_checkpoint(cls, blob: bytes) -> Self:
        version = int.from_bytes(blob[:2], "big")
        if version != cls.CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {version} is not {cls.CHECKPOINT_FORMAT}")
        # Checkpoints are written by borderflow workers into the project's own Redis.
        restored = pickle.loads(zlib.decompress(blob[2:]))  # noqa: S301
        if not isinstance(restored, cls):
            raise ValueError(f"checkpoint does not hold a {cls.__name__}")
        return restored


class CheckpointPacer:
    """Keeps the time spent pickling checkpoints below a share of the event loop's time.

    A checkpoint image is pickled on the event loop (where nothing mutates the model), so it
    stalls every agent for as long as it takes, and it grows with the model's state: River
    forests, label queues, the recommender's tables. A fixed interval then turns into an
    ever larger share of the worker's time (and into latency spikes). After a round that took
    ``spent`` seconds, the next one waits at least ``spent * (1 / max_share - 1)`` seconds,
    besides the configured interval.

    >>> pacer = CheckpointPacer(max_share=0.1)
    >>> pacer.due(now=100.0)
    True
    >>> pacer.spent(0.5, now=100.5)  # next round not before 100.5 + 0.5 * 9
    >>> pacer.due(now=104.0), pacer.due(now=105.0)
    (False, True)
    """

    def __init__(self, max_share: float) -> None:
        if not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], not {max_share}")
        self.max_share = max_share
        self._not_before = 0.0
        #: Seconds the last round took, and the rounds skipped to keep the share.
        self.last_spent_s = 0.0
        self.skipped = 0

    def due(self, now: float) -> bool:
        if now >= self._not_before:
            return True
        self.skipped += 1
        return False

    def spent(self, seconds: float, now: float) -> None:
        self.last_spent_s = seconds
        self._not_before = now + seconds * (1.0 / self.max_share - 1.0)
