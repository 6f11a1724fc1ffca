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
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcache_pd import host_copy
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan

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

    __slots__ = ("fn", "grid", "params", "table", "index")

    def __init__(self, fn: int, grid: int, params: np.ndarray, table: torch.Tensor | None, index: int):
        self.fn, self.grid, self.params, self.table, self.index = fn, grid, params, table, index

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
    kernels = _kernels_for(index)
    max_blocks = kernels.sms * _BLOCKS_PER_SM
    chunk = _chunk_for(plan.nbytes, max_blocks * _THREADS // 32)
    misaligned = (src_base | dst_base) & 15 or int(np.bitwise_or.reduce(
        plan.src_offsets | plan.dst_offsets | plan.lengths)) & 15
    kind = "bytes" if misaligned else "v16"
    warps_needed = -(-plan.nbytes // chunk)
    grid = max(1, min(max_blocks, -(-warps_needed * 32 // _THREADS)))
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

    arg = np.array([p.params.ctypes.data], dtype=np.uint64)  # kernelParams: one pointer per parameter
    current = runtime.getDevice()
    # A thread's first launch, or another device: cudaSetDevice makes the device's primary
    # context current (a driver launch needs one); the caller's device is put back after.
    bind = current != p.index or not getattr(_bound, "ok", False)
    if bind:
        runtime.setDevice(p.index)
    try:
        driver.launchKernel(p.fn, p.grid, 1, 1, _THREADS, 1, 1, 0, stream.cuda_stream, arg.ctypes.data, 0)
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


def _kernels_for(index: int) -> _Kernels:
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
    offs, pl = _upload(offsets, dev), _upload(places, dev)
    out = torch.zeros(1, dtype=torch.int64, device=dev)
    n = len(offsets)
    if n:
        k = _kernels_for(dev.index if dev.index is not None else torch.cuda.current_device())
        k.launch("digest_units", (min(n, 65535),), (256,),
                 (np.uint64(buffer.data_ptr()), np.uint64(offs.data_ptr()), np.uint64(pl.data_ptr()), np.int64(n),
                  np.int64(unit_bytes // 8), np.uint64(out.data_ptr())))
    return out[0]


def _upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
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
