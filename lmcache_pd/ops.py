"""Byte-range gather/scatter over paged KV (L2): torch implementations.

The CPU path uses these torch implementations. GPU kernels (csrc/) will register here too,
and this module stays the only importer of compiled code; the ``*_ref`` functions remain as
the reference the kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmcache_pd.layout import KVLayout, RangePlan


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
    """Copy ``plan`` from ``src`` to ``dst`` (flat uint8). Bounds are checked first."""
    if len(plan) == 0:
        return
    if int((plan.src_offsets + plan.lengths).max()) > src.numel() or int(plan.src_offsets.min()) < 0:
        raise ValueError("range plan reads outside the source buffer")
    if int((plan.dst_offsets + plan.lengths).max()) > dst.numel() or int(plan.dst_offsets.min()) < 0:
        raise ValueError("range plan writes outside the destination buffer")
    copy_ranges_ref(src, dst, plan)
