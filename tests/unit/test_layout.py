"""Layout math and the torch gather/scatter: bytes land exactly where they belong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_pd.layout import (
    KVLayout,
    PoolLayout,
    blocks_for_tokens,
    coalesce,
    plan_cache_to_pool,
    plan_into,
    plan_layers,
)
from lmcache_pd.ops import copy_ranges, copy_ranges_ref, flat_bytes, kv_layout_of
from tests.unit.kv import per_layer_cache, vllm_like_cache


def test_per_layer_buffers_round_trip_bitwise_and_touch_nothing_else():
    src, src_spacers = per_layer_cache(4, 20, 2, 16, 8, torch.bfloat16)
    dst, dst_spacers = per_layer_cache(4, 24, 2, 16, 8, torch.bfloat16)
    kv_src, src_buf = kv_layout_of(src)
    kv_dst, dst_buf = kv_layout_of(dst)
    assert len(kv_src.extents) == 4 and kv_src.block_bytes == 2 * 16 * 2 * 8 * 2
    assert src_buf.data_ptr() == min(t.data_ptr() for t in src)
    spacers_before = [t.clone() for t in src_spacers + dst_spacers]
    dst_before = [t.clone() for t in dst]
    pool = PoolLayout.sized(kv_src, 10 * kv_src.page_bytes)
    pool_buf = torch.full((pool.nbytes,), 0xAB, dtype=torch.uint8)
    blocks, pages, dst_blocks = [3, 17, 4, 9], [0, 7, 1, 2], [1, 23, 5, 6]
    copy_ranges(src_buf, pool_buf, plan_cache_to_pool(kv_src, pool, blocks=blocks, pages=pages))
    copy_ranges(pool_buf, dst_buf, plan_cache_to_pool(kv_dst, pool, blocks=dst_blocks, pages=pages).swapped())
    for s_layer, d_layer, d_before in zip(src, dst, dst_before):
        for b, d in zip(blocks, dst_blocks):
            assert torch.equal(s_layer[b].view(torch.uint8), d_layer[d].view(torch.uint8))
        others = [i for i in range(24) if i not in dst_blocks]
        assert torch.equal(d_layer[others].view(torch.uint8), d_before[others].view(torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(src_spacers + dst_spacers, spacers_before))


def test_layers_in_order_of_their_buffers_need_not_be_in_address_order():
    layers, _ = per_layer_cache(3, 8, 2, 16, 8, torch.float16)
    kv, buf = kv_layout_of(layers[::-1])  # the lowest address need not be layer 0
    lowest = min(t.data_ptr() for t in layers)
    assert kv.layer_offsets == tuple(t.data_ptr() - lowest for t in layers[::-1])
    assert buf.data_ptr() == lowest and buf.numel() == max(t.data_ptr() + t.numel() * 2 for t in layers) - lowest


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_round_trip_through_the_pool_is_bitwise(layout, dtype):
    src_layers = vllm_like_cache(3, 20, 2, 16, 8, dtype, layout)
    dst_layers = vllm_like_cache(3, 24, 2, 16, 8, dtype, layout)
    kv_src, src_buf = kv_layout_of(src_layers)
    kv_dst, dst_buf = kv_layout_of(dst_layers)
    assert kv_src.page_bytes == kv_dst.page_bytes
    pool = PoolLayout.sized(kv_src, 10 * kv_src.page_bytes)
    pool_buf = torch.full((pool.nbytes,), 0xAB, dtype=torch.uint8)  # poisoned
    rng = np.random.default_rng(1)
    blocks = rng.choice(np.arange(1, 20), size=6, replace=False)
    pages = rng.choice(np.arange(10), size=6, replace=False)
    copy_ranges(src_buf, pool_buf, plan_cache_to_pool(kv_src, pool, blocks=blocks, pages=pages))
    dst_blocks = rng.choice(np.arange(1, 24), size=6, replace=False)
    before = dst_buf.clone()
    copy_ranges(pool_buf, dst_buf, plan_cache_to_pool(kv_dst, pool, blocks=dst_blocks, pages=pages).swapped())
    for s_layer, d_layer in zip(src_layers, dst_layers):
        for b, d in zip(blocks, dst_blocks):
            # compare bits: random bytes include NaNs, which never equal themselves
            assert torch.equal(s_layer[b].contiguous().view(torch.uint8), d_layer[d].contiguous().view(torch.uint8))
    # Nothing outside the destination blocks changed.
    touched = torch.zeros_like(dst_buf, dtype=torch.bool)
    for off in kv_dst.layer_offsets:
        for d in dst_blocks:
            start = off + int(d) * kv_dst.block_stride
            touched[start:start + kv_dst.block_bytes] = True
    assert torch.equal(dst_buf[~touched], before[~touched])


def test_consecutive_blocks_to_consecutive_pages_merge_per_layer():
    kv = KVLayout(num_layers=4, num_blocks=100, block_bytes=1024, block_stride=1024,
                  layer_offsets=tuple(i * 100 * 1024 for i in range(4)))
    pool = PoolLayout(4, 50, 1024)
    plan = plan_cache_to_pool(kv, pool, blocks=list(range(10, 30)), pages=list(range(5, 25)))
    assert len(plan) == 4 and plan.nbytes == 4 * 20 * 1024
    plan = plan_cache_to_pool(kv, pool, blocks=[3, 9, 4], pages=[0, 1, 2])
    assert len(plan) == 12


def test_coalesce_matches_brute_force():
    rng = np.random.default_rng(3)
    src = np.cumsum(rng.integers(0, 2, 200)) * 8 + np.arange(200) * 8
    dst = np.arange(200) * 8 + np.cumsum(rng.integers(0, 2, 200)) * 8
    lengths = np.full(200, 8)
    plan = coalesce(src, dst, lengths)
    a = np.zeros(int(src.max()) + 16, dtype=np.int64)
    b1, b2 = np.zeros(int(dst.max()) + 16, dtype=np.int64), np.zeros(int(dst.max()) + 16, dtype=np.int64)
    a[:] = rng.integers(0, 1 << 40, len(a))
    for s, d, n in zip(src, dst, lengths):
        b1[d:d + n] = a[s:s + n]
    for s, d, n in zip(plan.src_offsets, plan.dst_offsets, plan.lengths):
        b2[d:d + n] = a[s:s + n]
    assert np.array_equal(b1, b2) and len(plan) < 200 and plan.nbytes == lengths.sum()


@pytest.mark.parametrize("tables", ["random", "runs"])
@pytest.mark.parametrize("direct", [False, True], ids=["pool", "direct"])
def test_every_layer_at_once_plans_what_each_layer_alone_does(tables, direct):
    """layout.plan_layers (a layered hand-off's layers laid out together) against plan_into per
    layer: the same ranges, merged the same way, into a pool or another cache's blocks."""
    rng = np.random.default_rng(7)
    kv = KVLayout(6, 64, 96, 96, tuple(o * 64 * 96 + 32 for o in (5, 0, 3, 1, 4, 2)))
    dst = KVLayout(6, 80, 96, 96, tuple(o * 80 * 96 for o in range(6))) if direct else PoolLayout(6, 40, 96)
    n_dst = 80 if direct else 40
    if tables == "random":
        blocks, to = rng.choice(64, 30, replace=False), rng.choice(n_dst, 30, replace=False)
    else:  # runs of consecutive blocks into consecutive places: ranges merge (the same way in every layer)
        blocks = np.r_[10:18, 30:34, 40:41, 50:60]
        to = np.r_[0:8, 20:22, 24:26, 8:9, 30:40] if direct else np.r_[0:8, 20:22, 24:26, 8:9, 12:22]
    each = plan_layers(kv, dst, blocks=blocks, to=to)
    assert len(each) == kv.num_layers
    for layer, got in enumerate(each):
        want = plan_into(kv, dst, blocks=blocks, to=to, layers=[layer])
        assert np.array_equal(got.src_offsets, want.src_offsets)
        assert np.array_equal(got.dst_offsets, want.dst_offsets)
        assert np.array_equal(got.lengths, want.lengths)
    if tables == "runs":
        assert len(each[0]) < len(blocks)  # (merged: the case is one)
    with pytest.raises(ValueError, match="out of range"):
        plan_layers(kv, dst, blocks=[0, 64], to=[0, 1])


def test_out_of_range_ids_and_writes_are_refused():
    kv = KVLayout(num_layers=1, num_blocks=4, block_bytes=64, block_stride=64, layer_offsets=(0,))
    pool = PoolLayout(1, 2, 64)
    with pytest.raises(ValueError, match="block id"):
        plan_cache_to_pool(kv, pool, blocks=[4], pages=[0])
    with pytest.raises(ValueError, match="page index"):
        plan_cache_to_pool(kv, pool, blocks=[0], pages=[2])
    with pytest.raises(ValueError, match="equal-length"):
        plan_cache_to_pool(kv, pool, blocks=[0, 1], pages=[0])
    plan = plan_cache_to_pool(kv, pool, blocks=[3], pages=[1])
    with pytest.raises(ValueError, match="outside the destination"):
        copy_ranges(torch.zeros(256, dtype=torch.uint8), torch.zeros(100, dtype=torch.uint8), plan)
    with pytest.raises(ValueError, match="outside the source"):
        copy_ranges(torch.zeros(100, dtype=torch.uint8), torch.zeros(256, dtype=torch.uint8), plan)


def test_unsupported_kv_layouts_are_refused():
    with pytest.raises(ValueError, match="no KV cache layers"):
        kv_layout_of([])
    t = torch.zeros(4, 2, 8, 6)[:, :, :, :4]  # blocks not contiguous
    with pytest.raises(ValueError, match="not contiguous"):
        kv_layout_of([t])
    with pytest.raises(ValueError, match="differ in shape"):
        kv_layout_of([torch.zeros(4, 2, 8, 4), torch.zeros(5, 2, 8, 4)])


def test_flat_bytes_covers_the_whole_storage():
    t = torch.arange(12, dtype=torch.int32).view(3, 4)[1:]
    fb = flat_bytes(t)
    assert fb.numel() == 48 and fb.data_ptr() == t.untyped_storage().data_ptr()


def test_copy_ranges_ref_is_what_copy_ranges_does():
    src = torch.arange(256, dtype=torch.int32).view(torch.uint8)
    a, b = torch.zeros(1024, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)
    plan = coalesce(np.array([0, 100, 500]), np.array([10, 600, 900]), np.array([50, 200, 100]))
    copy_ranges(src, a, plan)
    copy_ranges_ref(src, b, plan)
    assert torch.equal(a, b) and a.any()


def test_blocks_for_tokens():
    assert [blocks_for_tokens(n, 128) for n in (1, 127, 128, 129, 1900)] == [1, 1, 1, 2, 15]
