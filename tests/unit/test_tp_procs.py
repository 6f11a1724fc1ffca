"""Prefill and decode of different TP sizes with every rank a process of its own (issue 20), as
vLLM runs them: TP 2 -> 1 and 1 -> 2. Each rank's KV cache is its share of the heads of one
full cache (the same random bytes in every process); every decode rank's blocks must end up
bitwise equal to the full cache's heads it holds. Over cuda_ipc, on one GPU, this is the GPU
path between processes (IPC handles, not the in-process shortcut test_tp_node.py takes); over
tcp and nixl it runs anywhere."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from lmcache_pd import heads as H
from lmcache_pd import transport as transports
from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import vllm_like_cache
from tests.unit.nodes import BLOCK, LAYERS
from tests.unit.tp_nodes import C, TPNode, rank_cache

P_BLOCKS, D_BLOCKS = tuple(range(3, 23)), tuple(range(20, 40))
TOKENS = 20 * BLOCK - 5


def _rank(role: str, rank: int, shape: tuple[int, int, int], cfg_dict: dict, conn) -> None:
    """One rank: its share of the full cache, its sender or receiver; on "go" one hand-off or
    load; sends back (ok, bytes, error, bitwise) and waits for "bye"."""
    p, d, heads = shape
    cfg = config_from_dict(cfg_dict, source="test")
    dev = "cuda" if cfg.transport.name == "cuda_ipc" else "cpu"
    full = vllm_like_cache(LAYERS, 40, heads, BLOCK, C, torch.bfloat16, "LBHNC", dev)
    decode = role == "decode"
    tp = d if decode else p
    first, n = H.rank_heads(heads, tp)[rank]
    layers = rank_cache(full, first, n, 48 if decode else 40, dev, fill=0xEE if decode else None)
    kv, buf = kv_layout_of(layers)
    worker = Worker(f"{role}-0", rank, TPNode.compat(tp, rank, n, heads))
    node = (KVReceiver if decode else KVSender)(worker, NodeConfig.of(cfg), kv=kv, kv_buffer=buf)
    node.start()
    try:
        conn.send("up")
        assert conn.recv() == "go"
        if decode:
            node.submit_load(LoadSpec(f"d{rank}", Handoff("t", "prefill-0", TOKENS, "d" * 32), D_BLOCKS))
        else:
            node.submit(SendSpec(f"p{rank}", Handoff("t", "decode-0", TOKENS, "d" * 32), P_BLOCKS))
        deadline, got = time.monotonic() + 30, []
        while not got and time.monotonic() < deadline:
            got = node.drain()
            time.sleep(0.005)
        if not got:
            conn.send((False, 0, "no result within 30 s", False))
        else:
            r = got[0]
            bitwise = decode and r.ok and all(
                torch.equal(whole[pb, first:first + n].contiguous().view(torch.uint8), mine[db].view(torch.uint8))
                for whole, mine in zip(full, layers) for pb, db in zip(P_BLOCKS, D_BLOCKS))
            conn.send((r.ok, r.num_bytes, r.error, bitwise))
        conn.recv()
    finally:
        node.close()


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 2)], ids=["2->1", "1->2"])
@pytest.mark.parametrize("name", ["tcp", "nixl", "cuda_ipc"])
def test_ranks_in_processes_of_their_own_hand_off_between_tp_sizes_bitwise(name, shape):
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    p, d, heads = shape
    (http_p, http_d), (ctrl, data) = free_ports(2), free_ports(2, width=d)
    t = {"handshake_s": 20, "control_s": 10, "alloc_s": 10, "transfer_s": 30, "data_s": 10, "lease_s": 30,
         "heartbeat_s": 1}
    cfg = {"model": {"path": "tiny"},
           "prefill": [{"name": "prefill-0", "http_port": http_p, "tp_size": p}],
           "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data,
                       "tp_size": d}],
           "transport": {"name": name, "layerwise": False}, "pool": {"size_mib": 8}, "timeouts": t}
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        for role, tp in (("decode", d), ("prefill", p)):  # the decode ranks listen first
            for rank in range(tp):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_rank, args=(role, rank, shape, cfg, theirs), daemon=True)
                proc.start()
                procs.append(proc)
                pipes.append((role, rank, mine))
        for role, rank, conn in pipes:
            assert conn.poll(120), f"{role} rank {rank} did not start"
            assert conn.recv() == "up"
        for _, _, conn in pipes:
            conn.send("go")
        out = {}
        for role, rank, conn in pipes:
            assert conn.poll(60), f"{role} rank {rank} did not answer"
            out[(role, rank)] = conn.recv()
        whole = 20 * LAYERS * heads * BLOCK * C * 2
        for (role, rank), (ok_, nbytes, error, bitwise) in out.items():
            assert ok_, f"{role} rank {rank}: {error}"
            assert nbytes == whole // (p if role == "prefill" else d), (role, rank, nbytes)
            assert bitwise or role == "prefill", f"decode rank {rank}'s blocks differ from the full cache's heads"
    finally:
        for _, _, conn in pipes:
            try:
                conn.send("bye")
            except OSError:
                pass
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
