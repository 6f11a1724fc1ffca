"""Hand-offs between TP sizes, every rank a process of its own (issue 20, docs/tensor_parallel.md).

For each (prefill TP, decode TP) shape, one hand-off of the Llama-3-8B KV shape (32 layers,
8 KV heads, head 128, bf16, block 16: 128 KiB per token over all ranks) is timed from the
moment every prefill rank is told to send (their decode pages reserved ahead, as the
connector does) to the moment the last decode rank has its heads in its blocks (one host
clock: every process on this machine). Between TP sizes each prefill rank writes the heads each
decode rank holds straight into that rank's pool pages, cut at head boundaries (heads.plan_heads):
2 -> 1 merges two ranks' halves into one page, 1 -> 2 splits one rank's blocks over two decode
ranks (two lanes). 1 -> 1 is the same bytes as one hand-off. The ceiling is the raw copy of the
whole KV between the same devices (a raw socket for tcp, ``dst.copy_(src)`` on a GPU), measured
in the same run. The last repeat of each size is checked bitwise on every decode rank.
On one GPU every rank shares it (two processes per side).

    python benchmarks/tp_handoff.py --transport cuda_ipc --shapes 1:1,2:1,1:2 --tokens 128,1024,8192
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np
import torch
from _ceilings import best_ceiling
from _common import pick_devices
from _pairs import BLOCK, HEADS, LAYERS, TOKEN_BYTES, C

from lmcache_pd import config_from_dict
from lmcache_pd import heads as H
from lmcache_pd import protocol as P


def full_cache(num_blocks: int, device: str) -> list[torch.Tensor]:
    """The whole model's KV cache (every head), the same random bytes in every process."""
    per_layer = num_blocks * HEADS * BLOCK * C
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(LAYERS * per_layer, dtype=torch.bfloat16, generator=g).to(device)
    return [buf[i * per_layer:(i + 1) * per_layer].view(num_blocks, HEADS, BLOCK, C) for i in range(LAYERS)]


def rank_cache(full: list[torch.Tensor], first: int, n: int) -> list[torch.Tensor]:
    """A rank's cache: heads ``first..first+n-1`` of ``full``, in one buffer (vLLM's LBHNC)."""
    nb = full[0].shape[0]
    buf = torch.empty(LAYERS * nb * n * BLOCK * C, dtype=torch.bfloat16, device=full[0].device)
    out = [buf[i * nb * n * BLOCK * C:(i + 1) * nb * n * BLOCK * C].view(nb, n, BLOCK, C) for i in range(LAYERS)]
    for mine, whole in zip(out, full):
        mine.copy_(whole[:, first:first + n])
    return out


def compat(tp: int, rank: int, n: int, transport: str) -> P.CompatInfo:
    return P.CompatInfo(model="llama-3-8b-shape", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=BLOCK,
                        num_layers=LAYERS, num_kv_heads=n, head_size=C, page_bytes=LAYERS * n * BLOCK * C * 2,
                        tp_size=tp, tp_rank=rank, model_kv_heads=HEADS, transport=transport, attn_backend="bench",
                        vllm_version="none")


def _rank(conn, role: str, rank: int, tp: int, cfg_dict: dict, device: str, num_blocks: int) -> None:
    """One rank. Commands: ("arm", tid, tokens, p_blocks, d_blocks): the decode submits its load,
    the prefill reserves its pages; ("send",): the prefill submits; ("end",): each answers its
    result (the decode: when its load ended, monotonic); ("check", p_blocks, d_blocks): the
    decode's blocks against the full cache's heads it holds."""
    from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
    from lmcache_pd.node.receiver import KVReceiver
    from lmcache_pd.node.sender import KVSender
    from lmcache_pd.node.worker import NodeConfig, Worker
    from lmcache_pd.ops import kv_layout_of

    cfg = config_from_dict(cfg_dict, source="benchmark")
    full = full_cache(num_blocks, device)
    first, n = H.rank_heads(HEADS, tp)[rank]
    layers = rank_cache(full, first, n)
    if role == "prefill":
        del full  # (only the decode checks against it)
    kv, buf = kv_layout_of(layers)
    decode = role == "decode"
    worker = Worker(f"{role}-0", rank, compat(tp, rank, n, cfg.transport.name))
    node = (KVReceiver if decode else KVSender)(worker, NodeConfig.of(cfg), kv=kv, kv_buffer=buf)
    node.start()
    conn.send("ready")
    spec = None
    while (msg := conn.recv())[0] != "bye":
        if msg[0] == "arm":
            _, tid, n_tok, p_blocks, d_blocks = msg
            digest = P.prompt_digest(list(range(n_tok)))
            if decode:
                node.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", n_tok, digest), tuple(d_blocks)))
            else:
                h = Handoff(tid, "decode-0", n_tok, digest)
                node.reserve(h).result(60)
                spec = SendSpec(f"p-{tid}", h, tuple(p_blocks))
            conn.send("armed")
        elif msg[0] == "send":
            node.submit(spec)
        elif msg[0] == "end":
            got = []
            while not got:
                got = node.drain(wait_s=1.0) if decode else node.drain()
                if not got and not decode:
                    time.sleep(0.0001)
            r = got[0]
            conn.send((time.monotonic(), r.ok, r.error, r.num_bytes))
        elif msg[0] == "check":
            _, p_blocks, d_blocks = msg
            conn.send(all(torch.equal(whole[pb, first:first + n], mine[db])
                          for whole, mine in zip(full, layers) for pb, db in zip(p_blocks, d_blocks)))
    node.close()


