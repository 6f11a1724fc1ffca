"""The ``server`` tier: this host's node cache daemon (docs/cache_server.md), shared by every
engine on the node and outliving them.

Chunk bytes never cross the daemon's socket: a put reserves a slot in the daemon's shared
segment, copies the chunk into it and commits it (visible only then, with its crc); a get
leases the chunk's slot, copies it out, checks its crc and ends the lease. (The one-copy path,
gathering vLLM's blocks straight into the slot, is the next step: issue 19.)

When the daemon cannot be reached (not started, killed, restarting) the tier goes *down*, as
the redis tier does: one warning naming the socket and the config field, every call answered
at once as a miss or a refused write, and a new connection tried after ``retry_s``; requests
are then served from the other tiers or recomputed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import zlib
from collections.abc import Iterable, Sequence

import msgspec

from lmcache_pd.cache.daemon_client import DaemonClient, DaemonGone
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer, Tier, TierStats
from lmcache_pd.config import Seconds

log = logging.getLogger(__name__)


class ServerOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    socket: str
    """The daemon's Unix socket (``lmcache-pd server --socket``)."""
    timeout_s: Seconds = 0.5
    """Deadline of one call to the daemon (connect included); past it the tier counts as down."""
    retry_s: Seconds = 5.0
    """While down, how long to answer misses before trying the daemon again."""


class ServerTier(Tier):
    name = "server"
    Options = ServerOptions

    def __init__(self, options: ServerOptions, *, instance: str, rank: int):
        super().__init__(options, instance=instance, rank=rank)
        self._client: DaemonClient | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_since: float | None = None
        self._owners = itertools.count()

    def open(self) -> None:
        self._connected()

    def _connected(self) -> DaemonClient | None:
        """The daemon's client, connecting if needed; None while down."""
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._down_until:
                return None
            try:
                self._client = DaemonClient(self.options.socket, timeout_s=self.options.timeout_s)
            except DaemonGone as e:
                self._went_down(e)
                return None
            if self._down_since is not None:
                log.info("cache tier server: the daemon at %s is back", self.options.socket)
                self._down_since = None
            return self._client

    def _went_down(self, e: Exception) -> None:
        """Under the lock: forget the connection, answer misses for ``retry_s``."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._down_until = time.monotonic() + self.options.retry_s
        self._count(errors=1)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("cache tier server: %s (cache.tiers[server].options.socket); misses until it is back, "
                        "tried again every %g s", e, self.options.retry_s)

    def _call(self, fn, default):
        client = self._connected()
        if client is None:
            return default
        try:
            return fn(client)
        except DaemonGone as e:
            with self._lock:
                if self._client is client:
                    self._went_down(e)
            return default

    # --- the contract -------------------------------------------------------------------------
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        return self._call(lambda c: c.contains(list(keys)), [False] * len(keys))

    def get(self, key: ChunkKey) -> Buffer | None:
        owner = f"get-{next(self._owners)}"

        def read(c: DaemonClient) -> bytes | None:
            slots = c.acquire([key], owner)
            try:
                if not slots:
                    return None
                offset, n, crc = slots[0]
                out = bytes(c.segment.view[offset:offset + n])
            finally:
                if slots:
                    c.release(owner)
            if zlib.crc32(out) != crc:  # torn or damaged: a miss, and gone
                self._count(corrupt=1)
                c.delete([key])
                return None
            return out

        value = self._call(read, None)
        if value is None:
            self._count(misses=1)
            return None
        self._count(hits=1, read_bytes=len(value))
        return value

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        view = memoryview(value).cast("B")
        owner = f"put-{next(self._owners)}"

        def write(c: DaemonClient) -> bool:
            if c.save(key, view, owner, zlib.crc32(view)):
                self._count(written_bytes=len(view))
                return True
            return c.contains([key])[0]  # stored already (content-addressed): as good as written

        return self._call(write, False)

    def delete(self, keys: Iterable[ChunkKey]) -> int:
        keys = list(keys)
        return self._call(lambda c: c.delete(keys), 0) if keys else 0

    def clear(self, tenant: str | None = None) -> int:
        return self._call(lambda c: c.clear(tenant), 0)

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        self._call(lambda c: c.pin(list(keys)), None)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        self._call(lambda c: c.pin(list(keys), pinned=False), None)

    def stats(self) -> TierStats:
        s = super().stats()
        got = self._call(lambda c: c.stats(), None)
        if got is None:
            s.up, s.entries, s.bytes = False, -1, -1
        else:
            s.entries, s.bytes, s.capacity_bytes = got["chunks"], got["chunk_bytes"], got["segment_bytes"]
        return s

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
