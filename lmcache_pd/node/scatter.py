"""Pool pages -> one load's vLLM blocks: the plan, the check of the bytes, the copy (L5).

The loader (loader.py) decides when a load's pages are scattered; this does the scattering, on
the loader's thread:
  - :meth:`Scatter.pages`: pages ``[next_page, upto)`` of a load (a landed group, or what is
    left at READY), as planned at GRANTED when that plan covers them; :meth:`Scatter.layers`:
    some layers of every page still to come (they landed whole, ``pool.scatter_landed``). Both
    move the load's counts and ``next_page`` / ``layers_done``;
  - :meth:`Scatter.plan`: the ranges from a reservation's pages into the load's blocks (whole
    pages, or between TP sizes the writers' sections, heads.plan_sections; every layer or some);
  - :meth:`Scatter.prepare`: on a GPU, the plan laid out and uploaded on a stream ahead of the
    copy (while the pages still fly), so that the copy is one launch;
  - :meth:`Scatter.verify`: with ``integrity.verify``, the pages (a direct hand-off: the blocks)
    hold what the prefill said it sent, counted both ways;
  - :meth:`Scatter.copy`: the copy itself; on a GPU it completes before returning, so the pages
    can go back to the pool at once.
"""

from __future__ import annotations

import threading
import time

import torch

from lmcache_pd.control.reservation import Reservation
from lmcache_pd.digests import cache_digest, pool_digest, pool_sum
from lmcache_pd.errors import TransferError
from lmcache_pd.heads import plan_sections
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan, plan_cache_to_pool
from lmcache_pd.node.loads import LoadState
from lmcache_pd.ops import PreparedCopy, copy_ranges, prepare_copy, run_copy


class Scatter:
    def __init__(self, pool_layout: PoolLayout, pool_buffer: torch.Tensor, *, kv: KVLayout, kv_buffer: torch.Tensor,
                 verify: bool):
        """``verify``: ``integrity.verify``."""
        self.pool_layout = pool_layout
        self.pool_buffer = pool_buffer
        self.kv = kv
        self.kv_buffer = kv_buffer
        self.verify_digests = verify
        self.digests_verified = self.digest_mismatches = 0
        self._counts = threading.Lock()  # (read by the receiver's status from another thread)
        self._stream: torch.cuda.Stream | None = None  # the loader's CUDA stream, made on first use

    def pages(self, load: LoadState, r: Reservation, upto: int) -> None:
        """Copy the reservation's pages ``[load.next_page, upto)`` into the load's blocks (the
        layers not scattered yet)."""
        first = load.next_page
        if upto <= first:
            return
        t0 = time.monotonic()
        p = load.prepared
        rest = [i for i in range(self.kv.num_layers) if i not in load.layers_done]
        if not rest:  # every layer went as it landed
            load.prepared = None
            load.next_page = upto
            return
        if load.layers_done:
            plan = self.plan(r, load.spec.block_ids, first, upto, layers=rest)
            self.copy(plan)
        elif p is not None and (p.first, p.upto) == (first, upto):
            plan = p.plan
            self.copy(plan, p.copy)
            load.planned_ahead = True
        else:
            plan = self.plan(r, load.spec.block_ids, first, upto)
            self.copy(plan)
        load.prepared = None
        load.scatter_s += time.monotonic() - t0
        load.groups += 1
        load.nbytes += plan.nbytes
        load.next_page = upto

    def layers(self, load: LoadState, r: Reservation, layers: frozenset[int]) -> None:
        """Copy ``layers`` of the pages still to come into the load's blocks (they landed whole)."""
        first, upto = load.next_page, len(r.pages)
        t0 = time.monotonic()
        p = load.prepared
        if upto > first and len(layers) == self.kv.num_layers and p is not None and (p.first, p.upto) == (first, upto):
            self.copy(p.plan, p.copy)  # all of it at once (a whole hand-off's one batch): as planned
            load.planned_ahead = True
            load.prepared = None
            load.nbytes += p.plan.nbytes
            load.groups += 1
        elif upto > first:
            plan = self.plan(r, load.spec.block_ids, first, upto, layers=sorted(layers))
            self.copy(plan)
            load.nbytes += plan.nbytes
            load.groups += 1
        load.scatter_s += time.monotonic() - t0
        load.layers_done = load.layers_done | layers

    def plan(self, r: Reservation, block_ids: tuple[int, ...], first: int, upto: int,
             layers: list[int] | None = None) -> RangePlan:
        """Pool pages ``[first, upto)`` of the reservation -> the load's blocks ``block_ids`` (the
        tail of the prompt's; every layer, or ``layers``)."""
        offset = len(r.pages) - len(block_ids)
        blocks = block_ids[first - offset:upto - offset]
        if r.sections:  # several writers, each its heads in a section of the pages
            return plan_sections(self.kv, self.pool_layout, r.sections, blocks=blocks, pages=r.pages[first:upto],
                                 among=r.pages, layers=layers)
        return plan_cache_to_pool(self.kv, self.pool_layout, blocks=blocks, pages=r.pages[first:upto],
                                  layers=layers).swapped()

    def prepare(self, plan: RangePlan) -> PreparedCopy | None:
        """On a GPU, ``plan``'s launch, uploaded on the loader's stream: None on a CPU or for an
        empty plan."""
        if not self.kv_buffer.is_cuda:
            return None
        return prepare_copy(self.pool_buffer.data_ptr(), self.kv_buffer.data_ptr(), plan,
                            device=self.kv_buffer.device, stream=self.stream())

    def verify(self, r: Reservation) -> None:
        """With ``integrity.verify``: the pool pages (a direct hand-off: the blocks) hold what
        the prefill said it sent; raises TransferError if not."""
        if not self.verify_digests:
            return
        if r.digest is None:
            raise TransferError("the prefill sent no digest (set integrity.verify the same on every instance)",
                                transfer_id=r.transfer_id)
        if r.direct:  # in the places of the pages they stand for, as the prefill digested them
            got = cache_digest(self.kv, self.kv_buffer, r.direct, self.pool_layout, r.pages[len(r.pages) - len(r.direct):])
        elif r.summed:  # writers of another TP size: the sum of their heads' shares (digests.plan_sum)
            got = pool_sum(self.pool_layout, self.pool_buffer, r.pages)
        else:
            got = pool_digest(self.pool_layout, self.pool_buffer, r.pages)
        if got != r.digest:
            with self._counts:
                self.digest_mismatches += 1
            raise TransferError(f"the {'blocks' if r.direct else 'pages'} differ from what the prefill sent (integrity.verify)",
                                transfer_id=r.transfer_id)
        with self._counts:
            self.digests_verified += 1

    def copy(self, plan: RangePlan, prepared: PreparedCopy | None = None) -> None:
        """Scatter pool pages into vLLM's blocks; on a GPU, complete before the pages go back.

        The copy runs on the loader's own stream: the target blocks belong to this request
        alone and the pages are READY (or landed, under the reader guard), so it needs no order
        against vLLM's stream, and vLLM reads the blocks only after the load is reported, which
        happens after this returns.
        """
        if not self.kv_buffer.is_cuda:
            copy_ranges(self.pool_buffer, self.kv_buffer, plan)
            return
        stream = self.stream()
        if prepared is not None:  # planned and uploaded on this stream while the pages flew
            run_copy(prepared, stream)
        else:
            with torch.cuda.stream(stream):
                copy_ranges(self.pool_buffer, self.kv_buffer, plan)
        stream.synchronize()

    def stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.kv_buffer.device)
        return self._stream
