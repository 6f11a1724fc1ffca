"""Staging for the nixl transport: gather a many-range plan on the GPU, in destination order.

UCX pays microseconds per descriptor, so a GPU source whose plan has many ranges (vLLM's blocks,
one per layer) is first copied by the range-copy kernel into a registered staging buffer, in the
order of its destinations; ranges whose destinations continue each other then merge, and NIXL
posts one write per run of consecutive destination bytes (32 per hand-off into a fresh pool).
Buffers are registered once and reused (powers of two from 64 MiB); each transfer holds one
until it ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmcache_pd.layout import RangePlan, coalesce

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: buffers in use live in a set
class Region:
    """Memory registered with NIXL: vLLM's buffer, the pool, or a staging buffer."""

    buffer: torch.Tensor
    address: int
    nbytes: int
    device: int
    mem: str  # "DRAM" | "VRAM"
    reg: Any


class Stager:
    def __init__(self, register: Callable[[torch.Tensor], Any]):
        self._register = register  # registers a buffer with the agent, returns its registration
        self._buffers: list[Region] = []
        self._busy: set[Region] = set()
        self._lock = threading.Lock()
        self._stream: torch.cuda.Stream | None = None

    def gather(self, src: Region, plan: RangePlan, after: torch.cuda.Event | None = None) -> tuple[Region, RangePlan]:
        """Copy ``plan``'s sources into a staging buffer in destination order (one kernel, done
        on return). ``after``: the event the sources are complete at (else the current stream's
        work so far). Returns the buffer, held until ``put_back``, and the plan from it."""
        from lmcache_pd.ops import launch_copy

        order = np.argsort(plan.dst_offsets, kind="stable")
        lengths = plan.lengths[order]
        staged = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        device = src.buffer.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        stage = self._acquire(src, plan.nbytes)
        try:
            # After the producer's event alone, where given: the current stream is vLLM's
            # default stream, and waiting for it waits for every forward queued after the event.
            if after is not None:
                self._stream.wait_event(after)
            else:
                self._stream.wait_stream(torch.cuda.current_stream(device))
            launch_copy(src.address, stage.address, RangePlan(plan.src_offsets[order], staged, lengths),
                        device=device, stream=self._stream)
            self._stream.synchronize()  # UCX reads the stage from its own streams
        except BaseException:
            self.put_back(stage)
            raise
        return stage, coalesce(staged, plan.dst_offsets[order], lengths)

    def _acquire(self, src: Region, nbytes: int) -> Region:
        with self._lock:
            for st in self._buffers:
                if st not in self._busy and st.device == src.device and st.nbytes >= nbytes:
                    self._busy.add(st)
                    return st
        size = 1 << max(26, (nbytes - 1).bit_length())
        # Allocated on the stream that writes it. On the caller's stream (vLLM's default stream,
        # on the sender's thread) the caching allocator may hand out memory that vLLM freed while
        # kernels queued on that stream still use it; our gather, ordered only after the layer's
        # event, would then write into a forward in flight (suspected of the wrong first tokens
        # seen once inside vLLM's engine, as a staging buffer was made during 16 prefills at
        # once; docs/benchmarks.md, 2026-12-05).
        with torch.cuda.stream(self._stream):
            buf = torch.empty(size, dtype=torch.uint8, device=src.buffer.device)
        st = Region(buf, buf.data_ptr(), size, src.device, "VRAM", self._register(buf))
        with self._lock:
            self._buffers.append(st)
            self._busy.add(st)
        log.info("nixl: staging buffer of %d MiB on cuda:%d", size >> 20, src.device)
        return st

    def put_back(self, stage: Region | None) -> None:
        if stage is not None:
            with self._lock:
                self._busy.discard(stage)

    def buffers(self) -> list[Region]:
        with self._lock:
            return list(self._buffers)
