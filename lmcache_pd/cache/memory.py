"""Host-memory tier: least-recently-used, bounded in bytes, values kept as given (no copy).

On a GPU vLLM's own prefix cache is the device tier; this tier is the first one below it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from lmcache_pd.cache.bounded import BoundedTier
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer
from lmcache_pd.config import Positive


class MemoryOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    size_mib: Positive = 1024
    """Bytes of chunk data this tier holds at most (per worker); least recently used go first."""


class MemoryTier(BoundedTier):
    name = "memory"
    Options = MemoryOptions

    def __init__(self, options: MemoryOptions, *, instance: str, rank: int):
        super().__init__(options, instance=instance, rank=rank, capacity=options.size_mib << 20)
        self._values: dict[ChunkKey, Buffer] = {}

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def get(self, key: ChunkKey) -> Buffer | None:
        with self._lock:
            value = self._values.get(key)
            self._index.touch(key)
        if value is None:
            self._count(misses=1)
            return None
        self._count(hits=1, read_bytes=len(memoryview(value)))
        return value

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        size = len(memoryview(value))
        with self._lock:
            if self._index.touch(key):  # same key, same bytes (content-addressed)
                return True
            victims = self._index.make_room(size)
            if victims is None:  # larger than the tier, or everything left is pinned
                return False
            for k in victims:
                del self._values[k]
            self._index.add(key, size)
            self._values[key] = value
        self._count(written_bytes=size, evictions=len(victims))
        return True

    def delete(self, keys: Iterable[ChunkKey]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                self._index.pinned.discard(k)
                if self._index.pop(k) is not None:
                    del self._values[k]
                    n += 1
        return n
