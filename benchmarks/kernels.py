"""Paged-KV gather/scatter kernel (csrc/copy_ranges.cu) vs a plain device copy of the same bytes.

Shape: Llama-3-8B KV (32 layers, 8 KV heads, head size 128, K and V packed, bf16, block 16),
layout LBHNC: one block of one layer is 64 KiB, one pool page (all layers) 2 MiB, 128 KiB per
token. For each prompt length the blocks are a random block table (so nothing merges into long
ranges: the worst case), gathered into consecutive pool pages and scattered back into another
random block table. Each figure is the median of ``--repeat`` calls timed on the host until the
copy is complete, so it includes building the range table, its upload and the launch. The
ceiling is ``dst.copy_(src)`` of the same number of bytes, timed the same way in alternation.

    python benchmarks/kernels.py --tokens 128,1024,8192,32768
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
from _common import host_seconds

from lmcache_pd import PoolLayout, plan_cache_to_pool
from lmcache_pd.ops import copy_ranges, cuda_kernels_available, kv_layout_of, prepare_copy, run_copy

LAYERS, HEADS, BLOCK, C = 32, 8, 16, 256


def timed(fn, repeat: int) -> float:
    return host_seconds(fn, repeat)


def device_time(fn, repeat: int) -> float:
    """Median seconds between two events around ``fn`` on the current stream (device only)."""
    fn()
    out = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="128,1024,8192,32768")
    ap.add_argument("--repeat", type=int, default=21)
    args = ap.parse_args(argv)
    ok, why = cuda_kernels_available()
    if not ok:
        print(f"skipped: {why}")
        return 0
    tokens = [int(t) for t in args.tokens.split(",")]
    max_blocks = max(tokens) // BLOCK
    num_blocks = max_blocks + 16
    layer_elems = num_blocks * HEADS * BLOCK * C
    cache = torch.randn(LAYERS * layer_elems, dtype=torch.bfloat16, device="cuda")  # random, never zeros
    layers = [cache[i * layer_elems:(i + 1) * layer_elems].view(num_blocks, HEADS, BLOCK, C) for i in range(LAYERS)]
    kv, buf = kv_layout_of(layers)
    pool = PoolLayout.sized(kv, max_blocks * kv.page_bytes)
    pool_buf = torch.empty(pool.nbytes, dtype=torch.uint8, device="cuda")
    rng = np.random.default_rng(0)
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print("# Llama-3-8B KV (32 layers, 8 heads, head 128, bf16, block 16), random block tables")
    print("# call: host clock around copy_ranges (table build, upload, launch); kernel: device events around")
    print("# the launch alone, table already uploaded; copy: dst.copy_(src) of the same bytes, timed both ways")
    print(f"{'tokens':>7} {'bytes':>9} {'gather':>8} {'scatter':>8} {'copy':>8} {'ratio':>6} | "
          f"{'kernel':>8} {'copy':>8} {'ratio':>6}   (GB/s)")
    for n_tok in tokens:
        n = n_tok // BLOCK
        blocks = rng.choice(np.arange(num_blocks), size=n, replace=False)
        gather = plan_cache_to_pool(kv, pool, blocks=blocks, pages=np.arange(n))
        other = rng.choice(np.arange(num_blocks), size=n, replace=False)
        scatter = plan_cache_to_pool(kv, pool, blocks=other, pages=np.arange(n)).swapped()
        nbytes = gather.nbytes
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        b = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        t_copy, t_g, t_s = [], [], []
        for _ in range(3):  # alternate the three, three rounds: they see the same device state
            t_copy.append(timed(lambda a=a, b=b: b.copy_(a), args.repeat))
            t_g.append(timed(lambda p=gather: copy_ranges(buf, pool_buf, p), args.repeat))
            t_s.append(timed(lambda p=scatter: copy_ranges(pool_buf, buf, p), args.repeat))
        g, s, c = (nbytes / statistics.median(t) / 1e9 for t in (t_g, t_s, t_copy))
        stream = torch.cuda.current_stream()
        prepared = prepare_copy(buf.data_ptr(), pool_buf.data_ptr(), gather, device=buf.device, stream=stream)
        k = nbytes / device_time(lambda p=prepared, st=stream: run_copy(p, st), args.repeat) / 1e9
        kc = nbytes / device_time(lambda a=a, b=b: b.copy_(a), args.repeat) / 1e9
        print(f"{n_tok:>7} {nbytes / 2**20:>7.0f}Mi {g:>8.1f} {s:>8.1f} {c:>8.1f} {min(g, s) / c:>6.2f} | "
              f"{k:>8.1f} {kc:>8.1f} {k / kc:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
