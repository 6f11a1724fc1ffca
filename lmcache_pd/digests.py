"""Digests of KV bytes (L2, above ops): what ``integrity.verify`` checks and the node cache
daemon's chunks carry.

Two formulas, one value each side of a hand-off:
- the device formula (:func:`_digest`): a sum, mod 2**64, over 8-byte words weighted by their
  index in their pool block and by the block's place in the pool; on a GPU one pass of the
  digest kernel (``csrc/digest.cu``, launched through ops), elsewhere the torch formula.
  Additive: :func:`plan_sum` of the plans that together write pages whole adds up to
  :func:`pool_sum` of those pages (several writers of one page, between TP sizes);
- in host memory CRC-32 in place order (:func:`cache_digest`, :func:`pool_digest`: about twice
  the speed of the device formula on a CPU), for whole blocks.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan
from lmcache_pd.ops import copy_ranges_summed, cuda_kernels_available, kernels_for, upload

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as int64: odd, so every weight is invertible


_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _digest(units: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """Sum, mod 2**64, over blocks of (sum of the block's 8-byte words times odd weights by their
    index in the block) times an odd multiplier drawn from where the block lands in the pool.
    ``units``: [n, bytes] uint8; ``places``: [n] byte offsets in the pool. Odd factors are
    invertible mod 2**64: one changed word, or a block in another place, changes the sum."""
    words = units.contiguous().view(torch.int64)  # [n, bytes / 8]
    key = (words.shape[1], str(units.device))
    w = _WEIGHTS.get(key)
    if w is None:
        w = torch.arange(1, words.shape[1] + 1, dtype=torch.int64, device=units.device)
        w = _WEIGHTS[key] = w.mul_(_GOLDEN).bitwise_or_(1)
    per_block = (words * w).sum(dim=1)
    return (per_block * places.mul(_GOLDEN).bitwise_or_(1)).sum()


def _crc_in_place_order(buffer: torch.Tensor, places: list[tuple[int, int]], block_bytes: int) -> int:
    """Host memory: CRC-32 of the blocks in the order of their places in the pool (zlib reads
    them in place, about twice the speed of the GPU formula run on a CPU). ``places``: (place in
    the pool, offset in ``buffer``) per block. A block in another place changes the order."""
    view = memoryview(buffer.numpy()).cast("B")
    crc = 0
    for _, off in sorted(places):
        crc = zlib.crc32(view[off:off + block_bytes], crc)
    return crc


def cache_digest(kv: KVLayout, buffer: torch.Tensor, blocks: Sequence[int], pool: PoolLayout,
                 pages: Sequence[int], *, lazy: bool = False) -> int | torch.Tensor:
    """Digest of vLLM blocks ``blocks`` (every layer), as they are to land in pool ``pages``: the
    prefill's side of ``integrity.verify``. Equal to :func:`pool_digest` of those pages when
    every byte landed in its place; any single changed or misplaced word changes it. A fast
    check against corruption, not a cryptographic one (the session is authenticated): on a GPU
    the weighted sum of ``_digest``, in host memory CRC-32 in place order (both sides of a
    hand-off hold their KV on the same kind of device: the handshake's compat checks it).
    ``lazy`` (a GPU): the sum as a device scalar, not waited for (the caller reads many at once)."""
    if not buffer.is_cuda:
        places = [((layer * pool.num_pages + page) * pool.block_bytes, base + block * kv.block_stride)
                  for layer, base in enumerate(kv.layer_offsets) for block, page in zip(blocks, pages)]
        return _crc_in_place_order(buffer, places, kv.block_bytes)
    if cuda_kernels_available()[0]:
        offs = (np.asarray(kv.layer_offsets, dtype=np.int64)[:, None]
                + np.asarray(blocks, dtype=np.int64)[None, :] * kv.block_stride)
        got = _kernel_digest(buffer, offs.reshape(-1), _places(pool, pages), kv.block_bytes)
    else:
        got = _cache_sum(kv, buffer, blocks, pool, pages)
    return got if lazy else int(got.item())


def _places(pool: PoolLayout, pages: Sequence[int]) -> np.ndarray:
    """Byte offsets in the pool of pages ``pages`` of every layer, layer-major."""
    layers = np.arange(pool.num_layers, dtype=np.int64)[:, None] * pool.num_pages
    return ((layers + np.asarray(pages, dtype=np.int64)[None, :]) * pool.block_bytes).reshape(-1)


def _kernel_digest(buffer: torch.Tensor, offsets: np.ndarray, places: np.ndarray, unit_bytes: int) -> torch.Tensor:
    """The digest in one pass over the bytes (csrc/digest.cu), on the current stream; the same
    value as the torch formula (``_digest``): a signed 64-bit device scalar."""
    if unit_bytes % 8:
        raise ValueError("digest units must be whole 8-byte words")
    dev = buffer.device
    offs, pl = upload(offsets, dev), upload(places, dev)
    out = torch.zeros(1, dtype=torch.int64, device=dev)
    n = len(offsets)
    if n:
        k = kernels_for(dev.index if dev.index is not None else torch.cuda.current_device())
        k.launch("digest_units", (min(n, 65535),), (256,),
                 (np.uint64(buffer.data_ptr()), np.uint64(offs.data_ptr()), np.uint64(pl.data_ptr()), np.int64(n),
                  np.int64(unit_bytes // 8), np.uint64(out.data_ptr())))
    return out[0]


def _cache_sum(kv: KVLayout, buffer: torch.Tensor, blocks: Sequence[int], pool: PoolLayout,
               pages: Sequence[int]) -> torch.Tensor:
    """cache_digest's device formula: one gather over all layers when the layers are evenly
    spaced in the buffer (one allocation), else one per layer (vLLM 0.24: one per layer)."""
    dev = buffer.device
    b = torch.as_tensor(np.asarray(blocks, dtype=np.int64), device=dev)
    p = torch.as_tensor(np.asarray(pages, dtype=np.int64), device=dev)
    offs = kv.layer_offsets
    places = (torch.arange(kv.num_layers, device=dev)[:, None] * pool.num_pages + p[None, :]) * pool.block_bytes
    gaps = {o2 - o1 for o1, o2 in zip(offs, offs[1:])}
    total = torch.zeros((), dtype=torch.int64, device=dev)
    if len(gaps) <= 1:
        step = gaps.pop() if gaps else 0
        grid = torch.as_strided(buffer, (kv.num_layers, kv.num_blocks, kv.block_bytes), (step, kv.block_stride, 1),
                                offs[0])
        per = _rows_per_slice(kv.num_layers * kv.block_bytes)
        for i in range(0, len(b), per):  # slices: the temporaries stay small whatever the hand-off
            units = grid.index_select(1, b[i:i + per])  # [L, k, block]
            total += _digest(units.reshape(-1, kv.block_bytes), places[:, i:i + per].reshape(-1))
        return total
    for layer, base in enumerate(offs):
        rows = torch.as_strided(buffer, (kv.num_blocks, kv.block_bytes), (kv.block_stride, 1), base)
        total += _digest(rows.index_select(0, b), places[layer])
    return total


def pool_digest(pool: PoolLayout, buffer: torch.Tensor, pages: Sequence[int]) -> int:
    """Digest of pool ``pages`` (every layer): the decode's side of ``integrity.verify``."""
    if not buffer.is_cuda:
        places = [((layer * pool.num_pages + page) * pool.block_bytes,) * 2
                  for layer in range(pool.num_layers) for page in pages]
        return _crc_in_place_order(buffer, places, pool.block_bytes)
    return pool_sum(pool, buffer, pages)


def pool_sum(pool: PoolLayout, buffer: torch.Tensor, pages: Sequence[int], *, lazy: bool = False
             ) -> int | torch.Tensor:
    """The device formula of the digest (``_digest``) over pool ``pages``, on any device: what
    the GPU's digest is, computed where no kernel or compiled copy computes it. ``lazy``: a
    device scalar, not waited for."""
    if buffer.is_cuda and cuda_kernels_available()[0]:
        places = _places(pool, pages)
        got = _kernel_digest(buffer, places, places, pool.block_bytes)
    else:
        got = _pool_sum(pool, buffer, pages)
    return got if lazy else int(got.item())


def plan_sum(buffer: torch.Tensor, plan: RangePlan, pool: PoolLayout) -> int:
    """:func:`pool_sum`'s formula over the bytes a plan writes into pool ``pool`` (read from
    ``buffer`` at the plan's sources): each 8-byte word weighted by its index in its pool block
    and by that block's place. Any plan's sum is its words' share of the pool's, so the sums
    of plans that together write pages whole add up (mod 2**64) to :func:`pool_sum` of those
    pages: the digest of writers that each write part of every page (KV heads between TP sizes,
    docs/tensor_parallel.md). Offsets and lengths must be whole words."""
    src, dst, n = (np.asarray(a, dtype=np.int64) for a in (plan.src_offsets, plan.dst_offsets, plan.lengths))
    bb = pool.block_bytes
    if ((src | dst | n) % 8).any() or bb % 8:
        raise ValueError("a summed plan needs whole 8-byte words")
    words = buffer.view(torch.int64)
    dev = buffer.device
    total = torch.zeros((), dtype=torch.int64, device=dev)
    per = max(1, _SLICE_BYTES // 64)  # words per slice: ~8 int64 temporaries each, about _SLICE_BYTES
    counts = n // 8
    ends = np.cumsum(counts)
    starts = ends - counts
    for lo in range(0, int(ends[-1]) if len(ends) else 0, per):  # slices of words: bounded temporaries
        hi = min(lo + per, int(ends[-1]))
        k = np.arange(lo, hi, dtype=np.int64)
        rng = np.searchsorted(ends, k, side="right")  # the range each word is in
        within = k - starts[rng]
        at = dst[rng] + 8 * within  # the word's place in the pool
        place = at - at % bb
        w = (((at % bb) // 8 + 1) * _GOLDEN | 1) * ((place * _GOLDEN) | 1)  # (numpy int64 wraps like torch)
        got = words[torch.as_tensor(src[rng] // 8 + within, device=dev)]
        total += (got * torch.as_tensor(w, device=dev)).sum()
    return int(total.item())


def bytes_sum(buffer: torch.Tensor, unit_bytes: int) -> int:
    """:func:`pool_sum` of a whole buffer cut into ``unit_bytes`` units, each placed at its own
    offset (a chunk in pool layout, as the node cache daemon holds it), mod 2**64."""
    n = buffer.numel()
    if n % unit_bytes:
        raise ValueError(f"{n} bytes are not whole units of {unit_bytes}")
    one = RangePlan(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.array([n], dtype=np.int64))
    got = copy_ranges_summed(buffer, buffer, one, unit_bytes=unit_bytes, places_on_dst=False, copy=False)
    if got is None:
        got = pool_sum(PoolLayout(1, n // unit_bytes, unit_bytes), buffer, range(n // unit_bytes))
    return got % (1 << 64)


def _pool_sum(pool: PoolLayout, buffer: torch.Tensor, pages: Sequence[int]) -> torch.Tensor:
    """pool_digest's device formula: one gather over every layer."""
    dev = buffer.device
    p = torch.as_tensor(np.asarray(pages, dtype=np.int64), device=dev)
    grid = buffer[:pool.nbytes].view(pool.num_layers, pool.num_pages, pool.block_bytes)
    places = (torch.arange(pool.num_layers, device=dev)[:, None] * pool.num_pages + p[None, :]) * pool.block_bytes
    total = torch.zeros((), dtype=torch.int64, device=dev)
    per = _rows_per_slice(pool.page_bytes)
    for i in range(0, len(p), per):  # slices: the temporaries stay small whatever the hand-off
        units = grid.index_select(1, p[i:i + per])  # [L, k, block]
        total += _digest(units.reshape(-1, pool.block_bytes), places[:, i:i + per].reshape(-1))
    return total


_SLICE_BYTES = 64 << 20


def _rows_per_slice(page_bytes: int) -> int:
    """Pages per slice of a digest: its gathered bytes and the words' product (8x) stay near
    _SLICE_BYTES, so a 4 GiB hand-off needs no 4 GiB temporaries."""
    return max(1, _SLICE_BYTES // page_bytes)
