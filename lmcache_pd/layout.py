"""KV layout and transfer plans: the only model-specific arithmetic (L1; numpy only).

vLLM hands each worker block-outer per-layer views (``[num_blocks, ...]``): vLLM 0.32 into
one backing buffer, vLLM 0.24 one buffer per layer. Either way block ``b`` of layer ``l`` is one
contiguous run of ``block_bytes`` at ``layer_offsets[l] + b * block_stride`` bytes from the
start of the lowest buffer (``extents`` lists the buffers when there are several). We copy
whole blocks as bytes, so the page content format (token- or head-major, CPU ISA packing) does
not matter as long as both sides agree (the compat hash).

The decode pool is laid out layer-major, ``[num_layers][num_pages][block_bytes]``: a *page*
holds one block of every layer, and consecutive pages of one layer are adjacent in memory, so a
run of consecutive vLLM blocks going to consecutive pages becomes one range per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KVLayout:
    """Where the blocks of a paged KV cache are, in bytes from the start of its buffer."""

    num_layers: int
    num_blocks: int
    block_bytes: int
    """Bytes of one block of one layer (H * N * C * itemsize)."""
    block_stride: int
    """Bytes between block b and b+1 of one layer."""
    layer_offsets: tuple[int, ...]
    """Byte offset of block 0 of each layer from the buffer start."""
    extents: tuple[tuple[int, int], ...] = ()
    """(offset, bytes) of each separate buffer inside the span, when the layers live in several
    (vLLM 0.24 allocates one per layer); empty: one buffer, all of it memory."""

    @property
    def page_bytes(self) -> int:
        """Bytes of one pool page: one block of every layer."""
        return self.num_layers * self.block_bytes

    def buffer_extent(self) -> int:
        """Bytes from the buffer start to the end of the last block of the last layer."""
        return max(self.layer_offsets) + (self.num_blocks - 1) * self.block_stride + self.block_bytes


@dataclass(frozen=True)
class PoolLayout:
    """Geometry of the decode-side pool: ``[num_layers][num_pages][block_bytes]``."""

    num_layers: int
    num_pages: int
    block_bytes: int

    @property
    def page_bytes(self) -> int:
        return self.num_layers * self.block_bytes

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.page_bytes

    @classmethod
    def sized(cls, kv: KVLayout, pool_bytes: int) -> PoolLayout:
        return cls(kv.num_layers, pool_bytes // kv.page_bytes, kv.block_bytes)


@dataclass(frozen=True)
class RangePlan:
    """Byte ranges to copy: ``src[src_offsets[i]:+lengths[i]] -> dst[dst_offsets[i]:+lengths[i]]``."""

    src_offsets: np.ndarray
    dst_offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    def swapped(self) -> RangePlan:
        return RangePlan(self.dst_offsets, self.src_offsets, self.lengths)


def _checked(kv: KVLayout, blocks: np.ndarray | list[int], to: np.ndarray | list[int], *, dst_blocks: int,
             what: str, layers: range | list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``blocks`` and ``to`` as int64 vectors and the layers to copy, each checked in range
    (``what``: the destination ids, ``dst_blocks`` of them)."""
    blocks, to = np.asarray(blocks, dtype=np.int64), np.asarray(to, dtype=np.int64)
    if blocks.shape != to.shape or blocks.ndim != 1:
        raise ValueError(f"blocks {blocks.shape} and their destinations {to.shape} must be equal-length vectors")
    which = np.arange(kv.num_layers, dtype=np.int64) if layers is None else np.asarray(layers, dtype=np.int64)
    for ids, n, name in ((blocks, kv.num_blocks, "block id"), (to, dst_blocks, what), (which, kv.num_layers, "layer")):
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"{name} out of range [0, {n})")
    return blocks, to, which


def _from_blocks(kv: KVLayout, blocks: np.ndarray, which: np.ndarray, dst: np.ndarray) -> RangePlan:
    """Ranges from blocks ``blocks`` of layers ``which`` to ``dst`` (``[L, n]`` byte offsets)."""
    src = np.asarray(kv.layer_offsets, dtype=np.int64)[which][:, None] + blocks[None, :] * kv.block_stride  # [L, n]
    lengths = np.full(src.shape, kv.block_bytes, dtype=np.int64)
    return coalesce(src.reshape(-1), dst.reshape(-1), lengths.reshape(-1), owned=True)


def plan_cache_to_pool(kv: KVLayout, pool: PoolLayout, *, blocks: np.ndarray | list[int],
                       pages: np.ndarray | list[int], layers: range | list[int] | None = None) -> RangePlan:
    """Ranges copying vLLM blocks ``blocks[i]`` into pool page ``pages[i]``: every layer, or only
    ``layers`` (a layered hand-off sends each layer as it is computed).

    Adjacent ranges are merged, so consecutive blocks to consecutive pages cost one range
    per layer. Raises ValueError on out-of-range ids rather than producing a wild copy.
    """
    if pool.block_bytes != kv.block_bytes or pool.num_layers != kv.num_layers:
        raise ValueError("pool geometry does not match the KV layout")
    blocks, pages, which = _checked(kv, blocks, pages, dst_blocks=pool.num_pages, what="page index", layers=layers)
    return _from_blocks(kv, blocks, which, (which[:, None] * pool.num_pages + pages[None, :]) * kv.block_bytes)


