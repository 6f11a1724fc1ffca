"""The node cache daemon's own tiers below its memory (L4; docs/cache_server.md): the disk and
Redis tiers of ``cache/``, unchanged, so what the daemon holds outlives it and reaches further.

- **Written through.** Every chunk an engine commits is copied, on this module's thread, from
  its slot (leased meanwhile, so it cannot be reused under the copy) into every lower tier that
  lacks it. A record is the chunk's digest (8 bytes) and its bytes: a chunk read back carries the
  digest its writer committed, so the engine that loads it checks the bytes end to end.
- **Read through.** A lookup that the segment misses asks the lower tiers; a load of a chunk
  only they hold *promotes* it: the daemon reads it into a fresh slot, commits it with its
  stored digest, and leases it like any other.
The queue of write-throughs is bounded (``max_queued``): one that does not fit is dropped and
counted (the chunk stays in memory only), never waited for.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from collections.abc import Sequence

from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import Segment, SlotStore
from lmcache_pd.cache.store import TieredCache
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)

_DIGEST = struct.Struct("<Q")
WRITER = "daemon:lower"
"""The owner of the leases the write-through holds."""


class LowerTiers:
    def __init__(self, cache: TieredCache, store: SlotStore, segment: Segment, *, max_queued: int = 4096):
        self.cache = cache
        self.store = store
        self.segment = segment
        self.max_queued = max_queued
        self.written = self.dropped = self.promoted = self.failed = self.lookup_hits = 0
        self._queue: collections.deque[ChunkKey] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.cache.start()
        self._thread = thread(self._run, "pd-cache-daemon-lower")
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        self.cache.close()

    # --- written through ----------------------------------------------------------------------
    def committed(self, key: ChunkKey) -> None:
        """An engine committed ``key``: copy it down (later, on this module's thread)."""
        with self._cond:
            if len(self._queue) >= self.max_queued:
                self.dropped += 1
                return
            self._queue.append(key)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                key = self._queue.popleft()
            try:
                self._write_down(key)
            except Exception:  # noqa: BLE001 - a tier bug must not stop the writer
                self.failed += 1
                log.exception("cache daemon: writing a chunk to its lower tiers failed")

    def _write_down(self, key: ChunkKey) -> None:
        missing = self.cache.missing([key])[0]
        if not missing:
            return
        slots = self.store.acquire([key], WRITER, count=False)  # (not an engine's read)
        if not slots:
            return  # deleted or evicted before its turn
        try:
            slot = slots[0]
            record = _DIGEST.pack(slot.crc) + bytes(self.segment.view[slot.offset:slot.offset + slot.nbytes])
        finally:
            self.store.release(WRITER)
        for i in missing:
            if self.cache.tiers[i].put(key, record):
                self.written += 1

    # --- read through -------------------------------------------------------------------------
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which of ``keys`` (missed by the segment) a lower tier holds."""
        found = [not m for m in self.cache.missing(list(keys))] if keys else []
        self.lookup_hits += sum(found)
        return found

    def promote(self, key: ChunkKey, owner: str) -> bool:
        """Read ``key`` from the lower tiers into a fresh slot, committed with its stored digest;
        False when no lower tier has it whole, or the segment has no room."""
        record = self.cache.get(key)
        if record is None or len(record) <= _DIGEST.size:
            return False
        view = memoryview(record)
        (digest,) = _DIGEST.unpack_from(view)
        payload = view[_DIGEST.size:]
        slot = self.store.reserve(key, len(payload), owner)
        if slot is None:
            return False  # there already (another promotion won), or no room
        try:
            self.segment.view[slot.offset:slot.offset + len(payload)] = payload
        except BaseException:
            self.store.abort(key, owner)
            raise
        ok = self.store.commit(key, owner, digest)
        if ok:
            self.promoted += 1
        return ok

    # --- the operator's -----------------------------------------------------------------------
    def forget(self, keys: Sequence[ChunkKey] | None, tenant: str | None = None) -> None:
        """Deleted or cleared in the daemon: in its lower tiers too."""
        if keys is None:
            self.cache.clear(tenant)
        else:
            self.cache.delete(keys)

    def pin(self, keys: Sequence[ChunkKey], pinned: bool) -> None:
        (self.cache.pin if pinned else self.cache.unpin)(keys)

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = len(self._queue)
        return {"lower_written": self.written, "lower_dropped": self.dropped, "lower_promoted": self.promoted,
                "lower_failed": self.failed, "lower_queued": queued, "lower_lookup_hits": self.lookup_hits}

