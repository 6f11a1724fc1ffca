"""What the tiers that bound themselves (memory, disk) share: an LRU index of chunk sizes with
pins, holds and a byte bound, and the pin / unpin / clear / stats built on it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable

from lmcache_pd.cache.holds import Holds
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Tier, TierStats


class LruIndex:
    """Chunk sizes, least recently used first. Not thread-safe: the tier holds its lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.bytes = 0
        self.pinned: set[ChunkKey] = set()
        self.holds: Holds | None = None
        """Chunks a pending load will read (cache/holds.py): not evicted either."""
        self._sizes: OrderedDict[ChunkKey, int] = OrderedDict()

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def touch(self, key: ChunkKey) -> bool:
        """Mark as most recently used; False if absent."""
        if key not in self._sizes:
            return False
        self._sizes.move_to_end(key)
        return True

    def add(self, key: ChunkKey, size: int) -> None:
        """Index a chunk (most recently used); make room first."""
        self._sizes[key] = size
        self.bytes += size

    def size(self, key: ChunkKey) -> int | None:
        return self._sizes.get(key)

    def pop(self, key: ChunkKey) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.bytes -= size
        return size

    def make_room(self, size: int, *, busy: Collection[ChunkKey] = ()) -> list[ChunkKey] | None:
        """Take least recently used chunks (not pinned, held or ``busy``) out of the index until
        ``size`` more bytes fit; None, and nothing taken, if they cannot."""
        victims, freed = [], 0
        held = self.holds.held() if self.holds is not None and self.bytes + size > self.capacity else ()
        for k, s in self._sizes.items():
            if self.bytes - freed + size <= self.capacity:
                break
            if k not in self.pinned and k not in busy and k not in held:
                victims.append(k)
                freed += s
        if self.bytes - freed + size > self.capacity:
            return None
        for k in victims:
            self.pop(k)
        return victims

    def keys(self, tenant: str | None = None) -> list[ChunkKey]:
        return [k for k in self._sizes if tenant is None or k.tenant == tenant]


class BoundedTier(Tier):
    """A tier that evicts by itself: subclasses keep ``_index`` under ``_lock`` and implement
    ``delete`` (which must also drop pins)."""

    def __init__(self, options, *, instance: str, rank: int, capacity: int):
        super().__init__(options, instance=instance, rank=rank)
        self._lock = threading.Lock()
        self._index = LruIndex(capacity)

    @property
    def capacity(self) -> int:
        return self._index.capacity

    def clear(self, tenant: str | None = None) -> int:
        with self._lock:
            doomed = self._index.keys(tenant)
        return self.delete(doomed)

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        with self._lock:
            self._index.pinned.update(keys)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        with self._lock:
            self._index.pinned.difference_update(keys)

    def attach_holds(self, holds: Holds) -> None:
        with self._lock:
            self._index.holds = holds

    def stats(self) -> TierStats:
        s = super().stats()
        with self._lock:
            s.entries, s.bytes = len(self._index), self._index.bytes
        s.capacity_bytes = self._index.capacity
        return s
