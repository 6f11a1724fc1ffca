"""The node cache daemon's segment and slot store (cache/slots.py; docs/cache_server.md): saves
visible only once committed, a writer that goes away leaves nothing half-written, leased slots
never reused, LRU eviction per size class, and the segment shared with another process by its
descriptor, bitwise."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import zlib

import pytest

from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import CLASS_ALIGN, Segment, SlotStore, receive_segment, send_segment

SLAB = 16 * CLASS_ALIGN


def key(i: int, tenant: str = "-") -> ChunkKey:
    return ChunkKey(tenant, i.to_bytes(32, "little"))


def saved(store: SlotStore, k: ChunkKey, nbytes: int = 4 * CLASS_ALIGN, owner: str = "w") -> int:
    slot = store.reserve(k, nbytes, owner)
    assert slot is not None
    assert store.commit(k, owner, crc=7)
    return slot.offset


def test_a_chunk_is_seen_only_once_committed_and_an_aborted_or_orphaned_write_frees_its_slot():
    store = SlotStore(2 * SLAB, slab_bytes=SLAB)
    slot = store.reserve(key(1), 4 * CLASS_ALIGN, "writer")
    assert slot is not None and slot.offset % CLASS_ALIGN == 0
    assert store.contains([key(1)]) == [False] and store.acquire([key(1)], "reader") == []
    assert store.reserve(key(1), 4 * CLASS_ALIGN, "other") is None  # someone is writing it
    assert not store.commit(key(1), "other", crc=1)  # only its writer commits it
    assert store.commit(key(1), "writer", crc=123)
    (got,) = store.acquire([key(1), key(2)], "reader")  # the leading hits only
    assert (got.offset, got.nbytes, got.crc) == (slot.offset, 4 * CLASS_ALIGN, 123)
    assert store.reserve(key(1), 4 * CLASS_ALIGN, "w2") is None  # content-addressed: already there
    # A writer that gives up, or goes away: its slots are free again, never visible.
    a = store.reserve(key(2), 4 * CLASS_ALIGN, "quitter")
    assert store.abort(key(2), "quitter") and store.contains([key(2)]) == [False]
    store.reserve(key(3), 4 * CLASS_ALIGN, "killed")
    store.reserve(key(4), 4 * CLASS_ALIGN, "killed")
    assert store.drop_owner("killed") == 2 and store.stats().reserved == 0
    assert not store.commit(key(3), "killed", crc=1) and store.contains([key(3)]) == [False]
    # The freed slots are handed out again (4 slots per slab of this class, one taken).
    offsets = {saved(store, key(10 + i)) for i in range(3)}
    assert a.offset in offsets and len(offsets | {slot.offset}) == 4


def test_eviction_takes_the_least_recently_used_chunk_nobody_leases_pins_or_writes():
    store = SlotStore(SLAB, slab_bytes=SLAB)  # one slab: 4 slots of 4 pages
    for i in range(4):
        saved(store, key(i))
    store.acquire([key(0)], "reader")  # leased (and now the most recently used)
    store.pin([key(1)])
    store.reserve(key(9), 4 * CLASS_ALIGN, "w")  # full: evicts key(2), the oldest free one
    assert store.contains([key(i) for i in range(4)]) == [True, True, False, True]
    assert store.stats().evictions == 1
    # Nothing evictable left but key(3): then nothing at all (refused, counted).
    assert store.reserve(key(10), 4 * CLASS_ALIGN, "w") is not None
    assert store.reserve(key(11), 4 * CLASS_ALIGN, "w") is None
    assert store.stats().refused == 1 and store.contains([key(0), key(1)]) == [True, True]
    store.release("reader")
    store.unpin([key(1)])
    assert store.reserve(key(11), 4 * CLASS_ALIGN, "w") is not None  # key(0) or key(1) went


def test_size_classes_take_slabs_of_their_own_and_a_chunk_larger_than_a_slab_is_refused():
    store = SlotStore(3 * SLAB, slab_bytes=SLAB)
    saved(store, key(1), 4 * CLASS_ALIGN)
    saved(store, key(2), 3 * CLASS_ALIGN + 1)  # rounds up to 4 pages: the same class
    saved(store, key(3), 8 * CLASS_ALIGN)
    assert store.stats().slabs_used == 2
    assert store.reserve(key(4), SLAB + 1, "w") is None and store.stats().refused == 1
    for i in range(2, 5):  # the 8-page class: 2 slots in its slab, then a third slab
        saved(store, key(10 + i), 8 * CLASS_ALIGN)
    assert store.stats().slabs_used == 3


def test_a_chunk_deleted_while_it_is_read_keeps_its_slot_until_the_read_ends():
    store = SlotStore(SLAB, slab_bytes=SLAB)
    offset = saved(store, key(1))
    store.acquire([key(1)], "reader")
    assert store.delete([key(1)]) == 1 and store.contains([key(1)]) == [False]
    taken = {saved(store, key(10 + i)) for i in range(3)}  # the three other slots
    store.acquire([key(10 + i) for i in range(3)], "others")  # (not evictable either)
    assert offset not in taken and store.reserve(key(20), 4 * CLASS_ALIGN, "w") is None
    store.release("reader")
    assert store.reserve(key(20), 4 * CLASS_ALIGN, "w").offset == offset


def test_a_slot_read_by_two_owners_is_freed_when_the_last_one_releases_it_and_only_its_own_keys_end():
    store = SlotStore(SLAB, slab_bytes=SLAB)
    offsets = [saved(store, key(i)) for i in range(4)]
    store.acquire([key(0), key(1)], "a")
    store.acquire([key(0)], "b")
    store.delete([key(0)])
    store.release("a", keys=[key(1)])  # a still reads key(0)
    assert store.stats().leased == 0  # key(1) is free of leases; key(0) is an orphan
    assert store.reserve(key(8), 4 * CLASS_ALIGN, "w").offset != offsets[0]  # evicts key(1) (or 2, 3)
    store.release("a")
    assert store.reserve(key(9), 4 * CLASS_ALIGN, "w").offset != offsets[0]  # b still reads it
    store.release("b")
    store.release("b")  # twice: nothing more to end
    assert store.reserve(key(10), 4 * CLASS_ALIGN, "w").offset == offsets[0]


def test_clear_removes_one_tenant_or_all():
    store = SlotStore(2 * SLAB, slab_bytes=SLAB)
    for i, t in enumerate(["a", "a", "b"]):
        saved(store, key(i, t))
    assert store.clear("a") == 2 and store.contains([key(2, "b")]) == [True]
    assert store.clear() == 1 and store.stats().chunks == 0


def _reader(sock: socket.socket, offset: int, n: int, out) -> None:
    seg = receive_segment(sock)
    out.put((bytes(seg.view[offset:offset + n]), seg.nbytes))
    seg.view[offset] ^= 0xFF  # and the other side sees its write
    sock.send(b"k")
    seg.close()


def test_the_segment_is_shared_with_another_process_by_its_descriptor_bitwise():
    seg = Segment.create(2 * SLAB)
    store = SlotStore(seg.nbytes, slab_bytes=SLAB)
    payload = os.urandom(3 * CLASS_ALIGN + 5)
    slot = store.reserve(key(1), len(payload), "w")
    seg.view[slot.offset:slot.offset + len(payload)] = payload
    store.commit(key(1), "w", crc=zlib.crc32(payload))
    here, there = socket.socketpair(socket.AF_UNIX)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_reader, args=(there, slot.offset, len(payload), out))
    proc.start()
    try:
        send_segment(here, seg)
        got, size = out.get(timeout=30)
        assert got == payload and zlib.crc32(got) == store.acquire([key(1)], "r")[0].crc and size == seg.nbytes
        assert here.recv(1) == b"k" and seg.view[slot.offset] == payload[0] ^ 0xFF
    finally:
        proc.join(10)
        here.close()
        there.close()
        seg.close()
    with pytest.raises(OSError):  # sealed: no client can shrink it under the others
        os.ftruncate(Segment.create(SLAB).fd, 1)


def test_fifo_eviction_takes_the_oldest_saved_even_when_it_was_read_last():
    lru, fifo = SlotStore(SLAB, slab_bytes=SLAB), SlotStore(SLAB, slab_bytes=SLAB, eviction="fifo")
    for store in (lru, fifo):
        for i in range(4):
            saved(store, key(i))
        store.acquire([key(0)], "r")
        store.release("r")
        saved(store, key(9))
    assert lru.contains([key(0), key(1)]) == [True, False]
    assert fifo.contains([key(0), key(1)]) == [False, True]
    with pytest.raises(ValueError, match="eviction policy"):
        SlotStore(SLAB, slab_bytes=SLAB, eviction="random")
