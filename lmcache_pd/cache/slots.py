"""The node cache daemon's memory: one shared segment cut into chunk slots (L4; docs/cache_server.md).

The daemon (issue 19, being built) owns one :class:`Segment`: a ``memfd`` every client maps once
(its descriptor travels over the daemon's Unix socket, :func:`send_segment` /
:func:`receive_segment`), so chunk bytes never pass through a socket. :class:`SlotStore` is the
daemon's bookkeeping of that segment, in its memory only (clients never see it, so a client
cannot corrupt it):

- the segment is cut into *slabs*; a slab takes one *size class* (a chunk's size, rounded up to
  4 KiB) at first use and is cut into equal *slots*. Chunks of one deployment share one size,
  so a slot is one contiguous run: a client's copy into or out of it is one range plan;
- a save is ``reserve`` (a slot, for one owner) then ``commit`` (with the chunk's crc): a chunk
  is visible only once committed, and an owner that goes away (its connection closes:
  ``drop_owner``) leaves its uncommitted slots free again, never a half-written chunk;
- a load is ``acquire`` (the leading chunks of a prompt, *leased* to an owner) then ``release``:
  a leased slot is never evicted, deleted for reuse, or written;
- when a class has no free slot, its least recently used committed chunk that nobody leases,
  pins or reserves is evicted (``eviction="fifo"``: the oldest saved, reads do not refresh it);
  with none, the save is refused (the chunk is just not cached).

Thread-safe (one lock); no I/O under it.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lmcache_pd.cache.keys import ChunkKey

CLASS_ALIGN = 4096
"""Slot sizes are rounded up to this (page-aligned slots)."""


class Segment:
    """A shared memory segment: a sealed ``memfd`` and its mapping in this process."""

    def __init__(self, fd: int, nbytes: int):
        self.fd = fd
        self.nbytes = nbytes
        self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        probe = ctypes.c_char.from_buffer(self._map)  # (an export of the map while it lives: dropped at once)
        self.address = ctypes.addressof(probe)
        """Where the mapping starts in this process: for copies that take addresses (our kernels,
        the compiled host copy) and for registering it with CUDA as pinned memory."""
        del probe

    @classmethod
    def create(cls, nbytes: int, name: str = "lmcache-pd-cache") -> Segment:
        """A new segment of ``nbytes`` (zero-filled by the kernel on first touch), sealed against
        resizing: a client that maps it can rely on its size."""
        if nbytes <= 0:
            raise ValueError("a segment needs a positive size")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            return cls(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)


def send_segment(sock: socket.socket, segment: Segment) -> None:
    """Pass the segment to the process at the other end of a Unix socket (``SCM_RIGHTS``)."""
    socket.send_fds(sock, [segment.nbytes.to_bytes(8, "little")], [segment.fd])


def receive_segment(sock: socket.socket) -> Segment:
    """Map the segment the other end passed (:func:`send_segment`)."""
    msg, fds, _, _ = socket.recv_fds(sock, 8, 1)
    if len(msg) != 8 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the cache daemon sent no segment")
    return Segment(fds[0], int.from_bytes(msg, "little"))


def size_class(nbytes: int) -> int:
    return -(-nbytes // CLASS_ALIGN) * CLASS_ALIGN


@dataclass
class _Slab:
    offset: int
    slot_bytes: int = 0
    """Its size class; 0 while unassigned."""
    free: list[int] = field(default_factory=list)
    """Offsets of its free slots."""


@dataclass
class Slot:
    """One chunk's place in the segment."""

    key: ChunkKey
    offset: int
    nbytes: int
    crc: int = 0
    committed: bool = False
    owner: str = ""
    """While reserved: who writes it."""
    leases: set[str] = field(default_factory=set)
    """Owners whose load reads it now."""


@dataclass(frozen=True)
class SlotStats:
    segment_bytes: int
    slabs: int
    slabs_used: int
    chunks: int
    chunk_bytes: int
    reserved: int
    leased: int
    evictions: int
    refused: int
    lookups: int
    """Chunks asked of ``contains`` (engines' lookups), and how many were held."""
    lookup_hits: int
    reads: int
    """Chunks asked of ``acquire`` (loads), how many were leased, and their bytes."""
    read_hits: int
    read_bytes: int
    writes: int
    """Chunks committed, and their bytes."""
    written_bytes: int


