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
