"""The one-copy path between vLLM's blocks and the node cache daemon (node/cache_slots.py): a
save gathers the blocks straight into a slot of the daemon's segment and a load scatters them
straight out of it (the tier's copying ``get`` and ``put`` are never called), bitwise, nothing
written outside the request's blocks; the digest is the weighted sum computed in the copy's own
pass (CRC-32 on a host without a compiler); a damaged slot is a miss, counted and dropped; a
chunk that came by ``put`` (CRC-32) is read in place too, its damaged bytes never reaching the
blocks. On host memory here, and on a GPU where there is one."""

from __future__ import annotations

import msgspec
import pytest
import torch

from lmcache_pd.cache import chunk_keys
from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.server_tier import SUM_DIGEST, ServerTier
from lmcache_pd.config import CacheConfig, TierConfig
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec
from lmcache_pd.node.cache_io import CacheIO
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import COMPAT, vllm_like_cache

BLOCK = 16
CHAINS = (b"a" * 32, b"b" * 32, b"c" * 32)
SRC = (5, 9, 2, 33, 17, 40)
DST = (50, 51, 52, 60, 61)  # the first chunk's first block is vLLM's own (skip 1)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU one-copy path is not run"))]


@pytest.fixture
def daemon(tmp_path):
    d = CacheDaemon(str(tmp_path / "cache.sock"), segment_bytes=8 << 20, slab_bytes=1 << 20)
    d.start()
    yield d
    d.close()


def engine(daemon: CacheDaemon, device: str, name: str, *, tiers=("server",)):
    layers = vllm_like_cache(4, 64, 2, BLOCK, 64, torch.bfloat16, "LBNHC", device)
    kv, buf = kv_layout_of(layers)
    opts = {"server": {"socket": daemon.path, "timeout_s": 2.0}, "memory": {}}
    cfg = CacheConfig(enabled=True, chunk_tokens=2 * BLOCK,
                      tiers=tuple(TierConfig(name=t, options=opts[t]) for t in tiers))
    io = CacheIO(cfg, instance=name, rank=0, compat=msgspec.structs.asdict(COMPAT), kv=kv, kv_buffer=buf,
                 block_size=BLOCK)
    io.start()
    return io, layers


def no_copies(io: CacheIO, monkeypatch) -> None:
    def refused(*_a, **_k):
        raise AssertionError("the copying path of the server tier was used")

    monkeypatch.setattr(io.shared, "get", refused)
    monkeypatch.setattr(io.shared, "put", refused)


def raw(t: torch.Tensor, blocks) -> torch.Tensor:
    return t[list(blocks)].contiguous().view(torch.uint8).cpu()  # bytes: random bf16 bits include NaNs


def save(io: CacheIO, layers) -> None:
    ready = None
    if layers[0].is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    io.submit_save(CacheSaveSpec("r1", CHAINS, None, SRC), ready)
    (saved,) = io.drain(30)
    assert saved.ok and saved.num_bytes == 3 * io.chunk_layout.nbytes, saved


def load(io: CacheIO):
    io.submit_load(CacheLoadSpec("r2", CHAINS, None, 1, DST))
    (loaded,) = io.drain(30)
    return loaded


