"""The ``server`` tier: this host's node cache daemon (docs/cache_server.md), shared by every
engine on the node and outliving them.

Chunk bytes never cross the daemon's socket: a put reserves a slot in the daemon's shared
segment, copies the chunk into it and commits it (visible only then, with its crc); a get
leases the chunk's slot, copies it out, checks its crc and ends the lease.

The engines' one-copy path (node/cache_slots.py) uses :meth:`ServerTier.reading` and
:meth:`ServerTier.writing` instead: vLLM's blocks are gathered straight into a reserved slot and
scattered straight out of a leased one, with a digest the caller computes where the bytes are
in the copy's own pass (``SUM_DIGEST``).

When the daemon cannot be reached (not started, killed, restarting) the tier goes *down*, as
the redis tier does: one warning naming the socket and the config field, every call answered
at once as a miss or a refused write, and a new connection tried after ``retry_s``; requests
are then served from the other tiers or recomputed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgspec
import torch

from lmcache_pd.cache.daemon_client import DaemonClient, DaemonGone
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import Segment
from lmcache_pd.cache.tier import Buffer, Tier, TierStats
from lmcache_pd.config import Seconds
from lmcache_pd.digests import bytes_sum

log = logging.getLogger(__name__)


class ServerOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    socket: str
    """The daemon's Unix socket (``lmcache-pd server --socket``)."""
    timeout_s: Seconds = 0.5
    """Deadline of one call to the daemon (connect included); past it the tier counts as down."""
    retry_s: Seconds = 5.0
    """While down, how long to answer misses before trying the daemon again."""


SUM_DIGEST = 1 << 63
"""A committed digest with this bit set is the weighted sum of ``digests.pool_sum`` over the chunk
(mod 2**64, its top bit forced): what the one-copy path computes in the copy's own pass, on a
GPU or with the compiled host copy. Below it: CRC-32 of the chunk's bytes (``put``: a promotion
from a tier below, a host without a compiler). The digest says how it is checked, so engines
of both kinds share chunks."""


def sum_digest(value: int) -> int:
    return (value % (1 << 64)) | SUM_DIGEST


@dataclass(frozen=True)
class SlotRef:
    """A chunk's slot in the daemon's segment, as mapped in this process."""

    segment: Segment
    offset: int
    nbytes: int
    digest: int = 0
    """What its writer committed with it (a load checks it)."""

    @property
    def address(self) -> int:
        return self.segment.address + self.offset


class SlotWrite:
    """A reserved slot being written (:meth:`ServerTier.writing`): ``commit`` makes it visible."""

    def __init__(self, slot: SlotRef, commit: Callable[[int], bool]):
        self.slot = slot
        self._commit = commit
        self.committed = False

    def commit(self, digest: int) -> bool:
        self.committed = self._commit(digest)
        return self.committed


