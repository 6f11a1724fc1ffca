"""``integrity.verify``: the decode checks each hand-off's bytes against the
prefill's digest before loading them; damaged bytes are never loaded (vLLM recomputes), and
each mismatch is counted. Without it the same damage goes through unseen."""

from __future__ import annotations

import msgspec
import pytest
import torch

from lmcache_pd.config import IntegrityConfig
from lmcache_pd.digests import cache_digest, pool_digest
from lmcache_pd.layout import PoolLayout, plan_cache_to_pool
from lmcache_pd.ops import copy_ranges, kv_layout_of
from tests.unit.kv import vllm_like_cache
from tests.unit.nodes import BLOCK, Node, make_cfg


def node(verify: bool, corrupt_every: int = 0, transport: str = "loopback") -> Node:
    cfg = make_cfg(transport, options={"corrupt_every": corrupt_every} if corrupt_every else {})
    return Node(msgspec.structs.replace(cfg, integrity=IntegrityConfig(verify=verify)))


@pytest.mark.parametrize("name", ["tcp", "nixl", "cuda_ipc"])
def test_verified_handoffs_load_over_every_transport(name):
    from lmcache_pd import transport as transports

    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = node(verify=True, transport=name)
    try:
        n.handoff("v1", [5, 6, 7, 30], [11, 12, 13, 40], num_tokens=3 * BLOCK + 5)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        n.assert_moved([5, 6, 7, 30], [11, 12, 13, 40])
        assert n.receiver.status()["loads"]["digests_verified_total"] == 1
    finally:
        n.close()


def test_damaged_bytes_are_refused_and_counted():
    n = node(verify=True, corrupt_every=2)  # the second hand-off's bytes are damaged on the way
    try:
        n.handoff("clean", [1, 2, 3], [4, 5, 6], num_tokens=3 * BLOCK)
        n.handoff("damaged", [7, 8], [9, 10], num_tokens=2 * BLOCK)
        sends, loads = n.results(2, 2)
        by = {ld.transfer_id: ld for ld in loads}
        assert by["clean"].ok, by["clean"].error
        n.assert_moved([1, 2, 3], [4, 5, 6])
        assert not by["damaged"].ok and "integrity.verify" in by["damaged"].error
        assert all(torch.all(layer[b].view(torch.uint8) == 0xEE) for layer in n.d_layers for b in (9, 10))
        status = n.receiver.status()["loads"]
        assert status["digests_verified_total"] == 1 and status["digest_mismatches_total"] == 1
        assert n.pool_full()
    finally:
        n.close()


