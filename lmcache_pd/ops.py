"""Byte-range gather/scatter over paged KV (L2).

On CUDA tensors ``copy_ranges`` runs the kernel in ``csrc/copy_ranges.cu`` (built at run time
with NVRTC through CuPy, one launch for all ranges); elsewhere it runs the torch implementation
``copy_ranges_ref``, which is also the reference the kernel tests compare against bitwise.
This module is the only one that loads compiled code.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcache_pd.layout import KVLayout, RangePlan

CHUNK_BYTES = 64 << 10
"""The kernel hands each warp chunks of at most this many bytes of the concatenated ranges, so
a long range spreads over every multiprocessor; smaller for small copies (``_chunk_for``)."""
MIN_CHUNK_BYTES = 4 << 10
_THREADS = 512
_BLOCKS_PER_SM = 4
_CHUNKS_PER_WARP = 2  # for small copies: enough chunks to give every warp of the grid work
_sm_count: dict[int, int] = {}
_cupy_streams: dict[int, Any] = {}
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_kernels: dict[int, Any] = {}
_kernels_lock = threading.Lock()


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of the whole storage behind ``t`` (from the storage's first byte)."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),))


def kv_layout_of(layers: Sequence[torch.Tensor]) -> tuple[KVLayout, torch.Tensor]:
    """Describe vLLM's per-layer KV views ``[B, H, N, C]`` as byte offsets into one buffer.

    Returns the layout and a flat uint8 view of that buffer. Raises ValueError for layouts we
    cannot copy block-wise (blocks not contiguous, layers in different buffers).
    """
    if not layers:
        raise ValueError("no KV cache layers registered")
    first = layers[0]
    base_ptr = first.untyped_storage().data_ptr()
    offsets: list[int] = []
    for t in layers:
        if t.untyped_storage().data_ptr() != base_ptr:
            raise ValueError("KV layers live in different buffers; only one backing buffer is supported")
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
            raise ValueError("KV layers differ in shape, stride or dtype (hybrid models are not supported yet)")
        offsets.append(t.data_ptr() - base_ptr)
    if first.dim() < 2:
        raise ValueError(f"unexpected KV tensor rank {first.dim()}")
    itemsize = first.element_size()
    inner = list(zip(first.shape[1:], first.stride()[1:]))
    block_elems = int(np.prod([s for s, _ in inner]))
    # A block is one contiguous run iff its inner strides are a dense permutation.
    expect = 1
    for size, stride in sorted(inner, key=lambda x: x[1]):
        if size != 1 and stride != expect:
            raise ValueError(f"KV blocks are not contiguous (shape {tuple(first.shape)}, stride {first.stride()})")
        expect *= size
    layout = KVLayout(
        num_layers=len(layers),
        num_blocks=int(first.shape[0]),
        block_bytes=block_elems * itemsize,
        block_stride=int(first.stride(0)) * itemsize,
        layer_offsets=tuple(offsets),
    )
    if layout.block_stride < layout.block_bytes:
        raise ValueError("KV blocks overlap (block stride below block size)")
    return layout, flat_bytes(first)


def copy_ranges_ref(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> None:
    """Reference implementation: one slice copy per range, on flat uint8 tensors."""
    for s, d, n in zip(plan.src_offsets.tolist(), plan.dst_offsets.tolist(), plan.lengths.tolist()):
        dst[d:d + n].copy_(src[s:s + n])


def copy_ranges(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> None:
    """Copy ``plan`` from ``src`` to ``dst`` (flat uint8). Bounds are checked first.

    On CUDA the copy is enqueued on the current stream of ``dst``'s device (like a torch op).
    """
    if len(plan) == 0:
        return
    if int((plan.src_offsets + plan.lengths).max()) > src.numel() or int(plan.src_offsets.min()) < 0:
        raise ValueError("range plan reads outside the source buffer")
    if int((plan.dst_offsets + plan.lengths).max()) > dst.numel() or int(plan.dst_offsets.min()) < 0:
        raise ValueError("range plan writes outside the destination buffer")
    if src.is_cuda and dst.is_cuda:
        stream = torch.cuda.current_stream(dst.device)
        launch_copy(src.data_ptr(), dst.data_ptr(), plan, device=dst.device, stream=stream)
    elif (src.device.type == dst.device.type == "cpu" and src.dtype == dst.dtype == torch.uint8
          and src.is_contiguous() and dst.is_contiguous()):
        _copy_ranges_host(src, dst, plan)
    else:
        copy_ranges_ref(src, dst, plan)


def _copy_ranges_host(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> None:
    """Host memory: one memmove per range (bounds checked by the caller). A torch slice copy
    costs more per range than a 64 KiB memmove and holds the GIL; ctypes releases it, so the
    transport's and control plane's threads run meanwhile (measured: 1.5x on 64 KiB ranges)."""
    s0, d0 = src.data_ptr(), dst.data_ptr()
    for s, d, n in zip(plan.src_offsets.tolist(), plan.dst_offsets.tolist(), plan.lengths.tolist()):
        ctypes.memmove(d0 + d, s0 + s, n)


def _chunk_for(total: int, warps: int) -> int:
    """Chunk size: 64 KiB, or smaller when the copy is too small to give every warp chunks."""
    want = total // max(1, warps * _CHUNKS_PER_WARP)
    return max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, want - want % 16))


class _PinnedBuffers:
    """Reusable pinned host buffers for range tables (allocating pinned memory costs far more
    than a small copy). A buffer returns to its free list once the event recorded after its
    upload has completed."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._busy: collections.deque[tuple[int, torch.Tensor, torch.cuda.Event]] = collections.deque()
        self._lock = threading.Lock()

    def get(self, n: int) -> torch.Tensor:
        size = 1 << max(10, (n - 1).bit_length())
        with self._lock:
            while self._busy and self._busy[0][2].query():
                s, t, _ = self._busy.popleft()
                self._free.setdefault(s, []).append(t)
            free = self._free.get(size)
            if free:
                return free.pop()
        return torch.empty(size, dtype=torch.int64, pin_memory=True)

    def release_after(self, buf: torch.Tensor, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        with self._lock:
            self._busy.append((buf.numel(), buf, event))


_pinned = _PinnedBuffers()


class PreparedCopy:
    """A range table uploaded to the device and the kernel that will consume it."""

    __slots__ = ("fn", "grid", "table", "rows", "index", "chunk")

    def __init__(self, fn: Any, grid: int, table: torch.Tensor, rows: int, index: int, chunk: int):
        self.fn, self.grid, self.table, self.rows, self.index, self.chunk = fn, grid, table, rows, index, chunk


def prepare_copy(src_base: int, dst_base: int, plan: RangePlan, *, device: torch.device,
                 stream: torch.cuda.Stream) -> PreparedCopy | None:
    """Upload ``plan`` (one row per range, and the prefix sums of the lengths) on ``stream``.

    The host does O(ranges) vector work and no splitting: the kernel cuts the bytes into
    chunks itself (csrc/copy_ranges.cu, copy_plan_*).
    """
    n = len(plan)
    if n == 0 or plan.nbytes == 0:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _sm_count.get(index)
    if sms is None:
        sms = _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    max_blocks = sms * _BLOCKS_PER_SM
    chunk = _chunk_for(plan.nbytes, max_blocks * _THREADS // 32)
    misaligned = (src_base | dst_base) & 15 or int(np.bitwise_or.reduce(
        plan.src_offsets | plan.dst_offsets | plan.lengths)) & 15
    fn = _kernel(device, "copy_plan_bytes" if misaligned else "copy_plan_v16")
    with torch.cuda.device(index), torch.cuda.stream(stream):
        # One pinned buffer, uploaded asynchronously: the upload never waits for work already
        # queued on the stream; the buffer is reused once the upload has run.
        host = _pinned.get(4 * n + 1)
        h = host.numpy()
        rows = h[:3 * n].reshape(n, 3)
        np.add(plan.src_offsets, src_base, out=rows[:, 0])
        np.add(plan.dst_offsets, dst_base, out=rows[:, 1])
        rows[:, 2] = plan.lengths
        h[3 * n] = 0
        np.cumsum(plan.lengths, out=h[3 * n + 1:4 * n + 1])
        dev = host[:4 * n + 1].to(device, non_blocking=True)
        _pinned.release_after(host, stream)
    warps_needed = -(-plan.nbytes // chunk)
    grid = max(1, min(max_blocks, -(-warps_needed * 32 // _THREADS)))
    return PreparedCopy(fn, grid, dev, n, index, chunk)


def run_copy(p: PreparedCopy, stream: torch.cuda.Stream) -> None:
    """Enqueue one kernel launch for a prepared copy on ``stream``."""
    base = p.table.data_ptr()
    with _cupy_stream(stream, p.index):
        p.fn((p.grid,), (_THREADS,), (np.uint64(base), np.uint64(base + 24 * p.rows), np.int32(p.rows),
                                      np.int64(p.chunk)))


def launch_copy(src_base: int, dst_base: int, plan: RangePlan, *, device: torch.device,
                stream: torch.cuda.Stream) -> torch.Tensor | None:
    """Enqueue the copy kernel on ``stream``: absolute addresses, so ``dst_base`` may be a peer
    process's memory opened through CUDA IPC. Returns the device range table (kept alive by the
    caching allocator until ``stream`` has used it)."""
    p = prepare_copy(src_base, dst_base, plan, device=device, stream=stream)
    if p is None:
        return None
    run_copy(p, stream)
    return p.table


def _cupy_stream(stream: torch.cuda.Stream, index: int) -> Any:
    """CuPy's view of a torch stream, made once per stream."""
    cs = _cupy_streams.get(stream.cuda_stream)
    if cs is None:
        import warnings

        import cupy

        with warnings.catch_warnings():  # ExternalStream is the form that takes a raw handle
            warnings.simplefilter("ignore", DeprecationWarning)
            cs = _cupy_streams[stream.cuda_stream] = cupy.cuda.ExternalStream(stream.cuda_stream, index)
    return cs


def _kernel(device: torch.device, name: str) -> Any:
    """The NVRTC-built kernel ``name`` for ``device`` (built once per process and device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _kernels_lock:
        module = _kernels.get(index)
        if module is None:
            import cupy

            with cupy.cuda.Device(index):
                module = cupy.RawModule(code=(_CSRC / "copy_ranges.cu").read_text(), options=("-std=c++17",))
                module.compile()
            _kernels[index] = module
    return module.get_function(name)


def cuda_kernels_available() -> tuple[bool, str]:
    """Whether the CUDA kernels can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return False, f"cupy is not installed ({e})"
    if not (_CSRC / "copy_ranges.cu").exists():
        return False, f"kernel source missing: {_CSRC / 'copy_ranges.cu'}"
    return True, ""
