"""Which KV heads each tensor-parallel rank holds, and how a prefill of TP ``p`` hands its heads
to a decode of TP ``d`` (L2, beside ops: it plans byte ranges; issue 20, docs/tensor_parallel.md).

vLLM shards a model's KV heads over the TP ranks in contiguous runs: with ``H`` KV heads and TP
``t <= H`` (``H % t == 0``), rank ``r`` holds heads ``[r * H/t, (r+1) * H/t)``; with ``t > H``
(``t % H == 0``) every head is replicated on ``t/H`` ranks, rank ``r`` holding head
``r // (t/H)``. So one decode rank's heads come from one prefill rank (``p <= d``: a prefill rank's
heads split over several decode ranks) or from several (``p > d``: merged), and a head held by
several prefill ranks (replicated) is sent by the first of them only.

Within one block of one layer the KV cache lays heads outermost (``LBHNC``, the layout our
connector asks vLLM for, and ``groups`` times over when K and V are sections of one block): a
run of heads is a run of bytes, so a hand-off between different TP sizes is the same range copy
as between equal ones, cut at head boundaries, written straight into the decode rank's pool pages
(:func:`plan_heads`). No staging copy on either side. Where several prefill ranks write the
same pages (a narrower decode), each writes its heads into a section of its own per run of
consecutive pages (:func:`page_sections`), so its bytes stay one range per layer and run; the
decode's scatter reads them back from there into its blocks (:func:`plan_sections`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmcache_pd.errors import ConfigError
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan, coalesce


@dataclass(frozen=True)
class HeadSlice:
    """Heads one prefill rank sends one decode rank: ``count`` heads, from the ``src_head``-th of
    the prefill rank's own heads to the ``dst_head``-th of the decode rank's."""

    src_rank: int
    dst_rank: int
    src_head: int
    dst_head: int
    count: int


def rank_heads(num_kv_heads: int, tp: int, *, field: str = "tp_size") -> list[tuple[int, int]]:
    """Per rank, ``(first head, how many)`` of the model's KV heads it holds. Raises ConfigError
    naming ``field`` when the heads cannot be split over ``tp`` ranks (as vLLM would refuse)."""
    if tp < 1 or num_kv_heads < 1:
        raise ConfigError(f"needs at least one rank and one KV head (tp {tp}, {num_kv_heads} KV heads)", field=field)
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ConfigError(f"{num_kv_heads} KV heads do not split over {tp} ranks", field=field)
        n = num_kv_heads // tp
        return [(r * n, n) for r in range(tp)]
    if tp % num_kv_heads:
        raise ConfigError(f"{tp} ranks cannot each hold a copy of one of {num_kv_heads} KV heads", field=field)
    per = tp // num_kv_heads
    return [(r // per, 1) for r in range(tp)]


def head_map(num_kv_heads: int, prefill_tp: int, decode_tp: int, *, prefill_field: str = "prefill.tp_size",
             decode_field: str = "decode.tp_size") -> list[HeadSlice]:
    """Every slice of heads that goes from a prefill rank to a decode rank: each head each decode
    rank holds comes from exactly one prefill rank (the lowest of those holding it). Ordered by
    decode rank, then head."""
    src = rank_heads(num_kv_heads, prefill_tp, field=prefill_field)
    dst = rank_heads(num_kv_heads, decode_tp, field=decode_field)
    owner = {}  # head -> (its first prefill rank, its index there)
    for r, (first, n) in enumerate(src):
        for i in range(n):
            owner.setdefault(first + i, (r, i))
    out: list[HeadSlice] = []
    for d, (first, n) in enumerate(dst):
        for j in range(n):
            r, i = owner[first + j]
            last = out[-1] if out else None
            if last and (last.src_rank, last.dst_rank) == (r, d) and last.src_head + last.count == i \
                    and last.dst_head + last.count == j:
                out[-1] = HeadSlice(r, d, last.src_head, last.dst_head, last.count + 1)
            else:
                out.append(HeadSlice(r, d, i, j, 1))
    return out


def senders_of(slices: list[HeadSlice], decode_rank: int) -> list[int]:
    """The prefill ranks whose heads a decode rank receives (a hand-off to it completes when each
    of them has landed its part)."""
    return sorted({s.src_rank for s in slices if s.dst_rank == decode_rank})


def describe(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[str]:
    """The mapping in words (``check-config`` prints it)."""
    src = rank_heads(num_kv_heads, prefill_tp, field="prefill.0.tp_size")
    slices = head_map(num_kv_heads, prefill_tp, decode_tp, prefill_field="prefill.0.tp_size",
                      decode_field="decode.0.tp_size")
    lines = []
    for s in slices:
        a = src[s.src_rank][0] + s.src_head
        lines.append(f"prefill rank {s.src_rank} -> decode rank {s.dst_rank}: KV heads {a}..{a + s.count - 1}")
    idle = sorted(set(range(prefill_tp)) - {s.src_rank for s in slices})
    if idle:  # (their heads are copies: a lower rank sends them)
        lines.append(f"prefill rank{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))}: nothing "
                     "(copies of heads a lower rank sends)")
    return lines


def plan_heads(kv: KVLayout, pool: PoolLayout, piece: HeadSlice, *, head_bytes: int, groups: int = 1,
               blocks: np.ndarray | list[int], pages: np.ndarray | list[int],
               layers: range | list[int] | None = None, among: np.ndarray | list[int] | None = None) -> RangePlan:
    """Ranges copying ``piece``'s heads of the prefill rank's vLLM blocks ``blocks[i]`` (layout
    ``kv``: its own heads, ``head_bytes`` each per block and layer, ``groups`` sections of
    ``[heads][...]`` per block) into the decode rank's pool page ``pages[i]`` (``pool``: the decode
    rank's heads). A piece of all the decode rank's heads fills whole pages as any hand-off
    does; a piece of some of them (a narrower decode: several writers per page) goes to its
    *section* of the pages (:func:`page_sections`), ``among`` being every page of the
    reservation (default ``pages``; a plan of some of them must name all). Raises ValueError for
    ids out of range or geometry that does not add up."""
    src_heads, rem = divmod(kv.block_bytes, groups * head_bytes)
    dst_heads, rem2 = divmod(pool.block_bytes, groups * head_bytes)
    if rem or rem2 or pool.num_layers != kv.num_layers:
        raise ValueError("blocks are not whole heads of head_bytes, or the layer counts differ")
    if piece.src_head + piece.count > src_heads or piece.dst_head + piece.count > dst_heads:
        raise ValueError(f"heads {piece} outside the ranks' {src_heads} and {dst_heads} heads")
    blocks, pages = np.asarray(blocks, dtype=np.int64), np.asarray(pages, dtype=np.int64)
    if blocks.shape != pages.shape or blocks.ndim != 1:
        raise ValueError("blocks and pages must be equal-length vectors")
    which = np.arange(kv.num_layers, dtype=np.int64) if layers is None else np.asarray(layers, dtype=np.int64)
    for ids, n, name in ((blocks, kv.num_blocks, "block id"), (pages, pool.num_pages, "page index"),
                         (which, kv.num_layers, "layer")):
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"{name} out of range [0, {n})")
    g = np.arange(groups, dtype=np.int64)
    src = (np.asarray(kv.layer_offsets, dtype=np.int64)[which][:, None, None] + blocks[None, :, None] * kv.block_stride
           + g[None, None, :] * src_heads * head_bytes + piece.src_head * head_bytes)  # [L, n, groups]
    if piece.count == dst_heads:  # whole pages: the pool's own layout
        base, group_stride = pages * pool.block_bytes, dst_heads * head_bytes
    else:
        base = page_sections(pool, pages, pages if among is None else among, piece.dst_head, piece.count,
                             groups * head_bytes)
        group_stride = piece.count * head_bytes
    dst = (which[:, None, None] * pool.num_pages * pool.block_bytes + base[None, :, None]
           + g[None, None, :] * group_stride)
    lengths = np.full(src.shape, piece.count * head_bytes, dtype=np.int64)
    return coalesce(src.reshape(-1), dst.reshape(-1), lengths.reshape(-1), owned=True)


def page_sections(pool: PoolLayout, pages: np.ndarray, among: np.ndarray | list[int], dst_head: int, count: int,
                  head_bytes: int) -> np.ndarray:
    """Where heads ``[dst_head, dst_head + count)`` of pages ``pages`` start, in bytes from the
    start of a layer's part of the pool, when several writers share the pages (``head_bytes``:
    of one head across a block's groups).

    Each run of consecutive page ids among the reservation's pages ``among`` (all of them the
    reservation's, so nothing of another is inside) is cut into one section per writer, in head
    order: a writer's heads of every page of the run, page after page. Its bytes of a run are
    then one range per layer, as a whole-page writer's are, where heads cut into each page would
    be one range per page, layer and group (over nixl, a descriptor each: 65,536 per GiB instead
    of 32, docs/benchmarks.md). With all the heads (one writer) it is the pool's own layout. The
    decode's scatter (:func:`plan_sections`) reads them from the same places."""
    if count <= 0:
        raise ValueError("a section of no heads")
    runs = np.unique(np.asarray(among, dtype=np.int64))
    at = np.searchsorted(runs, pages)
    if len(pages) and (at.max() >= len(runs) or not np.array_equal(runs[at], pages)):
        raise ValueError("pages outside the reservation's pages")
    breaks = np.flatnonzero(np.diff(runs) != 1) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [len(runs)])))
    run = np.repeat(np.arange(len(starts)), lengths)[at]
    first, n = runs[starts][run], lengths[run]
    return first * pool.block_bytes + n * dst_head * head_bytes + (pages - first) * count * head_bytes


