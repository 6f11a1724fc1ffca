"""Host-memory tier: least-recently-used, bounded in bytes, values kept as given (no copy).

On a GPU vLLM's own prefix cache is the device tier; this tier is the first one below it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import msgspec

from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer, Tier, TierStats
from lmcache_pd.config import Positive


class MemoryOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    size_mib: Positive = 1024
    """Bytes of chunk data this tier holds at most (per worker); least recently used go first."""


class MemoryTier(Tier):
    name = "memory"
    Options = MemoryOptions

    def __init__(self, options: MemoryOptions, *, instance: str, rank: int):
        super().__init__(options, instance=instance, rank=rank)
        self.capacity = options.size_mib << 20
        self._lock = threading.Lock()
        self._lru: OrderedDict[ChunkKey, Buffer] = OrderedDict()  # oldest first
        self._pinned: set[ChunkKey] = set()
        self._bytes = 0

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._lru for k in keys]

    def get(self, key: ChunkKey) -> Buffer | None:
        with self._lock:
            value = self._lru.get(key)
            if value is not None:
                self._lru.move_to_end(key)
        if value is None:
            self._count(misses=1)
            return None
        self._count(hits=1, read_bytes=len(memoryview(value)))
        return value

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        size = len(memoryview(value))
        if size > self.capacity:
            return False
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self._bytes -= len(memoryview(old))
            evicted = self._make_room(size)
            if evicted is None:  # everything left is pinned
                if old is not None:
                    self._lru[key] = old
                    self._bytes += len(memoryview(old))
                return False
            self._lru[key] = value
            self._bytes += size
        self._count(written_bytes=size, evictions=evicted)
        return True

    def _make_room(self, size: int) -> int | None:
        """Evict least recently used unpinned chunks until ``size`` more bytes fit (lock held)."""
        if self._bytes + size <= self.capacity:
            return 0
        victims = []
        freed = 0
        for k, v in self._lru.items():
            if self._bytes - freed + size <= self.capacity:
                break
            if k not in self._pinned:
                victims.append(k)
                freed += len(memoryview(v))
        if self._bytes - freed + size > self.capacity:
            return None
        for k in victims:
            del self._lru[k]
        self._bytes -= freed
        return len(victims)

    def delete(self, keys: Iterable[ChunkKey]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                v = self._lru.pop(k, None)
                self._pinned.discard(k)
                if v is not None:
                    self._bytes -= len(memoryview(v))
                    n += 1
        return n

    def clear(self, tenant: str | None = None) -> int:
        with self._lock:
            doomed = [k for k in self._lru if tenant is None or k.tenant == tenant]
        return self.delete(doomed)

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        with self._lock:
            self._pinned.update(keys)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        with self._lock:
            self._pinned.difference_update(keys)

    def stats(self) -> TierStats:
        s = super().stats()
        with self._lock:
            s.entries, s.bytes = len(self._lru), self._bytes
        s.capacity_bytes = self.capacity
        return s
