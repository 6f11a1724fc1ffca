"""cuda_ipc's bookkeeping (L3): its registered regions, its peers' opened regions, a submit laid
out ahead, and the address arithmetic of regions that are not one allocation (vLLM's per-layer
buffers). The transport itself is cuda_ipc.py."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np
import torch

from lmcache_pd.errors import TransportUnavailable
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import PreparedCopy
from lmcache_pd.transport.base import PeerId
from lmcache_pd.transport.device_signals import Bell, Ring


class Region:
    def __init__(self, buffer: torch.Tensor, extents: tuple[tuple[int, int], ...] = ()):
        self.buffer = buffer
        self.address = buffer.data_ptr()
        self.nbytes = buffer.numel()
        self.device = buffer.device
        self.extents = extents or ((0, self.nbytes),)


class Peer:
    def __init__(self, address: int, nbytes: int, opened: bool):
        self.address = address
        self.nbytes = nbytes
        self.opened = opened  # an IPC mapping to close on disconnect
        self.ring: Ring | None = None  # its landing words, mapped here (None: it has none)
        self.pieces: list[tuple[int, int, int]] = []
        """A region not the peer's own allocation: (offset in the region, bytes, our address of it)."""
        self.mappings: list[int] = []  # the allocations opened for ``pieces``, to close
        self.device_uuid = ""  # its region's GPU, when in another process (base.gpu_uuid)

    def ring_for(self, signal: tuple[int, int] | None) -> Bell | None:
        """What ends a batch with ``signal`` (slot, value) (Ring.bound); None: no signal asked, or
        the peer keeps no words we reach."""
        return self.ring.bound(*signal) if signal is not None and self.ring is not None else None


class Prepared(NamedTuple):
    """A submit laid out ahead (``prepare_submit``): checked, placed, its launch built."""

    peer: PeerId
    p: Peer
    src: Region
    stream: torch.cuda.Stream
    copy: PreparedCopy | None
    ring: Bell | None
    nbytes: int


def allocation_of(index: int, address: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation that holds ``address`` (cuMemGetAddressRange)."""
    import cupy

    cuda = ctypes.CDLL("libcuda.so.1")
    fn = getattr(cuda, "cuMemGetAddressRange_v2", None) or cuda.cuMemGetAddressRange
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with cupy.cuda.Device(index):  # (makes the device's primary context current on this thread)
        rc = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(address))
    if rc != 0:
        raise TransportUnavailable(f"cuMemGetAddressRange failed ({rc}) for a region to export")
    return base.value, size.value


def absolute_plan(p: Peer, plan: RangePlan) -> RangePlan | None:
    """``plan`` with the absolute addresses of a pieced region's destinations (None: a range
    outside every piece)."""
    starts = np.array([o for o, _, _ in p.pieces], dtype=np.int64)
    ends = starts + np.array([n for _, n, _ in p.pieces], dtype=np.int64)
    bases = np.array([a for _, _, a in p.pieces], dtype=np.int64)
    k = np.searchsorted(starts, plan.dst_offsets, side="right") - 1
    if (k < 0).any() or (plan.dst_offsets + plan.lengths > ends[np.maximum(k, 0)]).any():
        return None
    return RangePlan(plan.src_offsets, bases[k] + (plan.dst_offsets - starts[k]), plan.lengths)
