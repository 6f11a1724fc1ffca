"""End-to-end hand-off between two processes: paged cache -> decode pool -> paged cache.

The decode side (a child process) runs a KVReceiver (pool, zmq control server, transport) over
a paged KV cache; this process runs a KVSender over its own. One hand-off is: Allocate (zmq),
the transport's copy from the prefill's paged blocks straight into the pool pages, TransferDone
(zmq), then the decode loader's scatter into the decode's paged blocks. Its time runs from the
sender's submit to the moment the decode side has the bytes in its blocks (one host clock:
both processes are on this machine). Shape: Llama-3-8B KV (32 layers, 8 KV heads, head 128,
bf16, block 16, 128 KiB per token), random block tables on both sides. The ceiling is an
in-process ``dst.copy_(src)`` of the same bytes between the same devices, measured in this run.
Each hand-off's bytes are checked against the source (sha256 of the blocks) on the last repeat.

    python benchmarks/handoff.py --transport cuda_ipc --tokens 128,1024,8192,32768
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np
import torch
from _common import pick_devices

from lmcache_pd import config_from_dict
from lmcache_pd import protocol as P

LAYERS, HEADS, BLOCK, C = 32, 8, 16, 256


def cache(num_blocks: int, device: str, seed: int) -> list[torch.Tensor]:
    per_layer = num_blocks * HEADS * BLOCK * C
    g = torch.Generator(device=device).manual_seed(seed)
    buf = torch.randn(LAYERS * per_layer, dtype=torch.bfloat16, device=device, generator=g)
    return [buf[i * per_layer:(i + 1) * per_layer].view(num_blocks, HEADS, BLOCK, C) for i in range(LAYERS)]


def blocks_hash(layers: list[torch.Tensor], blocks: list[int]) -> str:
    idx = torch.tensor(blocks, device=layers[0].device)
    h = hashlib.sha256()
    for t in layers:
        h.update(t.index_select(0, idx).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def compat(kv_page_bytes: int, transport: str) -> P.CompatInfo:
    return P.CompatInfo(model="llama-3-8b-shape", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=BLOCK,
                        num_layers=LAYERS, num_kv_heads=HEADS, head_size=C, page_bytes=kv_page_bytes, tp_size=1,
                        tp_rank=0, transport=transport, attn_backend="bench", vllm_version="none")


def decode_side(conn, cfg_dict: dict, device: str, num_blocks: int, transport: str) -> None:
    from lmcache_pd.node.receiver import KVReceiver, LoadSpec
    from lmcache_pd.ops import kv_layout_of

    cfg = config_from_dict(cfg_dict, source="benchmark")
    layers = cache(num_blocks, device, seed=2)
    kv, buf = kv_layout_of(layers)
    rx = KVReceiver(cfg, instance="decode-0", tp_rank=0, compat=compat(kv.page_bytes, transport), kv=kv,
                    kv_buffer=buf)
    rx.start()
    conn.send("ready")
    while (msg := conn.recv()) != "bye":
        kind, args = msg
        if kind == "hash":
            conn.send(blocks_hash(layers, args))
            continue
        rx.submit_load(LoadSpec(*args))
        conn.send("submitted")
        while not (done := rx.drain()):
            time.sleep(0.00005)
        conn.send((time.monotonic(), done[0].ok, done[0].error, done[0].num_bytes))
    rx.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="cuda_ipc")
    ap.add_argument("--tokens", default="128,1024,8192,32768")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--devices", default=None, help="prefill,decode devices (default cuda:0,cuda:<last>)")
    args = ap.parse_args(argv)
    from lmcache_pd import transport as transports

    ok, why = transports.available(args.transport)
    if not ok:
        print(f"skipped: transport {args.transport} unavailable: {why}")
        return 0
    p_dev, d_dev = pick_devices(args.transport, args.devices)
    tokens = [int(t) for t in args.tokens.split(",")]
    max_blocks = max(tokens) // BLOCK
    num_blocks = max_blocks * 2 + 8
    page = LAYERS * HEADS * BLOCK * C * 2
    from lmcache_pd.cli.local import free_ports

    http_p, http_d, ctrl, data = free_ports(4)
    cfg_dict = {
        "model": {"path": "none"},
        "prefill": [{"name": "prefill-0", "http_port": http_p}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data}],
        "transport": {"name": args.transport},
        "pool": {"size_mib": max_blocks * page // 2**20 + 64},
    }
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=decode_side, args=(child, cfg_dict, d_dev, num_blocks, args.transport), daemon=True)
    proc.start()
    assert parent.recv() == "ready"

    from lmcache_pd.node.sender import KVSender, SendSpec
    from lmcache_pd.ops import kv_layout_of

    cfg = config_from_dict(cfg_dict, source="benchmark")
    layers = cache(num_blocks, p_dev, seed=1)
    kv, buf = kv_layout_of(layers)
    tx = KVSender(cfg, instance="prefill-0", tp_rank=0, compat=compat(kv.page_bytes, args.transport), kv=kv,
                  kv_buffer=buf)
    tx.start()
    rng = np.random.default_rng(0)
    seq = iter(range(10**9))
    where = f"{p_dev} -> {d_dev}" + (f" ({torch.cuda.get_device_name(0)})" if "cuda" in p_dev else "")
    print(f"# {args.transport} hand-off, {where}; python {sys.version.split()[0]}, torch {torch.__version__}")
    print("# Llama-3-8B KV (32 layers, 8 heads, head 128, bf16, block 16); median of", args.repeat)
    print(f"{'tokens':>7} {'bytes':>9} {'hand-off ms':>12} {'GB/s':>8} {'copy GB/s':>10} {'ratio':>6}  check")

    def one(n_tok: int) -> tuple[float, str, list[int], list[int]]:
        n = n_tok // BLOCK
        p_blocks = [int(b) for b in rng.choice(np.arange(num_blocks), n, replace=False)]
        d_blocks = [int(b) for b in rng.choice(np.arange(num_blocks), n, replace=False)]
        tid = f"t{next(seq)}"
        digest = P.prompt_digest(list(range(n_tok)))
        parent.send(("load", (f"d-{tid}", tid, n_tok, digest, tuple(d_blocks))))
        assert parent.recv() == "submitted"
        t0 = time.monotonic()
        tx.submit(SendSpec(f"p-{tid}", tid, "decode-0", tuple(p_blocks), n_tok, digest))
        t_done, ok, error, nbytes = parent.recv()
        sent = []
        while not sent:
            sent = tx.drain()
        if not ok or not sent[0].ok:
            raise RuntimeError(f"hand-off failed: {error or sent[0].error}")
        return t_done - t0, f"{nbytes}", p_blocks, d_blocks

    one(tokens[0])  # links the peers (handshake, IPC open) and builds the kernels
    for n_tok in tokens:
        nbytes = n_tok * LAYERS * HEADS * C * 2
        a = torch.empty(nbytes, dtype=torch.uint8, device=p_dev)
        b = torch.empty(nbytes, dtype=torch.uint8, device=d_dev)
        times, copies = [], []
        for _ in range(args.repeat):
            dt, _, p_blocks, d_blocks = one(n_tok)
            times.append(dt)
            t0 = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize(b.device) if b.is_cuda else None
            copies.append(time.perf_counter() - t0)
        parent.send(("hash", d_blocks))
        check = "bitwise" if parent.recv() == blocks_hash(layers, p_blocks) else "MISMATCH"
        t, c = statistics.median(times), statistics.median(copies)
        print(f"{n_tok:>7} {nbytes / 2**20:>7.0f}Mi {t * 1e3:>12.3f} {nbytes / t / 1e9:>8.1f} {nbytes / c / 1e9:>10.1f} "
              f"{c / t:>6.2f}  {check}", flush=True)
        del a, b
    tx.close()
    parent.send("bye")
    proc.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
