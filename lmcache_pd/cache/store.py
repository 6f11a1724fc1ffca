"""The tiered prefix cache of one worker: an ordered list of tiers (fastest first).

  1. ``TieredCache(tiers, chunk_tokens=...)`` assigns fields; ``start()`` opens the tiers and
     starts the writer thread ``pd-cache-writer``;
  2. ``lookup(keys)``: how many leading chunks some tier holds, and which tier each is in;
     with ``hold=(owner, lease_s)`` those chunks are kept from eviction until ``release(owner)``
     or the lease ends (cache/holds.py), so that the load that follows finds them;
  3. ``get(key)`` reads down the tiers; a hit below the first tier is *promoted* (queued as a
     write to every tier above it);
  4. ``put(key, value)`` queues a write to every tier (or those named) and returns at once: the writer thread
     does the tier writes, so no caller (never vLLM's forward loop) waits on a disk or a
     network. The queue is bounded by ``write_queue_mib``; a write that does not fit is dropped
     and counted (the chunk is just not cached);
  5. ``pin`` / ``unpin`` / ``delete`` / ``clear`` apply to every tier;
  6. ``close()`` stops the writer (queued writes are dropped) and closes the tiers.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lmcache_pd.cache.holds import Holds
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer, Tier, TierStats
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lookup:
    hits: int
    """Number of leading chunks found (the prefix the cache can supply)."""
    tiers: tuple[int, ...]
    """For each of those chunks, the index of the first tier that holds it."""


@dataclass
class CacheStats:
    tiers: dict[str, TierStats]
    hit_tokens: dict[str, int] = field(default_factory=dict)
    """Per tier: prompt tokens that lookups found there (first tier holding the chunk)."""
    miss_tokens: dict[str, int] = field(default_factory=dict)
    """Per tier: prompt tokens that lookups asked of the tier and did not find there."""
    queued_bytes: int = 0
    dropped_writes: int = 0
    holds: int = 0
    """Lookups whose chunks are held for a pending load."""


class TieredCache:
    def __init__(self, tiers: Sequence[Tier], *, chunk_tokens: int, write_queue_bytes: int = 512 << 20):
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"a tier may appear once (got {names})")
        self.tiers = list(tiers)
        self.chunk_tokens = chunk_tokens
        self.write_queue_bytes = write_queue_bytes
        self._queue: collections.deque[tuple[ChunkKey, Buffer, tuple[int, ...]]] = collections.deque()
        self._cond = threading.Condition()
        self._queued = 0
        self._inflight: tuple[ChunkKey, Buffer, tuple[int, ...]] | None = None
        self._dropped = 0
        self._hit_tokens = dict.fromkeys(names, 0)
        self._miss_tokens = dict.fromkeys(names, 0)
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.holds = Holds()
        for t in self.tiers:
            t.attach_holds(self.holds)

    def start(self) -> None:
        for t in self.tiers:
            t.open()
        self._writer = thread(self._write_loop, "pd-cache-writer")
        self._writer.start()

    # --- reads ------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey], *, record: bool = True, hold: tuple[str, float] | None = None,
               local: bool = False) -> Lookup:
        """Longest prefix of ``keys`` held by the tiers together.

        ``record``: count it in the hit/miss statistics (an admission decision, not a repeated
        probe). ``hold=(owner, lease_s)``: keep the chunks found from eviction for the load that
        follows. ``local``: ask only the tiers on this host (not remote ones)."""
        if hold is not None:  # held before looking, so nothing found can be evicted in between
            self.holds.hold(hold[0], keys, hold[1])
        where: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not todo:
                break
            if local and tier.remote:
                continue
            found = tier.contains([keys[j] for j in todo])
            for j, hit in zip(todo, found):
                if hit:
                    where[j] = i
            todo = [j for j in todo if where[j] is None]
        hits = next((j for j, w in enumerate(where) if w is None), len(keys))
        tiers = tuple(w for w in where[:hits] if w is not None)
        if hold is not None:
            self.holds.hold(hold[0], keys[:hits], hold[1])
        if record:
            self._record(tiers, missed=hits < len(keys))
        return Lookup(hits, tiers)

    def _record(self, tiers: tuple[int, ...], *, missed: bool) -> None:
        # Reads go down the tiers: a chunk found in tier i missed in every tier above it; the
        # first chunk found nowhere missed in all of them (the lookup stops there).
        c = self.chunk_tokens
        with self._cond:
            for i in tiers:
                self._hit_tokens[self.tiers[i].name] += c
                for above in self.tiers[:i]:
                    self._miss_tokens[above.name] += c
            if missed:
                for t in self.tiers:
                    self._miss_tokens[t.name] += c

    def get(self, key: ChunkKey, start: int = 0) -> Buffer | None:
        """The chunk's bytes from the first tier (from ``start`` on) that has them, or None."""
        for i, tier in enumerate(self.tiers[start:], start):
            value = tier.get(key)
            if value is not None:
                if i:
                    self._enqueue(key, value, tuple(range(i)))
                return value
        return None

    def release(self, owner: str) -> None:
        """End ``owner``'s hold (its load is done, or will not come)."""
        self.holds.release(owner)

    # --- writes -----------------------------------------------------------------------------
    def missing(self, keys: Sequence[ChunkKey]) -> list[tuple[int, ...]]:
        """Per key, the indices of the tiers that do not hold it (one query per tier)."""
        out: list[list[int]] = [[] for _ in keys]
        for i, tier in enumerate(self.tiers):
            for j, have in enumerate(tier.contains(keys) if keys else ()):
                if not have:
                    out[j].append(i)
        return [tuple(x) for x in out]

    def put(self, key: ChunkKey, value: Buffer, tiers: Sequence[int] | None = None) -> bool:
        """Queue a write of a chunk to every tier (or to ``tiers``); False if it was dropped
        (queue full)."""
        return self._enqueue(key, value, tuple(range(len(self.tiers))) if tiers is None else tuple(tiers))

    def _enqueue(self, key: ChunkKey, value: Buffer, tiers: tuple[int, ...]) -> bool:
        size = len(memoryview(value))
        with self._cond:
            if self._stop.is_set() or self._queued + size > self.write_queue_bytes:
                self._dropped += 1
                return False
            self._queue.append((key, value, tiers))
            self._queued += size
            self._cond.notify_all()
        return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._inflight = None
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                key, value, tiers = self._inflight = self._queue.popleft()
            for i in tiers:
                try:
                    self.tiers[i].put(key, value)
                except Exception:  # noqa: BLE001 - a tier bug must not kill the writer
                    log.exception("cache tier %s failed to store a chunk", self.tiers[i].name)
            with self._cond:
                self._queued -= len(memoryview(value))

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write is done; False if ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._inflight is None, timeout=timeout_s)

    # --- management -------------------------------------------------------------------------
    def pin(self, keys: Iterable[ChunkKey]) -> None:
        keys = list(keys)
        for t in self.tiers:
            t.pin(keys)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        keys = list(keys)
        for t in self.tiers:
            t.unpin(keys)

    def delete(self, keys: Iterable[ChunkKey]) -> dict[str, int]:
        keys = list(keys)
        return {t.name: t.delete(keys) for t in self.tiers}

    def clear(self, tenant: str | None = None) -> dict[str, int]:
        """Remove every chunk (or one tenant tag's) from every tier, queued writes included."""
        with self._cond:
            kept: collections.deque[tuple[ChunkKey, Buffer, tuple[int, ...]]] = collections.deque()
            for w in self._queue:
                if tenant is None or w[0].tenant == tenant:
                    self._queued -= len(memoryview(w[1]))
                else:
                    kept.append(w)
            self._queue = kept
            # A write the writer already took would land after the clear: let it finish first
            # (each tier write is bounded: a disk write, or one command under its timeout).
            self._cond.wait_for(lambda: self._inflight is None or
                                (tenant is not None and self._inflight[0].tenant != tenant), timeout=30)
        return {t.name: t.clear(tenant) for t in self.tiers}

    def stats(self) -> CacheStats:
        with self._cond:
            return CacheStats({t.name: t.stats() for t in self.tiers}, dict(self._hit_tokens),
                              dict(self._miss_tokens), self._queued, self._dropped, self.holds.owners())

    def close(self) -> None:
        with self._cond:
            self._stop.set()
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=10)
        for t in self.tiers:
            t.close()
