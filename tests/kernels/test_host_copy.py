"""The host range copy (host_copy.py, csrc/copy_ranges_host.c) against the torch reference,
bitwise on poisoned outputs: compiled with the system C compiler, and the Python loop it falls
back to when there is none."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcache_pd import host_copy
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import copy_ranges, copy_ranges_ref


def _plan(rng: np.random.Generator, n: int, size: int, slot: int) -> RangePlan:
    lengths = rng.integers(1, slot, n)  # any length and alignment
    slots = size // slot
    src = rng.permutation(slots)[:n] * slot + rng.integers(0, slot - lengths)
    dst = rng.permutation(slots)[:n] * slot + rng.integers(0, slot - lengths)
    return RangePlan(src.astype(np.int64), dst.astype(np.int64), lengths.astype(np.int64))


@pytest.mark.parametrize("slot", [3000, 20000], ids=["memmove", "streamed"])
def test_the_compiled_loop_copies_every_range_bitwise(slot):
    if host_copy.compiled() is None:
        pytest.skip("no C compiler here (the Python loop is tested below)")
    rng = np.random.default_rng(7)
    size = slot * 2000
    src = torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8))
    plan = _plan(rng, 1500, size, slot)
    assert (plan.nbytes >= host_copy.STREAM_BYTES) == (slot == 20000)
    out, ref = torch.full((size,), 0xA5, dtype=torch.uint8), torch.full((size,), 0xA5, dtype=torch.uint8)
    copy_ranges(src, out, plan)
    copy_ranges_ref(src, ref, plan)
    assert torch.equal(out, ref)
    assert int((out != 0xA5).sum()) > 0


def test_without_a_compiler_the_python_loop_copies_the_same(tmp_path):
    # A fresh process with no compiler and an empty cache: it must still copy, bitwise.
    code = """
import numpy as np, torch
from lmcache_pd import host_copy
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import copy_ranges, copy_ranges_ref
assert host_copy.compiled() is None, "a compiler was found"
src = torch.arange(100000, dtype=torch.int64).to(torch.uint8)
plan = RangePlan(np.array([5, 900, 40000]), np.array([70000, 10, 3000]), np.array([800, 2000, 17]))
out, ref = torch.zeros(100000, dtype=torch.uint8), torch.zeros(100000, dtype=torch.uint8)
copy_ranges(src, out, plan); copy_ranges_ref(src, ref, plan)
assert torch.equal(out, ref) and int(out.count_nonzero()) > 0
print("ok")
"""
    env = {"PATH": "/nonexistent", "CC": "/nonexistent/cc", "LMCACHE_PD_CACHE_DIR": str(tmp_path),
           "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("stream", [False, True], ids=["memmove", "streamed"])
def test_the_summed_copy_copies_and_sums_as_the_digest_formula_does(stream):
    """``copy_ranges_summed``: bitwise the copy, and the sum of ``digests.pool_sum`` (the GPU's
    digest formula) over the units copied, placed on either side; additive over pages."""
    from lmcache_pd.digests import pool_sum
    from lmcache_pd.layout import KVLayout, PoolLayout, plan_cache_to_pool
    from lmcache_pd.ops import copy_ranges_summed

    if host_copy.compiled() is None:
        pytest.skip("no C compiler here: the one-copy path sums with CRC-32 instead (test_one_copy.py)")
    rng = np.random.default_rng(3)
    block = 4096 if not stream else 262144  # 6 MiB a chunk: past host_copy.STREAM_BYTES
    kv = KVLayout(num_layers=3, num_blocks=40, block_bytes=block, block_stride=block,
                  layer_offsets=tuple(i * 40 * block for i in range(3)))
    chunk = PoolLayout(3, 8, block)
    cache = torch.from_numpy(rng.integers(0, 256, 3 * 40 * block, dtype=np.uint8))
    blocks = [int(b) for b in rng.permutation(40)[:8]]
    plan = plan_cache_to_pool(kv, chunk, blocks=blocks, pages=range(8))
    slot = torch.full((chunk.nbytes,), 0xA5, dtype=torch.uint8)
    saved = copy_ranges_summed(cache, slot, plan, unit_bytes=block, places_on_dst=True)
    ref = torch.full((chunk.nbytes,), 0xA5, dtype=torch.uint8)
    copy_ranges_ref(cache, ref, plan)
    assert torch.equal(slot, ref)
    assert saved == pool_sum(chunk, slot, range(8)) % (1 << 64)
    # Back into other blocks, skipping the first 3 pages: their sum from the slot adds up.
    back = plan_cache_to_pool(kv, chunk, blocks=blocks[:5], pages=range(3, 8)).swapped()
    loaded = copy_ranges_summed(slot, cache, back, unit_bytes=block, places_on_dst=False)
    assert (loaded + pool_sum(chunk, slot, range(3))) % (1 << 64) == saved
    slot[5 * block + 17] ^= 1  # one bit anywhere changes it
    assert copy_ranges_summed(slot, cache, back, unit_bytes=block, places_on_dst=False) != loaded
