"""Prefill and decode workers of different TP sizes in one process, for the TP tests
(test_tp_node.py, test_tp_procs.py): each rank's KV cache is its share of the heads of one full
cache (heads.rank_heads), with the CompatInfo vLLM would give it."""

from __future__ import annotations

import time

import msgspec
import torch

from lmcache_pd import heads as H
from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import vllm_like_cache
from tests.unit.nodes import BLOCK, CPT, LAYERS

C = 1024  # (nodes.py's shape: heads of BLOCK x C bf16 per block and layer)
HEAD = BLOCK * C * 2
"""Bytes of one KV head per block and layer."""


def rank_cache(full, first: int, n: int, num_blocks: int, dev: str, fill: int | None = None):
    """A rank's vLLM-like cache holding heads ``first..first+n-1`` of ``full`` (or ``fill`` bytes)."""
    layers = vllm_like_cache(LAYERS, num_blocks, n, BLOCK, C, torch.bfloat16, "LBHNC", dev)
    for mine, whole in zip(layers, full):
        if fill is None:
            mine.copy_(whole[:, first:first + n])
        else:
            mine.view(torch.uint8).fill_(fill)
    return layers


class TPNode:
    """Prefill-0 of TP ``p`` and decode-0 of TP ``d``, every rank a worker of its own, for a model
    of ``heads`` KV heads."""

    def __init__(self, p: int = 2, d: int = 1, heads: int = 2, *, group_mib: int = 128, transport: str = "tcp",
                 layerwise: bool = False, verify: bool = False, options: dict | None = None, **timeouts):
        (http_p, http_d), (ctrl, data) = free_ports(2), free_ports(2, width=d)
        t = {"handshake_s": 5, "control_s": 5, "alloc_s": 5, "transfer_s": 5, "data_s": 5, "lease_s": 10,
             "heartbeat_s": 0.5, **timeouts}
        cfg = config_from_dict({
            "model": {"path": "tiny"},
            "prefill": [{"name": "prefill-0", "http_port": http_p, "tp_size": p}],
            "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data,
                        "tp_size": d}],
            "transport": {"name": transport, "group_mib": group_mib, "layerwise": layerwise, "options": options or {}},
            "integrity": {"verify": verify}, "pool": {"size_mib": 8}, "timeouts": t}, source="test")
        dev = "cuda" if transport == "cuda_ipc" else "cpu"
        self.full = vllm_like_cache(LAYERS, 40, heads, BLOCK, C, torch.bfloat16, "LBHNC", dev)  # what TP 1 holds
        self.d_heads = H.rank_heads(heads, d)
        self.d_layers, self.receivers = [], []
        for r, (first, n) in enumerate(self.d_heads):
            layers = rank_cache(self.full, first, n, 48, dev, fill=0xEE)
            self.d_layers.append(layers)
            kv, buf = kv_layout_of(layers)
            compat = self.compat(d, r, n, heads)
            receiver = KVReceiver(Worker("decode-0", r, compat), NodeConfig.of(cfg), kv=kv, kv_buffer=buf)
            receiver.start()
            self.receivers.append(receiver)
        self.senders, self.p_layers = [], []
        for r, (first, n) in enumerate(H.rank_heads(heads, p)):
            layers = rank_cache(self.full, first, n, 40, dev)
            self.p_layers.append(layers)
            kv, buf = kv_layout_of(layers)
            sender = KVSender(Worker("prefill-0", r, self.compat(p, r, n, heads)), NodeConfig.of(cfg), kv=kv,
                              kv_buffer=buf)
            sender.start()
            self.senders.append(sender)

    @staticmethod
    def compat(tp: int, rank: int, n: int, heads: int):
        return msgspec.structs.replace(CPT, tp_size=tp, tp_rank=rank, num_kv_heads=n, model_kv_heads=heads,
                                       page_bytes=LAYERS * n * HEAD)

    @property
    def receiver(self) -> KVReceiver:
        return self.receivers[0]

    def close(self) -> None:
        for s in self.senders:
            s.close()
        for r in self.receivers:
            r.close()

    def results(self, n_send: int, n_load: int, timeout_s: float = 15):
        sends, loads = [], []
        deadline = time.monotonic() + timeout_s
        while len(sends) < n_send or len(loads) < n_load:
            assert time.monotonic() < deadline, f"only {len(sends)} sends / {len(loads)} loads ended"
            for s in self.senders:
                sends += s.drain()
            for r in self.receivers:
                loads += r.drain()
            time.sleep(0.005)
        return sends, loads

    def load_all(self, tid: str, tokens: int, d_blocks: list[int]) -> None:
        for r in self.receivers:
            r.submit_load(LoadSpec(f"d{r.worker.rank}", handoff(tid, tokens, "prefill-0"), tuple(d_blocks)))

    def assert_landed(self, p_blocks: list[int], d_blocks: list[int]) -> None:
        """Every decode rank's blocks hold the full cache's heads it holds, bitwise."""
        for r, (first, n) in enumerate(self.d_heads):
            for whole, got in zip(self.full, self.d_layers[r]):
                for pb, db in zip(p_blocks, d_blocks):
                    assert torch.equal(whole[pb, first:first + n].contiguous().view(torch.uint8),
                                       got[db].contiguous().view(torch.uint8)), (r, pb, db)
        for r in self.receivers:
            assert r.pool.free_pages == r.pool.num_pages


def handoff(tid: str, tokens: int, peer: str) -> Handoff:
    return Handoff(tid, peer, tokens, "d" * 32)
