"""Byte-range gather/scatter over paged KV (L2).

On CUDA tensors ``copy_ranges`` runs the kernel in ``csrc/copy_ranges.cu`` (built at run time
with NVRTC through CuPy, one launch for all ranges); elsewhere it runs the torch implementation
``copy_ranges_ref``, which is also the reference the kernel tests compare against bitwise.
This module is the only one that loads compiled code: digests.py launches its digest kernel
through :func:`kernels_for`, with range tables uploaded by :func:`upload`.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcache_pd import host_copy
from lmcache_pd.layout import KVLayout, RangePlan

CHUNK_BYTES = 64 << 10
"""The kernel hands each warp chunks of at most this many bytes of the concatenated ranges, so
a long range spreads over every multiprocessor; smaller for small copies (``_chunk_for``)."""
MIN_CHUNK_BYTES = 4 << 10
_THREADS = 512
_BLOCKS_PER_SM = 4
_CHUNKS_PER_WARP = 2  # for small copies: enough chunks to give every warp of the grid work
_PACKAGE = Path(__file__).resolve().parent
_CSRC = next((d for d in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc") if (d / "copy_ranges.cu").is_file()),
             _PACKAGE / "csrc")
"""The kernel sources: inside the package, where the wheel puts them (package data, through the
package's ``csrc`` link to the checkout's ``csrc/``), so an installed package has its kernels; else
the checkout's ``csrc/`` beside the package (a copy of the tree that dropped the link)."""
_kernels: dict[int, _Kernels] = {}  # by device index
_kernels_lock = threading.Lock()


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of the whole storage behind ``t`` (from the storage's first byte)."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),))


class _CudaSpan:
    """``__cuda_array_interface__`` of ``nbytes`` bytes at ``address`` (torch.as_tensor takes it)."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


def span_bytes(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A flat uint8 tensor over ``nbytes`` bytes at ``address``, owning nothing.

    For vLLM's KV memory in several buffers (one per layer): the span from the lowest buffer to
    the end of the highest. Bytes between the buffers are not ours and may be unmapped: nothing
    may touch them. Every plan over KV memory is built from a KVLayout, whose block ids are
    checked (layout.plan_cache_to_pool), so it addresses blocks only; transports that register
    memory with a driver register ``KVLayout.extents``, never the span."""
    if device.type == "cuda":
        return torch.as_tensor(_CudaSpan(address, nbytes), device=device)
    array = (ctypes.c_uint8 * nbytes).from_address(address)  # no byte is read
    return torch.frombuffer(array, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)


def kv_layout_of(layers: Sequence[torch.Tensor]) -> tuple[KVLayout, torch.Tensor]:
    """Describe vLLM's per-layer KV views as byte offsets from one base address.

    Each layer's view is block-outer (``[B, ...]``, one block of one layer a contiguous run):
    vLLM 0.32 passes views into one buffer, vLLM 0.24 one buffer per layer (connector/compat.py).
    Returns the layout and a flat uint8 tensor from the lowest buffer's first byte: the buffer
    itself when there is one, else a span over all of them (``span_bytes``; ``extents`` then
    says which bytes are memory). Raises ValueError for layouts we cannot copy block-wise.
    """
    if not layers:
        raise ValueError("no KV cache layers registered")
    first = layers[0]
    storages: dict[int, int] = {}  # start address -> bytes, one per backing buffer
    for t in layers:
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
            raise ValueError("KV layers differ in shape, stride or dtype (hybrid models are not supported yet)")
        if t.device != first.device:
            raise ValueError(f"KV layers on different devices ({first.device}, {t.device})")
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    base_ptr = min(storages)
    offsets = [t.data_ptr() - base_ptr for t in layers]
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
    extents = tuple((start - base_ptr, n) for start, n in sorted(storages.items()))
    layout = KVLayout(
        num_layers=len(layers),
        num_blocks=int(first.shape[0]),
        block_bytes=block_elems * itemsize,
        block_stride=int(first.stride(0)) * itemsize,
        layer_offsets=tuple(offsets),
        extents=extents if len(extents) > 1 else (),
    )
    if layout.block_stride < layout.block_bytes:
        raise ValueError("KV blocks overlap (block stride below block size)")
    for off in offsets:  # every block of every layer inside its own buffer
        start, n = next(e for e in extents if e[0] <= off < e[0] + e[1])
        if off + layout.block_stride * (layout.num_blocks - 1) + layout.block_bytes > start + n:
            raise ValueError("a KV layer's blocks run past the end of its buffer")
    if len(extents) == 1:
        return layout, flat_bytes(first)
    span = extents[-1][0] + extents[-1][1]
    return layout, span_bytes(base_ptr, span, first.device)


def copy_ranges_ref(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> None:
    """Reference implementation: one slice copy per range, on flat uint8 tensors."""
    for s, d, n in zip(plan.src_offsets.tolist(), plan.dst_offsets.tolist(), plan.lengths.tolist()):
        dst[d:d + n].copy_(src[s:s + n])


def check_ranges(plan: RangePlan, src_bytes: int, dst_bytes: int | None) -> None:
    """Raises ValueError when a range of ``plan`` reads outside ``src_bytes`` or writes outside
    ``dst_bytes`` (None: the destination is checked where it is, by the receiver)."""
    if len(plan) == 0:
        return
    if int((plan.src_offsets + plan.lengths).max()) > src_bytes or int(plan.src_offsets.min()) < 0:
        raise ValueError("range plan reads outside the source buffer")
    if dst_bytes is not None and (int((plan.dst_offsets + plan.lengths).max()) > dst_bytes
                                  or int(plan.dst_offsets.min()) < 0):
        raise ValueError("range plan writes outside the destination buffer")


def copy_ranges(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> None:
    """Copy ``plan`` from ``src`` to ``dst`` (flat uint8). Bounds are checked first.

    On CUDA the copy is enqueued on the current stream of ``dst``'s device (like a torch op).
    """
    if len(plan) == 0:
        return
    check_ranges(plan, src.numel(), dst.numel())
    if src.is_cuda and dst.is_cuda:
        stream = torch.cuda.current_stream(dst.device)
        launch_copy(src.data_ptr(), dst.data_ptr(), plan, device=dst.device, stream=stream)
    elif (src.device.type == dst.device.type == "cpu" and src.dtype == dst.dtype == torch.uint8
          and src.is_contiguous() and dst.is_contiguous()):
        _copy_ranges_host(src, dst, plan)
    else:
        copy_ranges_ref(src, dst, plan)


def _copy_ranges_host(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> None:
    """Host memory (bounds checked by the caller): one call of the compiled loop (host_copy.py),
    else one memmove per range. Both release the GIL while they copy."""
    s0, d0 = src.data_ptr(), dst.data_ptr()
    fn = host_copy.compiled()
    if fn is not None:
        host_copy.copy(fn, s0, d0, plan.src_offsets, plan.dst_offsets, plan.lengths,
                       same_buffer=src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr())
        return
    for s, d, n in zip(plan.src_offsets.tolist(), plan.dst_offsets.tolist(), plan.lengths.tolist()):
        ctypes.memmove(d0 + d, s0 + s, n)


def copy_ranges_summed(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan, *, unit_bytes: int,
                       places_on_dst: bool, copy: bool = True) -> int | None:
    """Host memory: copy ``plan`` (unless ``copy`` is False) and return, from the same pass, the
    digest of :func:`pool_sum` over the bytes copied, each ``unit_bytes`` unit placed at its
    offset on the destination (``places_on_dst``) or the source, mod 2**64. None without the
    compiled host copy (the caller computes it otherwise)."""
    fn = host_copy.compiled()
    if fn is None or src.is_cuda or dst.is_cuda:
        return None
    if len(plan) == 0:
        return 0
    if int((plan.src_offsets + plan.lengths).max()) > src.numel() or int(plan.src_offsets.min()) < 0:
        raise ValueError("range plan reads outside the source buffer")
    if copy and (int((plan.dst_offsets + plan.lengths).max()) > dst.numel() or int(plan.dst_offsets.min()) < 0):
        raise ValueError("range plan writes outside the destination buffer")
    return host_copy.copy_summed(fn, src.data_ptr(), dst.data_ptr(), plan.src_offsets, plan.dst_offsets,
                                 plan.lengths, unit_bytes=unit_bytes, places_on_dst=places_on_dst, copy=copy)


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
    """One launch, ready to enqueue: the kernel, its grid and its single parameter (an int64
    buffer the driver copies at launch). ``table`` is the uploaded plan of a table launch (None
    when the plan travels inline); it must stay alive until the launch has run."""

    __slots__ = ("fn", "grid", "params", "table", "index", "_arg", "args")

    def __init__(self, fn: int, grid: int, params: np.ndarray, table: torch.Tensor | None, index: int):
        self.fn, self.grid, self.params, self.table, self.index = fn, grid, params, table, index
        # The launch's kernelParams (one pointer per parameter), made once: a posted layer's
        # launch runs on vLLM's thread, where each allocation is the forward's time.
        self._arg = np.array([params.ctypes.data], dtype=np.uint64)
        self.args = self._arg.ctypes.data

    @property
    def inline(self) -> bool:
        """The plan travels in the launch parameters (no uploaded table)."""
        return self.table is None


def prepare_copy(src_base: int, dst_base: int, plan: RangePlan, *, device: torch.device,
                 stream: torch.cuda.Stream, inline: bool = True) -> PreparedCopy | None:
    """Lay ``plan`` out for the kernel: per range the absolute source and destination address,
    then the prefix sums of the lengths.

    Up to ``max(INLINE_ROWS)`` ranges go inside the launch parameters (no upload, nothing to
    keep alive); more (or any, with ``inline=False``) are uploaded on ``stream`` from a reused
    pinned buffer. The host does O(ranges) vector work and no splitting: the kernel cuts the
    bytes into chunks itself.
    """
    n = len(plan)
    if n == 0 or plan.nbytes == 0:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernels = kernels_for(index)
    chunk, grid, kind = _launch_shape(kernels, plan.nbytes, (src_base | dst_base) & 15 or int(np.bitwise_or.reduce(
        plan.src_offsets | plan.dst_offsets | plan.lengths)) & 15)
    rows = next((r for r in kernels.inline_rows if n <= r), 0) if inline else 0
    if rows:
        params = np.empty(3 * rows + 3, dtype=np.int64)
        params[0], params[1] = n, chunk
        _fill(params[2:], rows, plan, src_base, dst_base)
        return PreparedCopy(kernels.get(f"copy_inline_{kind}_{rows}"), grid, params, None, index)
    with torch.cuda.device(index), torch.cuda.stream(stream):
        # One pinned buffer, uploaded asynchronously: the upload never waits for work already
        # queued on the stream; the buffer is reused once the upload has run.
        host = _pinned.get(3 * n + 1)
        _fill(host.numpy(), n, plan, src_base, dst_base)
        dev = host[:3 * n + 1].to(device, non_blocking=True)
        _pinned.release_after(host, stream)
    base = dev.data_ptr()
    params = np.array([base, base + 8 * n, base + 16 * n, n, chunk], dtype=np.int64)
    return PreparedCopy(kernels.get(f"copy_table_{kind}"), grid, params, dev, index)


def prepare_rows(src_base: int, dst_base: int, src_offsets: np.ndarray, dst_offsets: np.ndarray,
                 lengths: np.ndarray, *, device: torch.device) -> list[PreparedCopy] | None:
    """:func:`prepare_copy` of several plans of the same lengths at once (row ``i`` of
    ``src_offsets`` and ``dst_offsets``, ``[k, n]``: one plan; ``lengths``, ``[n]``: every
    plan's), each inline: one pass of vector work for all of them, as a layered hand-off lays out
    every layer when its pages are granted (layout.plan_layers), while the forward runs. None
    when the plans are empty or too long to travel inline (prepare them one by one)."""
    k, n = src_offsets.shape
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernels = kernels_for(index)
    rows = next((r for r in kernels.inline_rows if n <= r), 0)
    nbytes = int(lengths.sum())
    if not rows or n == 0 or nbytes == 0:
        return None
    chunk, grid, kind = _launch_shape(kernels, nbytes, (src_base | dst_base | int(np.bitwise_or.reduce(lengths))) & 15
                                      or int(np.bitwise_or.reduce(src_offsets | dst_offsets, axis=None)) & 15)
    fn = kernels.get(f"copy_inline_{kind}_{rows}")
    params = np.empty((k, 3 * rows + 3), dtype=np.int64)  # one row per plan, laid out as _fill does
    params[:, 0], params[:, 1] = n, chunk
    np.add(src_offsets, src_base, out=params[:, 2:2 + n])
    np.add(dst_offsets, dst_base, out=params[:, 2 + rows:2 + rows + n])
    params[:, 2 + 2 * rows] = 0
    params[:, 3 + 2 * rows:3 + 2 * rows + n] = np.cumsum(lengths)
    return [PreparedCopy(fn, grid, params[i], None, index) for i in range(k)]


def _launch_shape(kernels, nbytes: int, misaligned: int) -> tuple[int, int, str]:
    """A copy of ``nbytes``: the chunk a warp moves at a time, the grid, and the kernel's kind
    (16-byte vectors, or bytes where any address or length is not a multiple of 16)."""
    max_blocks = kernels.sms * _BLOCKS_PER_SM
    chunk = _chunk_for(nbytes, max_blocks * _THREADS // 32)
    warps_needed = -(-nbytes // chunk)
    return chunk, max(1, min(max_blocks, -(-warps_needed * 32 // _THREADS))), "bytes" if misaligned else "v16"


def _fill(out: np.ndarray, rows: int, plan: RangePlan, src_base: int, dst_base: int) -> None:
    """``out[:rows]`` source addresses, ``out[rows:2*rows]`` destinations, then the prefix sums."""
    n = len(plan)
    np.add(plan.src_offsets, src_base, out=out[:n])
    np.add(plan.dst_offsets, dst_base, out=out[rows:rows + n])
    out[2 * rows] = 0
    np.cumsum(plan.lengths, out=out[2 * rows + 1:2 * rows + 1 + n])


def run_copy(p: PreparedCopy, stream: torch.cuda.Stream) -> None:
    """Enqueue the prepared launch on ``stream`` (a direct driver launch: no CuPy argument
    marshalling, no device or stream context unless this thread is on another device)."""
    from cupy.cuda import driver, runtime

    current = runtime.getDevice()
    # A thread's first launch, or another device: cudaSetDevice makes the device's primary
    # context current (a driver launch needs one); the caller's device is put back after.
    bind = current != p.index or not getattr(_bound, "ok", False)
    if bind:
        runtime.setDevice(p.index)
    try:
        driver.launchKernel(p.fn, p.grid, 1, 1, _THREADS, 1, 1, 0, stream.cuda_stream, p.args, 0)
    finally:
        if current != p.index:
            runtime.setDevice(current)
    _bound.ok = True


_bound = threading.local()


def launch_copy(src_base: int, dst_base: int, plan: RangePlan, *, device: torch.device,
                stream: torch.cuda.Stream) -> torch.Tensor | None:
    """Enqueue the copy kernel on ``stream``: absolute addresses, so ``dst_base`` may be a peer
    process's memory opened through CUDA IPC. Returns the device range table of a table launch
    (kept alive by the caching allocator until ``stream`` has used it), else None."""
    p = prepare_copy(src_base, dst_base, plan, device=device, stream=stream)
    if p is None:
        return None
    run_copy(p, stream)
    return p.table


class _Kernels:
    """The NVRTC-built module of one device, its functions and what the device allows."""

    def __init__(self, index: int):
        import cupy

        code = (_CSRC / "copy_ranges.cu").read_text() + (_CSRC / "digest.cu").read_text()
        # Inline plans need 32 KiB launch parameters: CUDA 12.1+ in both NVRTC and the driver.
        inline = cupy.cuda.runtime.driverGetVersion() >= 12010 and cupy.cuda.nvrtc.getVersion() >= (12, 1)
        with cupy.cuda.Device(index):
            self.module = cupy.RawModule(code=code, options=("-std=c++17",) + (() if inline else ("-DPD_NO_INLINE",)))
            self.module.compile()
        self.index = index
        self.inline_rows = INLINE_ROWS if inline else ()
        self.sms = torch.cuda.get_device_properties(index).multi_processor_count
        self._functions: dict[str, Any] = {}  # the Function objects keep their handles valid
        self._raw: dict[str, Any] = {}  # cupy Functions launched through launch()

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        """Launch kernel ``name`` on the current torch stream (``args``: numpy scalars)."""
        import cupy

        with cupy.cuda.Device(self.index):
            fn = self._raw.get(name)
            if fn is None:
                fn = self._raw[name] = self.module.get_function(name)
            with warnings.catch_warnings():  # newer cupy prefers Stream.from_external; this works on both
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(self.index).cuda_stream)
            with stream:
                fn(grid, block, args)

    def get(self, name: str) -> int:
        fn = self._functions.get(name)
        if fn is None:
            import cupy

            with cupy.cuda.Device(self.index):
                fn = self._functions[name] = self.module.get_function(name).kernel  # the driver Function
        return fn.ptr


INLINE_ROWS = (64, 320, 1300)
"""Plan sizes (ranges) with an inline kernel (csrc/copy_ranges.cu, PD_INLINE_KERNELS): the
smallest that fits is used, since the driver copies the whole parameter block at each launch."""


def kernels_for(index: int) -> _Kernels:
    k = _kernels.get(index)
    if k is None:
        with _kernels_lock:
            k = _kernels.get(index)
            if k is None:
                k = _kernels[index] = _Kernels(index)
    return k


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


def upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """``values`` (int64) on ``device``, through a reused pinned buffer on the current stream:
    the host does not wait for the stream (a pageable upload would), so a caller queuing many
    digests keeps the GPU busy."""
    n = len(values)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        host = _pinned.get(max(1, n))
        host.numpy()[:n] = values
        out = host[:n].to(device, non_blocking=True)
        _pinned.release_after(host, stream)
    return out


def register_host(address: int, nbytes: int, device: torch.device) -> Callable[[], None]:
    """Register host memory (a shared mapping) as pinned for ``device``, so our kernels read and
    write it in place (``span_bytes(address, n, device)``) at bus speed; returns what ends the
    registration (call it before the memory is unmapped). Raises RuntimeError where the GPU cannot
    use the host's own pointer for registered memory (no unified addressing)."""
    from cupy.cuda import runtime

    index = device.index if device.index is not None else torch.cuda.current_device()
    if not runtime.deviceGetAttribute(_CAN_USE_HOST_POINTER, index):
        raise RuntimeError(f"cuda:{index} cannot use host pointers of registered memory")
    with torch.cuda.device(index):
        runtime.hostRegister(address, nbytes, _REGISTER_PORTABLE | _REGISTER_MAPPED)

    def unregister() -> None:
        with torch.cuda.device(index):
            torch.cuda.synchronize(index)  # no copy still touches it
            runtime.hostUnregister(address)

    return unregister


_REGISTER_PORTABLE, _REGISTER_MAPPED = 1, 2  # cudaHostRegisterPortable, cudaHostRegisterMapped
_CAN_USE_HOST_POINTER = 91  # cudaDevAttrCanUseHostPointerForRegisteredMem
