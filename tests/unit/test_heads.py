"""The KV head mapping between TP sizes (heads.py): for every prefill and decode TP size up to 8,
with heads split, merged and replicated, and K/V as one or two sections of a block, the ranges
from every prefill rank's own blocks land each decode rank's heads in its pool pages, every byte
of them once, and the decode's scatter puts them in its own blocks bitwise; a mapping that
cannot work is refused naming its field."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmcache_pd.errors import ConfigError
from lmcache_pd.heads import describe, head_map, plan_heads, plan_sections, rank_heads, senders_of
from lmcache_pd.layout import KVLayout, PoolLayout, plan_cache_to_pool
from lmcache_pd.ops import copy_ranges

LAYERS, BLOCKS, PAGES, HEAD_BYTES = 3, 12, 10, 64
SIZES = (1, 2, 4, 8)


def rank_cache(full: np.ndarray, first: int, n: int) -> tuple[KVLayout, torch.Tensor]:
    """One rank's KV cache: its heads of every block, ``[layer][block][group][head][bytes]``."""
    mine = np.ascontiguousarray(full[:, :, :, first:first + n, :])
    block = mine.shape[2] * n * HEAD_BYTES
    kv = KVLayout(num_layers=LAYERS, num_blocks=BLOCKS, block_bytes=block, block_stride=block,
                  layer_offsets=tuple(layer * BLOCKS * block for layer in range(LAYERS)))
    return kv, torch.from_numpy(mine.reshape(-1).copy())


