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