class ServerTier(Tier):
    name = "server"
    Options = ServerOptions
    shared_memory = True
    """Its chunks lie in memory this process maps: read and written in place (reading, writing)."""

    def __init__(self, options: ServerOptions, *, instance: str, rank: int):
        super().__init__(options, instance=instance, rank=rank)
        self._client: DaemonClient | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_since: float | None = None
        self._owners = itertools.count()
        self.chunk_tokens: int | None = None
        """The engine's chunk size, said to the daemon when connecting (set by the engine's cache)."""
        self.sum_unit_bytes = 0
        """The unit of the chunks' ``SUM_DIGEST`` (vLLM's block of one layer: set by the engine's
        cache); 0: such chunks cannot be checked here, and ``get`` answers them as misses."""
        self.on_segment: Callable[[Segment], Callable[[], None]] | None = None
        """Called with each segment mapped (a new daemon, or the same one reconnected); what it
        returns runs before that segment is unmapped. The GPU engine registers it as pinned memory."""

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
                client = DaemonClient(self.options.socket, timeout_s=self.options.timeout_s,
                                      chunk_tokens=self.chunk_tokens)
            except DaemonGone as e:
                self._went_down(e)
                return None
            if self.on_segment is not None:
                try:
                    client.before_unmap = self.on_segment(client.segment)
                except Exception as e:  # noqa: BLE001 - e.g. the GPU refused to register it: not usable
                    client.close()
                    self._went_down(DaemonGone(f"the daemon's segment could not be used here: {e}"))
                    return None
            self._client = client
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
        for _ in range(2):  # a connection found broken is replaced at once (a restarted daemon), once
            client = self._connected()
            if client is None:
                return default
            try:
                return fn(client)
            except DaemonGone as e:
                self._lost(client, e)
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
                with c.mapped() as seg:
                    out = bytes(seg.view[offset:offset + n])
            finally:
                if slots:
                    c.release(owner)
            if self._digest(out, crc) != crc:  # torn or damaged: a miss, and gone
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

    # --- in place (the engines' one-copy path) ----------------------------------------------
    @contextlib.contextmanager
    def reading(self, keys: Sequence[ChunkKey]) -> Iterator[list[SlotRef]]:
        """The slots of the leading chunks of ``keys`` the daemon holds (none with it down), each
        leased (never evicted, reused or written) until the block ends: one request to lease
        them all, one to end the leases. The caller checks each ``digest`` and calls
        :meth:`corrupt` for one that does not match."""
        owner = f"read-{next(self._owners)}"
        client, got = self._call(lambda c: (c, c.acquire(list(keys), owner)), (None, [])) if keys else (None, [])
        self._count(hits=len(got), misses=int(len(got) < len(keys)), read_bytes=sum(n for _, n, _ in got))
        if not got:
            yield []
            return
        try:
            with client.mapped() as seg:
                yield [SlotRef(seg, offset, n, digest) for offset, n, digest in got]
        finally:
            try:
                client.release(owner)
            except DaemonGone as e:  # the leases end with the connection anyway
                self._lost(client, e)

    @contextlib.contextmanager
    def writing(self, keys: Sequence[ChunkKey], nbytes: int) -> Iterator[list[SlotWrite | None]]:
        """A slot of ``nbytes`` reserved for each of ``keys`` (None where the daemon holds the
        chunk already, has no room, or is down): write it, then ``commit(digest)`` inside the
        block; one not committed by the end (or on an exception) is given back, never visible."""
        owner = f"write-{next(self._owners)}"
        # (A connection that breaks midway is replaced and every slot reserved again: the broken
        # connection's reservations die with it.)
        client, offsets = self._call(lambda c: (c, [c.reserve(k, nbytes, owner) for k in keys]),
                                     (None, [-1] * len(keys)))
        if all(o < 0 for o in offsets):
            yield [None] * len(keys)
            return

        def committer(key: ChunkKey):
            def commit(digest: int) -> bool:
                try:
                    return client.commit(key, owner, digest)
                except DaemonGone as e:
                    self._lost(client, e)
                    return False
            return commit

        with client.mapped() as seg:
            writes = [SlotWrite(SlotRef(seg, o, nbytes), committer(k)) if o >= 0 else None
                      for k, o in zip(keys, offsets)]
            try:
                yield writes
            finally:
                self._count(written_bytes=nbytes * sum(1 for w in writes if w is not None and w.committed))
                for k, w in zip(keys, writes):
                    if w is not None and not w.committed:
                        with contextlib.suppress(DaemonGone):  # gone: the daemon frees it with the connection
                            client.abort(k, owner)

    def _digest(self, data: bytes, like: int) -> int | None:
        """``data``'s digest of the kind of ``like``; None when it cannot be computed here."""
        if like < SUM_DIGEST:
            return zlib.crc32(data)
        if not self.sum_unit_bytes or len(data) % self.sum_unit_bytes:
            return None
        return sum_digest(bytes_sum(torch.frombuffer(bytearray(data), dtype=torch.uint8), self.sum_unit_bytes))

    def corrupt(self, key: ChunkKey) -> None:
        """A chunk read in place failed its digest: counted, and dropped."""
        self._count(corrupt=1)
        self.delete([key])

    def _lost(self, client: DaemonClient, e: DaemonGone) -> None:
        """A call on ``client`` failed: drop the connection (counted). The next call connects
        again at once: a daemon that restarted is back without waiting ``retry_s``; one that
        is gone fails that connect, and the tier is down (``_went_down``)."""
        with self._lock:
            if self._client is client:
                log.info("cache tier server: the connection to the daemon broke (%s); connecting again", e)
                client.close()
                self._client = None
                self._count(errors=1)

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