class Shape:
    """Prefill TP ``p`` and decode TP ``d``, every rank started as a process."""

    def __init__(self, p: int, d: int, transport: str, max_tokens: int, p_dev: str, d_dev: str):
        from lmcache_pd.cli.local import free_ports

        self.p, self.d = p, d
        max_blocks = -(-max_tokens // BLOCK)
        self.num_blocks = max_blocks * 2 + 8
        (http_p, http_d), (ctrl, data) = free_ports(2), free_ports(2, width=d)
        page = LAYERS * (HEADS // d) * BLOCK * C * 2
        cfg = {"model": {"path": "none"},
               "prefill": [{"name": "prefill-0", "http_port": http_p, "tp_size": p}],
               "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data,
                           "tp_size": d}],
               "transport": {"name": transport, "layerwise": False},
               "pool": {"size_mib": max_blocks * page // 2**20 + 64},
               "timeouts": {"data_s": 120, "transfer_s": 180}}
        ctx = mp.get_context("spawn")
        self.ranks: list[tuple[str, object, object]] = []
        for role, tp, dev in (("decode", d, d_dev), ("prefill", p, p_dev)):  # the decode listens first
            for rank in range(tp):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_rank, args=(theirs, role, rank, tp, cfg, dev, self.num_blocks), daemon=True)
                proc.start()
                self.ranks.append((role, mine, proc))
        for role, conn, _ in self.ranks:
            if not conn.poll(600) or conn.recv() != "ready":
                raise RuntimeError(f"a {role} rank did not start")
        self.rng = np.random.default_rng(0)
        self.seq = 0
        self.last: tuple[list[int], list[int]] = ([], [])

    def of(self, role: str) -> list:
        return [conn for r, conn, _ in self.ranks if r == role]

    def once(self, n_tok: int) -> tuple[float, int]:
        """One hand-off: its seconds, and the bytes the prefill ranks sent."""
        n = -(-n_tok // BLOCK)
        p_blocks = [int(b) for b in self.rng.choice(self.num_blocks, n, replace=False)]
        d_blocks = [int(b) for b in self.rng.choice(self.num_blocks, n, replace=False)]
        self.seq += 1
        for conn in self.of("decode") + self.of("prefill"):
            conn.send(("arm", f"t{self.seq}", n_tok, p_blocks, d_blocks))
        for conn in self.of("decode") + self.of("prefill"):
            assert conn.recv() == "armed"
        t0 = time.monotonic()
        for conn in self.of("prefill"):
            conn.send(("send",))
        ends = []
        for conn in self.of("decode") + self.of("prefill"):
            conn.send(("end",))
            ends.append(conn.recv())
        bad = [e[2] for e in ends if not e[1]]
        if bad:
            raise RuntimeError(f"hand-off failed: {bad}")
        self.last = (p_blocks, d_blocks)
        return max(e[0] for e in ends[:self.d]) - t0, sum(e[3] for e in ends[self.d:])

    def check_last(self) -> bool:
        for conn in self.of("decode"):
            conn.send(("check", *self.last))
        return all([conn.recv() for conn in self.of("decode")])

    def close(self) -> None:
        for _, conn, _proc in self.ranks:
            conn.send(("bye",))
        for _, _, proc in self.ranks:
            proc.join(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="cuda_ipc")
    ap.add_argument("--shapes", default="1:1,2:1,1:2", help="prefill TP:decode TP, comma-separated")
    ap.add_argument("--tokens", default="128,1024,8192")
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
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    where = f"{p_dev} -> {d_dev}" + (f" ({torch.cuda.get_device_name(0)})" if "cuda" in p_dev else "")
    print(f"# {args.transport} hand-offs between TP sizes, every rank a process, {where}; python "
          f"{sys.version.split()[0]}, torch {torch.__version__}; Llama-3-8B KV (32 layers, 8 KV heads over "
          f"the ranks, head 128, bf16, block 16); pages reserved ahead; median of {args.repeat}")
    print(f"{'P:D':>4} {'tokens':>7} {'bytes':>9} {'hand-off ms':>12} {'GB/s':>8} {'ceiling GB/s':>13} "
          f"{'ratio':>6}  check")
    status = 0
    for p, d in shapes:
        shape = Shape(p, d, args.transport, max(tokens), p_dev, d_dev)
        try:
            shape.once(tokens[0])  # links every lane (handshakes, IPC opens)
            for n_tok in tokens:
                nbytes = n_tok * TOKEN_BYTES
                ceiling = best_ceiling(args.transport, nbytes, p_dev, d_dev)
                times, copies, sent = [], [], 0
                for _ in range(args.repeat):  # taking turns: both meet the same machine state
                    t, sent = shape.once(n_tok)
                    times.append(t)
                    copies.append(ceiling.once())
                ceiling.close()
                ok = shape.check_last() and sent == -(-n_tok // BLOCK) * BLOCK * TOKEN_BYTES
                status |= not ok
                t, c = statistics.median(times), statistics.median(copies)
                print(f"{p}:{d:<2} {n_tok:>7} {nbytes / 2**20:>7.0f}Mi {t * 1e3:>12.3f} {nbytes / t / 1e9:>8.2f} "
                      f"{nbytes / c / 1e9:>13.2f} {c / t:>6.2f}  {'bitwise' if ok else 'MISMATCH'}", flush=True)
        finally:
            shape.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