def dst_runs(plan) -> int:
    """Runs of consecutive destination bytes in a plan (what nixl's staging posts one write each for)."""
    order = np.argsort(plan.dst_offsets, kind="stable")
    d, n = plan.dst_offsets[order], plan.lengths[order]
    return 1 + int(np.count_nonzero(d[1:] != d[:-1] + n[:-1])) if len(d) else 0


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(("heads", "p", "d"), [(h, p, d) for h in (8, 2) for p, d in itertools.product(SIZES, SIZES)])
def test_every_decode_rank_gets_its_heads_from_the_prefill_ranks_bitwise(heads, p, d, groups):
    """Through the pool and the decode's scatter into its own blocks; the pages (in no order) make
    two runs of consecutive ids, where each writer of a share of them writes one range per layer
    and run (its section, heads.page_sections)."""
    rng = np.random.default_rng(heads * 100 + p * 10 + d)
    full = rng.integers(0, 256, (LAYERS, BLOCKS, groups, heads, HEAD_BYTES), dtype=np.uint8)
    src, dst = rank_heads(heads, p), rank_heads(heads, d)
    caches = [rank_cache(full, first, n) for first, n in src]
    blocks = rng.permutation(BLOCKS)[:5]
    pages = rng.permutation(np.array([1, 2, 3, 6, 7]))
    slices = head_map(heads, p, d)
    for q, (first, n) in enumerate(dst):
        pool = PoolLayout(LAYERS, PAGES, groups * n * HEAD_BYTES)
        buf = torch.zeros(pool.nbytes, dtype=torch.uint8)
        written = torch.zeros(pool.nbytes, dtype=torch.int32)
        mine = [s for s in slices if s.dst_rank == q]
        assert sum(s.count for s in mine) == n  # every head of the decode rank, once
        for s in mine:
            kv, cache = caches[s.src_rank]
            plan = plan_heads(kv, pool, s, head_bytes=HEAD_BYTES, groups=groups, blocks=blocks, pages=pages)
            copy_ranges(cache, buf, plan)
            for o, ln in zip(plan.dst_offsets.tolist(), plan.lengths.tolist()):
                written[o:o + ln] += 1
            if len(mine) > 1:  # a share of the pages: its section, one range per layer and run
                assert dst_runs(plan) == LAYERS * 2, (p, d, q, s)
        counts = written.numpy().reshape(LAYERS, PAGES, -1)
        assert (counts[:, pages] == 1).all() and counts.sum() == LAYERS * len(pages) * groups * n * HEAD_BYTES
        # The decode rank scatters its pages into its own blocks (whole pages, or the writers' sections).
        dkv, _ = rank_cache(full, first, n)
        dblocks = rng.permutation(BLOCKS)[:5]
        if len(mine) > 1:
            back = plan_sections(dkv, pool, [(s.dst_head, s.count) for s in mine], blocks=dblocks, pages=pages,
                                 among=pages, groups=groups)
        else:
            back = plan_cache_to_pool(dkv, pool, blocks=dblocks, pages=pages).swapped()
        got = torch.zeros(LAYERS * BLOCKS * groups * n * HEAD_BYTES, dtype=torch.uint8)
        copy_ranges(buf, got, back)
        got = got.numpy().reshape(LAYERS, BLOCKS, groups, n, HEAD_BYTES)
        assert np.array_equal(got[:, dblocks], full[:, blocks, :, first:first + n, :]), (p, d, q)
        assert senders_of(slices, q) == sorted({s.src_rank for s in mine})
    if p <= heads and d <= heads:  # no replication: a decode rank hears from max(1, p / d) prefill ranks
        assert all(len(senders_of(slices, q)) == max(1, p // d) for q in range(d))


def test_a_share_of_some_of_the_pages_goes_where_the_share_of_all_of_them_goes():
    """A writer plans its batches of some of a hand-off's pages (group_mib, layers): with
    ``among`` naming all of them, the places are those of one plan of all; pages outside
    ``among`` are refused."""
    kv, _ = rank_cache(np.zeros((LAYERS, BLOCKS, 1, 2, HEAD_BYTES), dtype=np.uint8), 0, 2)
    pool = PoolLayout(LAYERS, PAGES, 4 * HEAD_BYTES)
    piece = head_map(4, 2, 1)[0]  # rank 0's two heads of the decode's four
    blocks, pages = [5, 0, 3, 9], [4, 5, 6, 8]
    whole = plan_heads(kv, pool, piece, head_bytes=HEAD_BYTES, blocks=blocks, pages=pages)
    parts = [plan_heads(kv, pool, piece, head_bytes=HEAD_BYTES, blocks=blocks[a:b], pages=pages[a:b], among=pages)
             for a, b in ((0, 1), (1, 3), (3, 4))]
    assert sorted(zip(whole.src_offsets, whole.dst_offsets)) == \
        sorted(x for part in parts for x in zip(part.src_offsets, part.dst_offsets))
    alone = plan_heads(kv, pool, piece, head_bytes=HEAD_BYTES, blocks=blocks[1:3], pages=pages[1:3])
    assert sorted(alone.dst_offsets) != sorted(parts[1].dst_offsets)  # (a run of 2 pages, not 3: another place)
    with pytest.raises(ValueError, match="outside the reservation"):
        plan_heads(kv, pool, piece, head_bytes=HEAD_BYTES, blocks=[1], pages=[7], among=pages)


def test_replicated_heads_are_sent_once_by_the_first_rank_holding_them():
    # 2 KV heads on 8 prefill ranks (4 copies each) to 2 decode ranks: ranks 0 and 4 send.
    assert [(s.src_rank, s.dst_rank) for s in head_map(2, 8, 2)] == [(0, 0), (4, 1)]
    assert describe(2, 8, 2) == ["prefill rank 0 -> decode rank 0: KV heads 0..0",
                                 "prefill rank 4 -> decode rank 1: KV heads 1..1",
                                 "prefill ranks 1, 2, 3, 5, 6, 7: nothing (copies of heads a lower rank sends)"]
    assert describe(8, 1, 2) == ["prefill rank 0 -> decode rank 0: KV heads 0..3",
                                 "prefill rank 0 -> decode rank 1: KV heads 4..7"]


@pytest.mark.parametrize(("heads", "tp"), [(6, 4), (4, 6), (2, 3), (0, 1)])
def test_heads_that_do_not_split_are_refused_naming_the_field(heads, tp):
    with pytest.raises(ConfigError) as e:
        head_map(heads, tp, 1, prefill_field="prefill.0.tp_size")
    assert e.value.field == "prefill.0.tp_size"
    with pytest.raises(ConfigError) as e:
        head_map(heads, 1, tp, decode_field="decode.0.tp_size")
    assert e.value.field == ("decode.0.tp_size" if heads else "prefill.tp_size")  # (no heads: the prefill's first)


def test_plans_outside_the_geometry_are_refused():
    kv, _ = rank_cache(np.zeros((LAYERS, BLOCKS, 1, 8, HEAD_BYTES), dtype=np.uint8), 0, 4)
    pool = PoolLayout(LAYERS, PAGES, 2 * HEAD_BYTES)
    (s, _) = head_map(8, 2, 4)[:2]
    for bad in (dict(blocks=[BLOCKS], pages=[0]), dict(blocks=[0], pages=[PAGES]), dict(blocks=[0, 1], pages=[0])):
        with pytest.raises(ValueError):
            plan_heads(kv, pool, s, head_bytes=HEAD_BYTES, **bad)
    with pytest.raises(ValueError):
        plan_heads(kv, pool, s, head_bytes=HEAD_BYTES * 3, blocks=[0], pages=[0])