def plan_sections(kv: KVLayout, pool: PoolLayout, sections: tuple[tuple[int, int], ...] | list[tuple[int, int]], *,
                  blocks: np.ndarray | list[int], pages: np.ndarray | list[int], among: np.ndarray | list[int],
                  layers: range | list[int] | None = None, groups: int = 1) -> RangePlan:
    """The decode rank's scatter of a reservation its ``sections`` writers (``(first head, how
    many)`` of its heads each, together all of them) shared: pool pages ``pages[i]`` (of
    ``among``, the reservation's) into its vLLM blocks ``blocks[i]``, each writer's heads from
    its section (:func:`page_sections`) to their place in the block (``groups`` as the writers'
    :func:`plan_heads` had it)."""
    total = sum(n for _, n in sections)
    head_bytes, rem = divmod(kv.block_bytes, max(1, total) * groups)
    if rem or pool.block_bytes != kv.block_bytes:
        raise ValueError(f"sections of {total} heads do not fill blocks of {kv.block_bytes} bytes")
    plans = [plan_heads(kv, pool, HeadSlice(0, 0, first, first, n), head_bytes=head_bytes, groups=groups, blocks=blocks,
                        pages=pages, layers=layers, among=among) for first, n in sections]
    return RangePlan(*(np.concatenate([getattr(p, f) for p in plans]) for f in ("dst_offsets", "src_offsets", "lengths")))