def test_without_verify_the_same_damage_is_loaded():
    n = node(verify=False, corrupt_every=1)
    try:
        n.handoff("damaged", [7, 8], [9, 10], num_tokens=2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert ld.ok  # nothing looked
        differs = any(not torch.equal(pl[pb].view(torch.uint8), dl[db].view(torch.uint8))
                      for pl, dl in zip(n.p_layers, n.d_layers) for pb, db in ((7, 9), (8, 10)))
        assert differs
    finally:
        n.close()


def test_the_digest_sees_one_flipped_bit_and_one_misplaced_block():
    layers = vllm_like_cache(2, 20, 2, 16, 64, torch.bfloat16, "LBHNC", "cpu")
    kv, buf = kv_layout_of(layers)
    pool = PoolLayout(kv.num_layers, 12, kv.block_bytes)
    pbuf = torch.zeros(pool.nbytes, dtype=torch.uint8)
    blocks, pages = [3, 17, 5, 9], [10, 2, 7, 0]
    copy_ranges(buf, pbuf, plan_cache_to_pool(kv, pool, blocks=blocks, pages=pages))
    want = cache_digest(kv, buf, blocks, pool, pages)
    assert pool_digest(pool, pbuf, pages) == want
    flipped = pbuf.clone()
    flipped[(pool.num_pages + 7) * pool.block_bytes + 77] ^= 0x10
    assert pool_digest(pool, flipped, pages) != want
    swapped = torch.zeros_like(pbuf)  # the right bytes, two blocks in each other's places
    copy_ranges(buf, swapped, plan_cache_to_pool(kv, pool, blocks=blocks, pages=[2, 10, 7, 0]))
    assert pool_digest(pool, swapped, pages) != want


def test_the_gpu_formula_sees_one_changed_word_and_two_swapped_blocks():
    """digests._digest, what cache_digest and pool_digest use on a GPU, run here on CPU tensors."""
    from lmcache_pd.digests import _digest

    g = torch.Generator().manual_seed(3)
    units = torch.randint(0, 256, (6, 4096), dtype=torch.uint8, generator=g)
    places = torch.tensor([0, 4096, 12288, 40960, 8192, 65536], dtype=torch.int64)
    want = _digest(units, places)
    assert _digest(units[[2, 0, 5, 1, 4, 3]], places[[2, 0, 5, 1, 4, 3]]) == want  # any order of blocks
    changed = units.clone()
    changed[4, 1000] ^= 0x80
    assert _digest(changed, places) != want
    assert _digest(units, places[[1, 0, 2, 3, 4, 5]]) != want  # blocks 0 and 1 in each other's place


@pytest.mark.parametrize("per_layer,sliced", [(False, False), (False, True), (True, False)])
def test_the_gpu_formulas_agree_between_cache_and_pool(per_layer, sliced, monkeypatch):
    """cache_digest's and pool_digest's device formulas (one gather over all layers, in slices
    for large hand-offs, or one per layer where vLLM keeps a buffer per layer), run here on CPU
    tensors."""
    from lmcache_pd import digests
    from lmcache_pd.digests import _cache_sum, _pool_sum
    from tests.unit.kv import per_layer_cache

    if sliced:
        monkeypatch.setattr(digests, "_SLICE_BYTES", 1)  # one page per slice

    if per_layer:
        layers, _spacers = per_layer_cache(3, 20, 2, 16, 64, torch.bfloat16, "cpu")
    else:
        layers = vllm_like_cache(3, 20, 2, 16, 64, torch.bfloat16, "LBHNC", "cpu")
    kv, buf = kv_layout_of(layers)
    assert (len(kv.extents) > 1) == per_layer
    pool = PoolLayout(kv.num_layers, 12, kv.block_bytes)
    pbuf = torch.zeros(pool.nbytes, dtype=torch.uint8)
    blocks, pages = [3, 17, 5, 9], [10, 2, 7, 0]
    copy_ranges(buf, pbuf, plan_cache_to_pool(kv, pool, blocks=blocks, pages=pages))
    assert int(_cache_sum(kv, buf, blocks, pool, pages)) == int(_pool_sum(pool, pbuf, pages))
    pbuf[(2 * pool.num_pages + 2) * pool.block_bytes + 5] ^= 1
    assert int(_cache_sum(kv, buf, blocks, pool, pages)) != int(_pool_sum(pool, pbuf, pages))


def test_the_digest_kernel_equals_the_formula_on_both_sides():
    """csrc/digest.cu (one pass over the bytes) gives the torch formula's value, for vLLM's two
    KV layouts, and sees a flipped bit in the pool."""
    from lmcache_pd.digests import _cache_sum, _pool_sum, pool_digest
    from lmcache_pd.ops import cuda_kernels_available
    from tests.unit.kv import per_layer_cache

    ok, why = cuda_kernels_available()
    if not ok:
        pytest.skip(f"the digest kernel needs CUDA: {why}")
    for per_layer in (False, True):
        if per_layer:
            layers, _spacers = per_layer_cache(4, 40, 8, 16, 128, torch.bfloat16, "cuda")
        else:
            layers = vllm_like_cache(4, 40, 8, 16, 128, torch.bfloat16, "LBHNC", "cuda")
        kv, buf = kv_layout_of(layers)
        pool = PoolLayout(kv.num_layers, 24, kv.block_bytes)
        pbuf = torch.zeros(pool.nbytes, dtype=torch.uint8, device="cuda")
        blocks, pages = [3, 17, 5, 9, 33, 21], [10, 2, 7, 0, 23, 11]
        copy_ranges(buf, pbuf, plan_cache_to_pool(kv, pool, blocks=blocks, pages=pages))
        want = int(_cache_sum(kv, buf, blocks, pool, pages))
        assert cache_digest(kv, buf, blocks, pool, pages) == want == pool_digest(pool, pbuf, pages) \
            == int(_pool_sum(pool, pbuf, pages)), per_layer
        pbuf[(3 * pool.num_pages + 23) * pool.block_bytes + 4000] ^= 4
        assert pool_digest(pool, pbuf, pages) != want


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_sums_of_writers_that_split_every_page_add_up_to_the_pages_sum(device, monkeypatch):
    """digests.plan_sum (integrity.verify between TP sizes): writers that each write part of every
    page (here: the first 3 and the last 5 words of each block, from scattered sources) have
    sums that add up, mod 2**64, to digests.pool_sum of the pages (on a GPU: the digest kernel's);
    a word in another place, or a changed word, changes the sum."""
    import numpy as np

    from lmcache_pd.digests import plan_sum, pool_sum
    from lmcache_pd.layout import RangePlan

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pool = PoolLayout(2, 6, 64)
    rng = np.random.default_rng(3)
    src = torch.from_numpy(rng.integers(0, 256, 4096, dtype=np.uint8)).to(device)
    pages = [1, 4]
    dst = [(layer * 6 + p) * 64 for layer in range(2) for p in pages]
    at = rng.permutation(4096 // 64)[:len(dst)] * 64
    buf = torch.zeros(pool.nbytes, dtype=torch.uint8, device=device)
    head = RangePlan(np.array(at), np.array(dst), np.full(len(dst), 24))
    tail = RangePlan(np.array(at) + 24, np.array(dst) + 24, np.full(len(dst), 40))
    copy_ranges(src, buf, head)
    copy_ranges(src, buf, tail)
    total = (plan_sum(src, head, pool) + plan_sum(src, tail, pool) + 2**63) % 2**64 - 2**63
    assert total == pool_sum(pool, buf, pages)
    from lmcache_pd import digests

    monkeypatch.setattr(digests, "_SLICE_BYTES", 320)  # 5 words a slice: slices cut ranges anywhere
    assert (plan_sum(src, head, pool) + plan_sum(src, tail, pool) + 2**63) % 2**64 - 2**63 == total
    monkeypatch.undo()
    moved = RangePlan(np.array(at), np.array(dst) + 8, np.full(len(dst), 24))  # one word over
    assert (plan_sum(src, moved, pool) + plan_sum(src, tail, pool) + 2**63) % 2**64 - 2**63 != total
    src[at[0] + 30] ^= 1
    assert (plan_sum(src, head, pool) + plan_sum(src, tail, pool) + 2**63) % 2**64 - 2**63 != total