@pytest.mark.parametrize("device", DEVICES)
def test_a_chunk_goes_into_the_daemons_slot_and_out_of_it_in_place_bitwise(daemon, device, monkeypatch):
    a, a_layers = engine(daemon, device, "writer")
    b, b_layers = engine(daemon, device, "reader")  # another engine, its own blocks (random bytes too)
    try:
        no_copies(a, monkeypatch)
        no_copies(b, monkeypatch)
        save(a, a_layers)
        assert daemon.store.stats().chunks == 3
        # The slot holds the chunk in pool layout: layer-major, block after block.
        (slot,) = daemon.store.acquire([_key(a, 0)], "test")
        daemon.store.release("test")
        chunk = bytes(daemon.segment.view[slot.offset:slot.offset + slot.nbytes])
        kv, buf = a.kv, a.kv_buffer.cpu().numpy()
        want = b"".join(buf[base + b * kv.block_stride:][:kv.block_bytes].tobytes()
                        for base in kv.layer_offsets for b in SRC[:2])
        assert chunk == want
        assert slot.crc >= SUM_DIGEST  # summed in the copy's pass (the digest says how to check it)
        before = [t.contiguous().view(torch.uint8).clone() for t in b_layers]
        loaded = load(b)
        assert loaded.ok and loaded.chunks == 3, loaded
        for ta, tb in zip(a_layers, b_layers):
            assert torch.equal(raw(tb, DST), raw(ta, SRC[1:]))
        untouched = [x for x in range(64) if x not in DST]
        for tb, old in zip(b_layers, before):
            assert torch.equal(raw(tb, untouched), old[untouched].cpu()), "wrote outside the request's blocks"
        assert b.shared.stats().hits == 3 and b.shared.stats().read_bytes == 3 * b.chunk_layout.nbytes
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_damaged_slot_is_a_miss_counted_and_dropped(daemon, device):
    io, layers = engine(daemon, device, "e")
    try:
        save(io, layers)
        (slot,) = daemon.store.acquire([_key(io, 1)], "test")
        daemon.store.release("test")
        daemon.segment.view[slot.offset + slot.nbytes // 2] ^= 0x40  # the second chunk, damaged
        loaded = load(io)
        assert not loaded.ok and "digest" in loaded.error
        assert io.shared.stats().corrupt == 1 and daemon.store.contains([_key(io, 1)]) == [False]
    finally:
        io.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_chunk_saved_through_put_is_read_in_place_by_its_crc(daemon, device):
    """A chunk that reached the daemon by ``put`` (a promotion from a tier below, or an engine
    on the host) carries CRC-32; the one-copy load checks it by that, on a GPU too."""
    a, a_layers = engine(daemon, "cpu", "host-writer", tiers=("memory",))
    b, b_layers = engine(daemon, device, "reader")
    try:
        save(a, a_layers)
        assert a.cache.flush(30)
        for i in range(3):  # the bytes of the memory tier's chunks, put into the daemon as they are
            assert b.shared.put(_key(b, i), a.cache.tiers[0].get(_key(a, i)))
        (slot,) = daemon.store.acquire([_key(b, 0)], "test")
        daemon.store.release("test")
        assert slot.crc < SUM_DIGEST
        loaded = load(b)
        assert loaded.ok, loaded
        for ta, tb in zip(a_layers, b_layers):
            assert torch.equal(raw(tb, DST), raw(ta, SRC[1:]))
        # Damaged: checked before the copy, so the blocks keep what they had.
        (slot,) = daemon.store.acquire([_key(b, 2)], "test")
        daemon.store.release("test")
        daemon.segment.view[slot.offset + 8] ^= 0x01
        for t in b_layers:
            t[list(DST[3:])] = 0
        assert not load(b).ok and daemon.store.contains([_key(b, 2)]) == [False]
        for t in b_layers:
            assert not t[list(DST[3:])].view(torch.int16).any(), "damaged bytes reached the blocks"

    finally:
        a.close()
        b.close()

def test_without_a_compiler_a_host_chunk_carries_crc_and_reads_back_bitwise(daemon, monkeypatch):
    from lmcache_pd import host_copy

    monkeypatch.setattr(host_copy, "compiled", lambda: None)
    a, a_layers = engine(daemon, "cpu", "writer")
    b, b_layers = engine(daemon, "cpu", "reader")
    try:
        save(a, a_layers)
        (slot,) = daemon.store.acquire([_key(a, 0)], "test")
        daemon.store.release("test")
        assert slot.crc < SUM_DIGEST
        assert load(b).ok
        for ta, tb in zip(a_layers, b_layers):
            assert torch.equal(raw(tb, DST), raw(ta, SRC[1:]))
    finally:
        a.close()
        b.close()


def test_the_mapping_outlives_a_closed_connection_while_a_copy_uses_it(daemon):
    """The tier going down (another thread's call failed) must not unmap a slot under a copy:
    that would crash the engine, not fail a request."""
    io, layers = engine(daemon, "cpu", "e")
    try:
        save(io, layers)
        tier: ServerTier = io.shared
        with tier.reading([_key(io, 0)]) as (slot,):
            tier.close()  # the connection goes; this read's mapping stays
            assert bytes(slot.segment.view[slot.offset:slot.offset + 16]) == \
                bytes(daemon.segment.view[slot.offset:slot.offset + 16])
        with pytest.raises(ValueError):  # and goes once the read ended
            slot.segment.view[0]
    finally:
        io.close()


def _key(io: CacheIO, i: int):
    return chunk_keys(io.salt, CHAINS, None)[i]
