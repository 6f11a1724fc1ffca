"""Where the host time of one kernel copy goes (for small hand-offs, where it dominates).

Times, on the host, the median of many calls of each step of ``ops.copy_ranges`` for a
Llama-3-8B 128-token hand-off (16 MiB, 256 ranges of 64 KiB), beside the same-size
``dst.copy_(src)`` call as the ceiling.

    python benchmarks/launch_overhead.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import host_seconds

from lmcache_pd import PoolLayout, plan_cache_to_pool
from lmcache_pd.ops import copy_ranges, cuda_kernels_available, kv_layout_of, prepare_copy, run_copy


def us(fn, n: int = 200, sync: bool = False) -> float:
    return host_seconds(fn, n, sync=sync, warmup=10) * 1e6


def main() -> int:
    ok, why = cuda_kernels_available()
    if not ok:
        print(f"skipped: {why}")
        return 0
    big = torch.randn(32 * 64 * 8 * 16 * 256, dtype=torch.bfloat16, device="cuda")
    layers = [big[i * 64 * 8 * 16 * 256:(i + 1) * 64 * 8 * 16 * 256].view(64, 8, 16, 256) for i in range(32)]
    kv, buf = kv_layout_of(layers)
    pool = PoolLayout.sized(kv, 16 * kv.page_bytes)
    pool_buf = torch.empty(pool.nbytes, dtype=torch.uint8, device="cuda")
    rng = np.random.default_rng(0)
    plan = plan_cache_to_pool(kv, pool, blocks=rng.choice(np.arange(64), 8, replace=False), pages=np.arange(8))
    stream = torch.cuda.current_stream()
    a = torch.empty(plan.nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    src, dst = buf.data_ptr(), pool_buf.data_ptr()
    inline = prepare_copy(src, dst, plan, device=buf.device, stream=stream)
    table = prepare_copy(src, dst, plan, device=buf.device, stream=stream, inline=False)
    import cupy

    empty = cupy.RawKernel('extern "C" __global__ void nothing() {}', "nothing")
    rows = [
        ("plan_cache_to_pool (numpy)", us(lambda: plan_cache_to_pool(kv, pool, blocks=np.arange(8), pages=np.arange(8)))),
        (f"prepare_copy, inline={inline.inline}", us(lambda: prepare_copy(src, dst, plan, device=buf.device,
                                                                          stream=stream))),
        ("prepare_copy, table + upload", us(lambda: prepare_copy(src, dst, plan, device=buf.device, stream=stream,
                                                                 inline=False))),
        ("run_copy, inline launch", us(lambda: run_copy(inline, stream))),
        ("run_copy, table launch", us(lambda: run_copy(table, stream))),
        ("empty cupy kernel launch", us(lambda: empty((1,), (1,), ()))),
        ("copy_ranges, whole call", us(lambda: copy_ranges(buf, pool_buf, plan))),
        ("copy_ranges, whole call + sync", us(lambda: copy_ranges(buf, pool_buf, plan), sync=True)),
        ("dst.copy_(src) call", us(lambda: b.copy_(a))),
        ("dst.copy_(src) call + sync", us(lambda: b.copy_(a), sync=True)),
    ]
    print(f"# {torch.cuda.get_device_name(0)}; 16 MiB, {len(plan)} ranges; median microseconds per call")
    for name, t in rows:
        print(f"{name:<40} {t:>9.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
