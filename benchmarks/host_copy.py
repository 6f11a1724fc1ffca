"""The decode's CPU scatter: a plan of scattered ranges copied in host memory (ops.copy_ranges).

Times, per total size and range size (random source and destination slots, as the decode's
scatter meets them): the compiled loop (host_copy.py), the Python loop of ctypes.memmove it
replaced, and the ceiling, one memcpy of the same bytes (contiguous), measured in this run.

    python benchmarks/host_copy.py [--sizes 16M,64M] [--ranges 4K,16K,64K] [--repeat 9]
"""

from __future__ import annotations

import argparse
import ctypes

import numpy as np
import torch
from _common import host_seconds, parse_size

from lmcache_pd import host_copy
from lmcache_pd.layout import RangePlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16M,64M")
    ap.add_argument("--ranges", default="4K,16K,64K")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    fn = host_copy.compiled()
    print(f"# host range copy; compiled loop: {'yes' if fn else 'NO (no C compiler)'}; torch {torch.__version__}; "
          f"median of {args.repeat}")
    print(f"{'size':>6} {'range':>6} {'ranges':>7} {'compiled ms':>12} {'python loop ms':>15} "
          f"{'memcpy ms':>10} {'compiled GB/s':>14} {'memcpy GB/s':>12} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for size in map(parse_size, args.sizes.split(",")):
        for length in map(parse_size, args.ranges.split(",")):
            _row(fn, size, length, rng, args.repeat)


def _row(fn, size: int, length: int, rng: np.random.Generator, repeat: int) -> None:
    n = size // length
    slots = n + n // 8  # a pool and a cache somewhat larger than the hand-off
    src = torch.randint(0, 256, (slots * length,), dtype=torch.uint8)
    dst = torch.zeros(slots * length, dtype=torch.uint8)
    plan = RangePlan(rng.permutation(slots)[:n].astype(np.int64) * length,
                     rng.permutation(slots)[:n].astype(np.int64) * length, np.full(n, length, dtype=np.int64))
    s0, d0 = src.data_ptr(), dst.data_ptr()
    offsets = list(zip(plan.src_offsets.tolist(), plan.dst_offsets.tolist(), plan.lengths.tolist()))

    def loop() -> None:
        for s, d, m in offsets:
            ctypes.memmove(d0 + d, s0 + s, m)

    compiled = float("nan")
    if fn is not None:
        compiled = host_seconds(lambda: host_copy.copy(fn, s0, d0, plan.src_offsets, plan.dst_offsets, plan.lengths),
                                repeat, sync=False, warmup=0)
        check = torch.zeros_like(dst)
        for s, d, m in offsets:
            check[d:d + m] = src[s:s + m]
        assert torch.equal(check, dst), "the compiled loop's copy differs from slice copies"
    python = host_seconds(loop, repeat, sync=False, warmup=0)
    memcpy = host_seconds(lambda: ctypes.memmove(d0, s0, size), repeat, sync=False, warmup=0)
    print(f"{size >> 20:>5}M {length >> 10:>5}K {n:>7} {compiled * 1e3:>12.2f} {python * 1e3:>15.2f} "
          f"{memcpy * 1e3:>10.2f} {size / compiled / 1e9:>14.2f} {size / memcpy / 1e9:>12.2f} "
          f"{memcpy / compiled:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
