"""What preparing a NIXL transfer ahead could save: ``initialize_xfer`` against the post.

cuda_ipc lays a reserved hand-off's launch out at its grant (``Transport.prepare_submit``,
``capabilities.prepares``) because building it cost more than the copy. For nixl the
equivalent is building the transfer's descriptor lists and request (``get_xfer_descs`` and
``initialize_xfer``) ahead, leaving only ``transfer`` (the post) and the wait. This times the
two apart, decode side in a process of its own as in production, for plans of N ranges of one
size, and prints the part of the hand-off's host time that preparing ahead would take away.

    python benchmarks/nixl_prepare.py --ranges 16,256,4096 --range-bytes 4096
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch
from _common import human


def _agent(nixl, name: str):
    return nixl.nixl_agent(name, nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


def _decode(conn, nbytes: int, device: str) -> None:
    from lmcache_pd.transport.nixl import _import_nixl

    nixl = _import_nixl()
    agent = _agent(nixl, "decode")
    pool = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    agent.register_memory(pool)
    conn.send((agent.get_agent_metadata(), pool.data_ptr()))
    while not conn.poll(0.0005):
        agent.get_new_notifs()  # target-side progress (UCX's tcp transport needs it)
    conn.recv()


def _descs(n: int, base: int, size: int, stride: int, device: int) -> np.ndarray:
    d = np.empty((n, 3), dtype=np.uint64)
    d[:, 0] = base + np.arange(n, dtype=np.uint64) * stride
    d[:, 1] = size
    d[:, 2] = device
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranges", default="16,256,4096")
    ap.add_argument("--range-bytes", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    from lmcache_pd.transport.nixl import _import_nixl

    nixl = _import_nixl()
    counts = [int(x) for x in a.ranges.split(",")]
    # Every other range of the source and of the pool: no two coalesce.
    nbytes = 2 * max(counts) * a.range_bytes
    device = torch.device(a.device)
    mem, dev = ("VRAM", device.index or 0) if device.type == "cuda" else ("DRAM", 0)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode, args=(child, nbytes, a.device), daemon=True)
    proc.start()
    metadata, remote_base = parent.recv()
    agent = _agent(nixl, "prefill")
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=a.device)
    agent.register_memory(src)
    peer = agent.add_remote_agent(metadata)
    peer = peer.decode() if isinstance(peer, bytes) else peer
    print(f"nixl, {mem} -> {mem} (decode in its own process), ranges of {human(a.range_bytes)}, median of {a.repeat}")
    print("| ranges | bytes | prepare (descs + initialize_xfer) us | post (transfer) us | wait us | "
          "prepare / (prepare + post + wait) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        local = _descs(n, src.data_ptr(), a.range_bytes, 2 * a.range_bytes, dev)
        remote = _descs(n, remote_base, a.range_bytes, 2 * a.range_bytes, dev)
        prep, post, wait = [], [], []
        for i in range(a.repeat + 1):
            t0 = time.perf_counter()
            xfer = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local, mem),
                                         agent.get_xfer_descs(remote, mem), peer)
            t1 = time.perf_counter()
            state = agent.transfer(xfer)
            t2 = time.perf_counter()
            while state == "PROC":
                state = agent.check_xfer_state(xfer)
            t3 = time.perf_counter()
            agent.release_xfer_handle(xfer)
            if state != "DONE":
                raise SystemExit(f"transfer ended {state}")
            if i:  # (the first connects)
                prep.append(t1 - t0)
                post.append(t2 - t1)
                wait.append(t3 - t2)
        p, q, w = (statistics.median(v) * 1e6 for v in (prep, post, wait))
        print(f"| {n} | {human(n * a.range_bytes)} | {p:.1f} | {q:.1f} | {w:.1f} | {p / (p + q + w):.1%} |")
    parent.send("bye")
    proc.join(10)


if __name__ == "__main__":
    main()
