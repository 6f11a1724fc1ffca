"""The CUDA range-copy kernel against the torch reference: bitwise, on poisoned outputs.

Grid: both KV layouts, every KV dtype (fp8 as raw bytes), layer/head/block/width shapes, random
block tables and partial last blocks, gather (paged -> pool) and scatter (pool -> paged).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_pd.layout import PoolLayout, blocks_for_tokens, coalesce, plan_cache_to_pool
from lmcache_pd.ops import (
    CHUNK_BYTES,
    INLINE_ROWS,
    copy_ranges,
    copy_ranges_ref,
    cuda_kernels_available,
    kv_layout_of,
    prepare_copy,
    run_copy,
)
from tests.unit.kv import vllm_like_cache

_ok, _why = cuda_kernels_available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"GPU kernel tests need CUDA and cupy: {_why}")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]  # uint8 stands for fp8 bytes


def poisoned(n: int, device) -> torch.Tensor:
    return torch.full((n,), 0xA5, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layers", "heads", "block", "c"), [(1, 1, 16, 64), (4, 8, 16, 256), (3, 2, 128, 128)])
def test_gather_and_scatter_match_the_reference(layout, dtype, layers, heads, block, c):
    rng = np.random.default_rng(hash((layout, str(dtype), layers, heads, block, c)) % 2**32)
    src_layers = vllm_like_cache(layers, 64, heads, block, c, dtype, layout, device="cuda")
    kv, src_buf = kv_layout_of(src_layers)
    pool = PoolLayout.sized(kv, 40 * kv.page_bytes)
    num_tokens = int(rng.integers(1, 30 * block))  # a partial last block, most of the time
    n = blocks_for_tokens(num_tokens, block)
    blocks = rng.choice(np.arange(1, 64), size=n, replace=False)  # a random block table
    pages = rng.choice(np.arange(pool.num_pages), size=n, replace=False)
    plan = plan_cache_to_pool(kv, pool, blocks=blocks, pages=pages)

    got = poisoned(pool.nbytes, "cuda")
    copy_ranges(src_buf, got, plan)
    want = poisoned(pool.nbytes, "cpu")
    copy_ranges_ref(src_buf.cpu(), want, plan)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want), "gather differs from the reference"

    dst_layers = vllm_like_cache(layers, 50, heads, block, c, dtype, layout, device="cuda")
    kv_d, dst_buf = kv_layout_of(dst_layers)
    dst_buf.fill_(0x5A)
    back = plan_cache_to_pool(kv_d, pool, blocks=rng.choice(np.arange(1, 50), size=n, replace=False),
                              pages=pages).swapped()
    want_d = dst_buf.cpu().clone()
    copy_ranges(got, dst_buf, back)
    copy_ranges_ref(want, want_d, back)
    torch.cuda.synchronize()
    assert torch.equal(dst_buf.cpu(), want_d), "scatter differs from the reference"


@pytest.mark.parametrize("size", [1, 15, 16, 17, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 16, 5 * CHUNK_BYTES + 7])
def test_any_length_and_alignment(size):
    src = torch.randint(0, 256, (8 * CHUNK_BYTES,), dtype=torch.uint8, device="cuda")
    rng = np.random.default_rng(size)
    offsets = [(int(rng.integers(0, 3 * CHUNK_BYTES)), int(rng.integers(0, 2 * CHUNK_BYTES)))]
    if size % 16 == 0:
        offsets.append((16 * 1000, 16 * 3000))  # the 16-byte path
    for so, do in offsets:
        plan = coalesce(np.array([so]), np.array([do]), np.array([size]))
        got = poisoned(8 * CHUNK_BYTES, "cuda")
        want = poisoned(8 * CHUNK_BYTES, "cpu")
        copy_ranges(src, got, plan)
        copy_ranges_ref(src.cpu(), want, plan)
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), want), (size, so, do)


def test_many_ranges_in_one_launch():
    src = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, device="cuda")
    rng = np.random.default_rng(5)
    n = 4096
    plan = coalesce(rng.permutation(n).astype(np.int64) * 16384, rng.permutation(n).astype(np.int64) * 16384,
                    np.full(n, 16384, dtype=np.int64))
    got = poisoned(64 << 20, "cuda")
    copy_ranges(src, got, plan)
    want = poisoned(64 << 20, "cpu")
    copy_ranges_ref(src.cpu(), want, plan)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("n", sorted({1, *INLINE_ROWS, *(r + 1 for r in INLINE_ROWS)}))
@pytest.mark.parametrize("width", [4096, 4100])  # the 16-byte path and the byte path
def test_inline_and_table_launches_agree_at_every_capacity_edge(n, width):
    """A plan of up to the largest inline capacity travels in the launch parameters, a larger
    one as an uploaded table; both must match the reference on either side of each edge."""
    rng = np.random.default_rng(n * 7 + width)
    src = torch.randint(0, 256, (n * width + 64,), dtype=torch.uint8, device="cuda")
    # Scattered destinations, so that no two ranges coalesce: the plan keeps exactly n rows.
    plan = coalesce(rng.permutation(n).astype(np.int64) * width,
                    rng.permutation(n).astype(np.int64) * (width + 16) + 3, np.full(n, width, dtype=np.int64))
    assert len(plan) == n
    want = poisoned(n * (width + 16) + 64, "cpu")
    copy_ranges_ref(src.cpu(), want, plan)
    stream = torch.cuda.current_stream()
    for inline in (True, False):
        got = poisoned(want.numel(), "cuda")
        p = prepare_copy(src.data_ptr(), got.data_ptr(), plan, device=got.device, stream=stream, inline=inline)
        assert p.inline == (inline and n <= max(INLINE_ROWS)), "the launch took the other path"
        run_copy(p, stream)
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), want), f"inline={inline}"


def test_launch_from_a_fresh_thread():
    """A thread that never touched CUDA must still launch (the driver launch needs a current
    context; ops binds one on a thread's first launch)."""
    import threading

    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    got = poisoned(1 << 20, "cuda")
    plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 20]))
    errors: list[BaseException] = []

    def body():
        try:
            copy_ranges(src, got, plan)
            torch.cuda.synchronize()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert not errors, errors
    assert torch.equal(got, src)
