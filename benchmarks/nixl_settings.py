"""Which NIXL/UCX settings make VRAM -> VRAM fast: the same transfers under each setting.

Every setting runs ``transfer.py --transports nixl --no-handoff`` in a fresh process (UCX reads
its environment once, at start), two processes per transfer as in production, and reports
GB/s beside the in-process device copy and the UCX transport that carried the data. One more
row puts both agents in one process, the set-up that once measured 0.47 GB/s from one H200 to
another (NIXL 1.5.1, 256 MiB, VRAM to VRAM), to show the cause.

    python benchmarks/nixl_settings.py --sizes 16M,256M,1G
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import human, parse_size, pick_devices

SETTINGS: list[tuple[str, dict[str, str], dict]] = [
    ("defaults (UCX chooses)", {}, {}),
    ("UCX_TLS=cuda_ipc,cuda_copy,tcp", {"UCX_TLS": "cuda_ipc,cuda_copy,tcp"}, {}),
    ("UCX_TLS=^cuda_ipc (no CUDA IPC)", {"UCX_TLS": "^cuda_ipc"}, {}),
    ("NIXL progress thread on", {}, {"progress_thread": True}),
]


def run_setting(env: dict[str, str], options: dict, sizes: str, repeat: int, devices: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(__file__).with_name("transfer.py")), "--transports", "nixl", "--no-handoff",
               "--sizes", sizes, "--repeat", str(repeat), "--devices", devices, "--options", json.dumps(options),
               "--out", out]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
        result = Path(out, "transfer.json")
        if proc.returncode or not result.exists():
            tail = (proc.stdout + proc.stderr)[-800:]
            return [{"error": f"exit {proc.returncode}: {tail}"}]
        return json.loads(result.read_text())["rows"]


def same_process(size: int, repeat: int, src: str, dst: str) -> dict:
    """Both agents in this process (UCX cannot use CUDA IPC to itself)."""
    from lmcache_pd import coalesce
    from lmcache_pd import transport as transports

    rx, tx = transports.create("nixl", {}), transports.create("nixl", {})
    try:
        pool = rx.allocate(size, torch.device(dst))
        peer = tx.connect(rx.export_descriptor(rx.register(pool)), timeout_s=30)
        region = tx.register(torch.ones(size, dtype=torch.uint8, device=src))
        plan = coalesce(np.array([0]), np.array([0]), np.array([size]))
        times = []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            h = tx.submit(peer, region, plan, timeout_s=300)
            while not tx.poll(h).terminal:
                time.sleep(0.0002)
            if i:
                times.append(time.perf_counter() - t0)
            assert h.state.name == "DONE", h.error
            h.close()
        return {"size": size, "kind": "raw/contiguous", "gbps": size / float(np.median(times)) / 1e9,
                "path": tx.stats.path}
    finally:
        tx.close()
        rx.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16M,256M,1G")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--devices", default=None)
    ap.add_argument("--same-process-size", default="256M")
    args = ap.parse_args(argv)
    src, dst = pick_devices("nixl", args.devices)
    print(f"# NIXL settings, {src} -> {dst}" + (f" ({torch.cuda.get_device_name(0)})" if "cuda" in src else ""))
    print(f"{'setting':<34} {'size':>8} {'layout':>15} {'GB/s':>8} {'ceiling':>8} {'ratio':>6}  carried by")
    for name, env, options in SETTINGS:
        for r in run_setting(env, options, args.sizes, args.repeat, f"{src},{dst}"):
            if "error" in r:
                print(f"{name:<34} failed: {r['error']}")
                continue
            print(f"{name:<34} {human(r['size']):>8} {r['kind']:>15} {r['gbps']:>8.2f} {r['ceiling_gbps']:>8.2f} "
                  f"{r['ratio']:>6.2f}  {r['path'] or '?'}", flush=True)
    r = same_process(parse_size(args.same_process_size), args.repeat, src, dst)
    print(f"{'both agents in one process':<34} {human(r['size']):>8} {r['kind']:>15} {r['gbps']:>8.2f} "
          f"{'':>8} {'':>6}  {r['path'] or '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