@dataclass(frozen=True)
class ClassStats:
    """One size class: its slabs, their slots, and how many hold a chunk or a write."""

    slot_bytes: int
    slabs: int
    slots: int
    used: int


EVICTIONS = ("lru", "fifo")


class SlotStore:
    def __init__(self, segment_bytes: int, *, slab_bytes: int = 64 << 20, eviction: str = "lru"):
        if slab_bytes <= 0 or slab_bytes % CLASS_ALIGN:
            raise ValueError(f"slab size must be a positive multiple of {CLASS_ALIGN} bytes")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction policy {eviction!r} is not one of {', '.join(EVICTIONS)}")
        self._refresh = eviction == "lru"
        self.segment_bytes = segment_bytes
        self.slab_bytes = slab_bytes
        self._lock = threading.Lock()
        self._slabs = [_Slab(i * slab_bytes) for i in range(segment_bytes // slab_bytes)]
        if not self._slabs:
            raise ValueError(f"a segment of {segment_bytes} B holds no slab of {slab_bytes} B")
        self._chunks: OrderedDict[ChunkKey, Slot] = OrderedDict()  # committed, least recently used first
        self._reserved: dict[ChunkKey, Slot] = {}
        self._orphans: dict[int, Slot] = {}  # by id; deleted while leased: freed when their last lease ends
        self._pinned: set[ChunkKey] = set()
        self._leased: dict[str, dict[int, Slot]] = {}  # owner -> the slots it leases (by id): ending them is O(its own)
        self._evictions = self._refused = 0
        self._counts = dict.fromkeys(("lookups", "lookup_hits", "reads", "read_hits", "read_bytes", "writes",
                                      "written_bytes"), 0)

    # --- saves ----------------------------------------------------------------------------
    def reserve(self, key: ChunkKey, nbytes: int, owner: str) -> Slot | None:
        """A slot for ``key`` that ``owner`` writes and then commits; None when the chunk is
        committed already (same key, same bytes), is being written by someone else, does not fit
        a slab, or no slot of its class can be freed (refused, counted)."""
        cls = size_class(nbytes)
        with self._lock:
            if key in self._chunks or key in self._reserved:
                return None
            offset = self._take(cls) if 0 < cls <= self.slab_bytes else None
            if offset is None:
                self._refused += 1
                return None
            slot = Slot(key, offset, nbytes, owner=owner)
            self._reserved[key] = slot
            return slot

    def commit(self, key: ChunkKey, owner: str, crc: int) -> bool:
        """``owner`` wrote the slot: the chunk is visible from now on (most recently used)."""
        with self._lock:
            slot = self._reserved.get(key)
            if slot is None or slot.owner != owner:
                return False
            del self._reserved[key]
            slot.committed, slot.crc, slot.owner = True, crc, ""
            self._chunks[key] = slot
            self._counts["writes"] += 1
            self._counts["written_bytes"] += slot.nbytes
            return True

    def abort(self, key: ChunkKey, owner: str) -> bool:
        """``owner`` gives up writing the slot: it is free again, never visible."""
        with self._lock:
            slot = self._reserved.get(key)
            if slot is None or slot.owner != owner:
                return False
            del self._reserved[key]
            self._free(slot)
            return True

    # --- loads ----------------------------------------------------------------------------
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            found = [k in self._chunks for k in keys]
            self._counts["lookups"] += len(found)
            self._counts["lookup_hits"] += sum(found)
            return found

    def acquire(self, keys: Sequence[ChunkKey], owner: str, *, count: bool = True) -> list[Slot]:
        """The leading committed chunks of ``keys``, each leased to ``owner`` (and made most
        recently used) until :meth:`release`; ``count``: an engine's read (in the statistics)."""
        with self._lock:
            out: list[Slot] = []
            for k in keys:
                slot = self._chunks.get(k)
                if slot is None:
                    break
                slot.leases.add(owner)
                self._leased.setdefault(owner, {})[id(slot)] = slot
                if self._refresh:
                    self._chunks.move_to_end(k)
                out.append(slot)
            if count:
                self._counts["reads"] += len(keys)
                self._counts["read_hits"] += len(out)
                self._counts["read_bytes"] += sum(s.nbytes for s in out)
            return out

    def release(self, owner: str, keys: Iterable[ChunkKey] | None = None) -> None:
        """End ``owner``'s leases (on ``keys``, or all of them)."""
        with self._lock:
            self._end_leases(owner, None if keys is None else set(keys))

    def drop_owner(self, owner: str) -> int:
        """``owner`` is gone (its connection closed): its leases end and the slots it was still
        writing are freed, never made visible. Returns how many writes were dropped."""
        with self._lock:
            self._end_leases(owner, None)
            mine = [k for k, s in self._reserved.items() if s.owner == owner]
            for k in mine:
                self._free(self._reserved.pop(k))
            return len(mine)

    # --- the operator's ---------------------------------------------------------------------
    def pin(self, keys: Iterable[ChunkKey]) -> None:
        with self._lock:
            self._pinned.update(keys)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        with self._lock:
            self._pinned.difference_update(keys)

    def delete(self, keys: Iterable[ChunkKey]) -> int:
        """Remove these chunks: no lookup finds them from now on. A leased one's slot is freed
        only when its last lease ends (its reader still copies from it)."""
        n = 0
        with self._lock:
            for k in keys:
                slot = self._chunks.pop(k, None)
                if slot is None:
                    continue
                n += 1
                self._pinned.discard(k)
                if slot.leases:
                    slot.committed = False  # its readers still copy from it
                    self._orphans[id(slot)] = slot
                else:
                    self._free(slot)
        return n

    def clear(self, tenant: str | None = None) -> int:
        with self._lock:
            doomed = [k for k in self._chunks if tenant is None or k.tenant == tenant]
        return self.delete(doomed)

    def stats(self) -> SlotStats:
        with self._lock:
            return SlotStats(self.segment_bytes, len(self._slabs), sum(1 for s in self._slabs if s.slot_bytes),
                             len(self._chunks), sum(s.nbytes for s in self._chunks.values()), len(self._reserved),
                             sum(1 for s in self._chunks.values() if s.leases), self._evictions, self._refused,
                             **self._counts)

    def classes(self) -> list[ClassStats]:
        """Occupancy per size class, smallest first."""
        with self._lock:
            out: dict[int, list[int]] = {}
            for slab in self._slabs:
                if slab.slot_bytes:
                    c = out.setdefault(slab.slot_bytes, [0, 0, 0])
                    slots = self.slab_bytes // slab.slot_bytes
                    c[0] += 1
                    c[1] += slots
                    c[2] += slots - len(slab.free)
            return [ClassStats(b, *v) for b, v in sorted(out.items())]

    # --- under the lock ---------------------------------------------------------------------
    def _take(self, cls: int) -> int | None:
        """A free slot of class ``cls``: in a slab of that class, a new slab, or an evicted one."""
        for slab in self._slabs:
            if slab.slot_bytes == cls and slab.free:
                return slab.free.pop()
        for slab in self._slabs:
            if not slab.slot_bytes:
                slab.slot_bytes = cls
                slab.free = [slab.offset + i * cls for i in range(self.slab_bytes // cls - 1, -1, -1)]
                return slab.free.pop()
        for k, slot in self._chunks.items():  # least recently used first
            if size_class(slot.nbytes) == cls and not slot.leases and k not in self._pinned:
                del self._chunks[k]
                self._evictions += 1
                return slot.offset
        return None

    def _free(self, slot: Slot) -> None:
        self._slabs[slot.offset // self.slab_bytes].free.append(slot.offset)

    def _end_leases(self, owner: str, keys: set[ChunkKey] | None) -> None:
        mine = self._leased.get(owner)
        if not mine:
            return
        for sid, slot in list(mine.items()):
            if keys is not None and slot.key not in keys:
                continue
            del mine[sid]
            slot.leases.discard(owner)
            if not slot.leases and self._orphans.pop(sid, None) is not None:  # deleted, read for the last time
                self._free(slot)
        if not mine:
            del self._leased[owner]
