"""Holds: chunks a lookup found and a coming load will read, kept from eviction meanwhile (L4).

A lookup answers "the first N chunks are cached"; the load that reads them comes later (the
next engine step on the prefill side; after the prompt's transfer on the decode side). A hold
keeps those chunks from being evicted in between. Each hold has an owner (a request or a
transfer id) and a lease: the load releases it, and a hold whose load never comes (request
aborted, hand-off failed) ends by itself when its lease runs out, so nothing stays held.
Holds differ from pins: pins are the operator's (control API) and last until unpinned.
Only the tiers that evict by themselves (memory, disk) honour holds; a remote server evicts
on its own terms, and a chunk gone from it makes the load fail and vLLM recompute.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from lmcache_pd.cache.keys import ChunkKey


class Holds:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._owners: dict[str, tuple[float, tuple[ChunkKey, ...]]] = {}
        self._count: collections.Counter[ChunkKey] = collections.Counter()

    def hold(self, owner: str, keys: Iterable[ChunkKey], lease_s: float) -> None:
        """Hold ``keys`` for ``owner`` until released or ``lease_s`` from now (replaces the
        owner's earlier hold)."""
        keys = tuple(keys)
        with self._lock:
            self._expire(self.clock())
            self._drop(owner)
            if keys:
                self._owners[owner] = (self.clock() + lease_s, keys)
                self._count.update(keys)

    def release(self, owner: str) -> None:
        with self._lock:
            self._drop(owner)

    def held(self) -> frozenset[ChunkKey]:
        """Every chunk some live hold covers (expired holds are dropped first)."""
        with self._lock:
            self._expire(self.clock())
            return frozenset(self._count)

    def owners(self) -> int:
        with self._lock:
            self._expire(self.clock())
            return len(self._owners)

    def _drop(self, owner: str) -> None:
        entry = self._owners.pop(owner, None)
        if entry is not None:
            self._count.subtract(entry[1])
            for k in entry[1]:
                if self._count[k] <= 0:
                    del self._count[k]

    def _expire(self, now: float) -> None:
        for owner in [o for o, (until, _) in self._owners.items() if until <= now]:
            self._drop(owner)