def plan_cache_to_cache(src: KVLayout, dst: KVLayout, *, blocks: np.ndarray | list[int],
                        to: np.ndarray | list[int], layers: range | list[int] | None = None) -> RangePlan:
    """Ranges copying blocks ``blocks[i]`` of one paged cache into blocks ``to[i]`` of another
    of the same geometry (a direct hand-off: the prefill writes straight into the decode's vLLM
    blocks); every layer, or ``layers``. Layer-major like :func:`plan_cache_to_pool`, so a
    digest over either plan's bytes agrees. Raises ValueError on out-of-range ids."""
    if src.block_bytes != dst.block_bytes or src.num_layers != dst.num_layers:
        raise ValueError("the two caches' geometries differ")
    blocks, to, which = _checked(src, blocks, to, dst_blocks=dst.num_blocks, what="destination block id",
                                 layers=layers)
    return _from_blocks(src, blocks, which,
                        np.asarray(dst.layer_offsets, dtype=np.int64)[which][:, None] + to[None, :] * dst.block_stride)


def plan_layers(kv: KVLayout, dst: PoolLayout | KVLayout, *, blocks: np.ndarray | list[int],
                to: np.ndarray | list[int]) -> list[RangePlan]:
    """:func:`plan_into` of each layer alone, every layer from one pass of vector work: element
    ``l`` holds the ranges of ``plan_into(kv, dst, blocks=blocks, to=to, layers=[l])``.

    A layered hand-off lays out every layer of its last chunk when its pages are granted, on
    the prefill's process while its forward runs (node/layered.py): there a plan per layer,
    each a dozen small numpy calls, was most of the sender's time holding the GIL that the
    forward's thread needs (docs/benchmarks.md). Which ranges merge is the same for every
    layer (a layer shifts both sides of all its ranges by one offset), so it is found once."""
    if isinstance(dst, KVLayout):
        if kv.block_bytes != dst.block_bytes or kv.num_layers != dst.num_layers:
            raise ValueError("the two caches' geometries differ")
        blocks, to, which = _checked(kv, blocks, to, dst_blocks=dst.num_blocks, what="destination block id",
                                     layers=None)
        dst_at = np.asarray(dst.layer_offsets, dtype=np.int64)[:, None] + to[None, :] * dst.block_stride
    else:
        if dst.block_bytes != kv.block_bytes or dst.num_layers != kv.num_layers:
            raise ValueError("pool geometry does not match the KV layout")
        blocks, to, which = _checked(kv, blocks, to, dst_blocks=dst.num_pages, what="page index", layers=None)
        dst_at = (which[:, None] * dst.num_pages + to[None, :]) * kv.block_bytes
    src_at = np.asarray(kv.layer_offsets, dtype=np.int64)[:, None] + blocks[None, :] * kv.block_stride  # [L, n]
    n = len(blocks)
    lengths = np.full(n, kv.block_bytes, dtype=np.int64)
    if n <= 1 or not (cont := _continues(src_at[0], dst_at[0], lengths)).any():
        return [RangePlan(src_at[layer], dst_at[layer], lengths) for layer in range(kv.num_layers)]
    keep = np.empty(n, dtype=bool)
    keep[0] = True
    np.logical_not(cont, out=keep[1:])
    starts = np.flatnonzero(keep)
    ends = np.append(starts[1:], n)
    merged = (ends - starts) * kv.block_bytes
    src_at, dst_at = src_at[:, starts], dst_at[:, starts]
    return [RangePlan(src_at[layer], dst_at[layer], merged) for layer in range(kv.num_layers)]


def plan_into(kv: KVLayout, dst: PoolLayout | KVLayout, *, blocks: np.ndarray | list[int],
              to: np.ndarray | list[int], layers: range | list[int] | None = None) -> RangePlan:
    """Blocks of ``kv`` into pool pages ``to`` (``dst`` a pool) or into blocks ``to`` of another
    cache (``dst`` a KV layout: a direct hand-off)."""
    if isinstance(dst, KVLayout):
        return plan_cache_to_cache(kv, dst, blocks=blocks, to=to, layers=layers)
    return plan_cache_to_pool(kv, dst, blocks=blocks, pages=to, layers=layers)


def coalesce(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, *, owned: bool = False) -> RangePlan:
    """Merge range i into i-1 when both its source and destination continue the previous one.

    On the hand-off's path (16K ranges for 8K tokens): no Python lists, and no gathers when
    nothing merges (random block tables rarely do). ``owned``: the arrays are the caller's
    fresh temporaries and may become the plan's without a copy."""
    n = len(lengths)
    if n <= 1 or not (cont := _continues(src, dst, lengths)).any():
        return RangePlan(src, dst, lengths) if owned else RangePlan(src.copy(), dst.copy(), lengths.copy())
    keep = np.empty(n, dtype=bool)
    keep[0] = True
    np.logical_not(cont, out=keep[1:])
    starts = np.flatnonzero(keep)
    csum = np.empty(n + 1, dtype=np.int64)
    csum[0] = 0
    np.cumsum(lengths, out=csum[1:])
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = n
    return RangePlan(src[starts], dst[starts], csum[ends] - csum[starts])


def _continues(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[i]``: range i + 1 starts where range i ends, on both sides."""
    cont = src[1:] == src[:-1] + lengths[:-1]
    cont &= dst[1:] == dst[:-1] + lengths[:-1]
    return cont


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
