"""Host-memory range copies at memory speed: one call into a compiled loop (L0, a leaf).

A plan of N ranges copied by a Python loop of ``ctypes.memmove`` costs about 3 us per range on
top of the bytes (measured on the 2-vCPU machine: 64 MiB in 4096 ranges of 16 KiB, 24 ms
against 9.5 ms for one memcpy of the same bytes; docs/benchmarks.md). ``csrc/copy_ranges_host.c``
does the loop in C, built at first use by host_build.py (the system C compiler; cached under
``~/.cache/lmcache-pd``). Without a compiler, or if the build fails, :func:`compiled` returns
None and the caller keeps the Python loop (logged once).
ctypes releases the GIL for the call, so other threads run while it copies.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from lmcache_pd import host_build

_FALLBACK = "host range copies run a Python loop"


@functools.cache
def compiled():
    """The compiled ``pd_copy_ranges`` (src, dst, src_offsets, dst_offsets, lengths, n, stream), or None."""
    dll = host_build.library("copy_ranges_host.c", _FALLBACK)
    if dll is None:
        return None
    fn = dll.pd_copy_ranges
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64]
    summed = dll.pd_copy_ranges_sum
    summed.restype = ctypes.c_uint64
    summed.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5
    fn.summed = summed  # (the same library: one build, one cache key)
    return fn


STREAM_BYTES = 4 << 20
"""From this many bytes between two buffers, the copy streams (non-temporal stores): past the
size of a core's share of the cache, the written lines would only evict others."""


def copy(fn, src_address: int, dst_address: int, src_offsets: np.ndarray, dst_offsets: np.ndarray,
         lengths: np.ndarray, *, same_buffer: bool = False) -> None:
    """Copy the ranges with the compiled loop (bounds checked by the caller)."""
    so = np.ascontiguousarray(src_offsets, dtype=np.int64)
    do = np.ascontiguousarray(dst_offsets, dtype=np.int64)
    ln = np.ascontiguousarray(lengths, dtype=np.int64)
    stream = not same_buffer and int(ln.sum()) >= STREAM_BYTES
    fn(src_address, dst_address, so.ctypes.data, do.ctypes.data, ln.ctypes.data, len(ln), int(stream))


def copy_summed(fn, src_address: int, dst_address: int, src_offsets: np.ndarray, dst_offsets: np.ndarray,
                lengths: np.ndarray, *, unit_bytes: int, places_on_dst: bool, copy: bool = True) -> int:
    """Copy the ranges (unless ``copy`` is False) and return the digest of ``digests._digest`` over
    the bytes, in units of ``unit_bytes`` placed at their offsets on the destination side (or
    the source's), mod 2**64, in the same pass. Ranges are whole units; bounds checked by the caller."""
    so = np.ascontiguousarray(src_offsets, dtype=np.int64)
    do = np.ascontiguousarray(dst_offsets, dtype=np.int64)
    ln = np.ascontiguousarray(lengths, dtype=np.int64)
    if unit_bytes <= 0 or unit_bytes % 8 or np.any(ln % unit_bytes):
        raise ValueError(f"ranges of whole {unit_bytes}-byte units of 8-byte words are needed")
    stream = copy and int(ln.sum()) >= STREAM_BYTES
    return int(fn.summed(src_address, dst_address, so.ctypes.data, do.ctypes.data, ln.ctypes.data, len(ln),
                         int(stream), int(places_on_dst), unit_bytes, int(copy)))
