"""A prefill of TP 2 handing off to a decode of TP 1, in one process (issue 20): two prefill
workers, each holding one of the model's two KV heads, write their heads straight into the same
pool pages of the one decode worker (heads.plan_heads; one reservation, two writers: the second
joins the first's pages), and the decode's blocks end up bitwise equal to the full cache's.
Real zmq, every transport that runs here (cuda_ipc: two writers into one GPU pool, on the H200)."""

from __future__ import annotations

import time

import msgspec
import pytest
import torch

from lmcache_pd import transport as transports
from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import vllm_like_cache
from tests.unit.nodes import BLOCK, CPT, LAYERS, PAGE

C = 1024  # (nodes.py's shape: 2 heads of BLOCK x C bf16 per block and layer)


class TPNode:
    """Prefill ranks 0 and 1 of TP 2 (one KV head each) and one decode worker of TP 1 (both heads)."""

    def __init__(self, *, group_mib: int = 128, transport: str = "tcp"):
        http_p, http_d, ctrl, data = free_ports(4)
        t = {"handshake_s": 5, "control_s": 5, "alloc_s": 5, "transfer_s": 5, "data_s": 5, "lease_s": 10,
             "heartbeat_s": 0.5}
        cfg = config_from_dict({
            "model": {"path": "tiny"},
            "prefill": [{"name": "prefill-0", "http_port": http_p, "tp_size": 2}],
            "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data}],
            "transport": {"name": transport, "group_mib": group_mib, "layerwise": False},
            "pool": {"size_mib": 4}, "timeouts": t}, source="test")
        dev = "cuda" if transport == "cuda_ipc" else "cpu"
        self.full = vllm_like_cache(LAYERS, 40, 2, BLOCK, C, torch.bfloat16, "LBHNC", dev)  # what TP 1 would hold
        self.d_layers = vllm_like_cache(LAYERS, 48, 2, BLOCK, C, torch.bfloat16, "LBHNC", dev)
        for t_ in self.d_layers:
            t_.view(torch.uint8).fill_(0xEE)
        d_kv, d_buf = kv_layout_of(self.d_layers)
        self.receiver = KVReceiver(Worker("decode-0", 0, CPT), NodeConfig.of(cfg), kv=d_kv, kv_buffer=d_buf)
        self.receiver.start()
        self.senders = []
        self.p_layers = []
        for r in range(2):
            layers = vllm_like_cache(LAYERS, 40, 1, BLOCK, C, torch.bfloat16, "LBHNC", dev)  # rank r holds head r
            for mine, whole in zip(layers, self.full):
                mine.copy_(whole[:, r:r + 1])
            self.p_layers.append(layers)
            kv, buf = kv_layout_of(layers)
            compat = msgspec.structs.replace(CPT, tp_size=2, tp_rank=r, num_kv_heads=1, page_bytes=PAGE // 2)
            sender = KVSender(Worker("prefill-0", r, compat), NodeConfig.of(cfg), kv=kv, kv_buffer=buf)
            sender.start()
            self.senders.append(sender)

    def close(self) -> None:
        for s in self.senders:
            s.close()
        self.receiver.close()

    def results(self, n_send: int, n_load: int, timeout_s: float = 15):
        sends, loads = [], []
        deadline = time.monotonic() + timeout_s
        while len(sends) < n_send or len(loads) < n_load:
            assert time.monotonic() < deadline, f"only {len(sends)} sends / {len(loads)} loads ended"
            for s in self.senders:
                sends += s.drain()
            loads += self.receiver.drain()
            time.sleep(0.005)
        return sends, loads


@pytest.fixture
def tp():
    n = TPNode()
    yield n
    n.close()


def handoff(tid: str, tokens: int, peer: str) -> Handoff:
    return Handoff(tid, peer, tokens, "d" * 32)


@pytest.mark.parametrize("name,group_mib", [("tcp", 128), ("tcp", 1), ("loopback", 1), ("cuda_ipc", 128),
                                            ("cuda_ipc", 1), ("nixl", 1)])
def test_two_prefill_ranks_merge_their_heads_into_one_decode_rank_bitwise(name, group_mib):
    """Both ranks' heads land in the decode's pages (one reservation, READY after both
    TransferDones), which it scatters into its blocks: bitwise the full cache's blocks. Whole,
    and streamed in 1 MiB groups (each announced as it lands, and seen landing by the tcp data
    plane): neither may let the decode read a page whose other heads are still on their way."""
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = TPNode(group_mib=group_mib, transport=name)
    try:
        p_blocks, d_blocks = list(range(3, 23)), list(range(20, 40))  # 20 blocks: 20 pages of the decode's
        tokens = 20 * BLOCK - 5  # the last block partly filled
        for r, s in enumerate(n.senders):
            s.submit(SendSpec(f"p{r}", handoff("t", tokens, "decode-0"), tuple(p_blocks)))
        n.receiver.submit_load(LoadSpec("d", handoff("t", tokens, "prefill-0"), tuple(d_blocks)))
        sends, loads = n.results(2, 1)
        assert all(s.ok for s in sends) and loads[0].ok, (sends, loads)
        assert sum(s.num_bytes for s in sends) == 20 * PAGE  # each rank half of every page
        for whole, got in zip(n.full, n.d_layers):
            for pb, db in zip(p_blocks, d_blocks):
                assert torch.equal(whole[pb].view(torch.uint8), got[db].view(torch.uint8)), (pb, db)
        assert n.receiver.pool.free_pages == n.receiver.pool.num_pages
    finally:
        n.close()


def test_a_rank_that_gives_up_fails_the_handoff_for_both_and_the_pages_return(tp):
    """Rank 0 writes its heads; rank 1's request was dropped (it gives the hand-off up): the
    decode's load fails as a whole (vLLM recomputes) and no page stays held."""
    tokens = 4 * BLOCK
    load = LoadSpec("d", handoff("t2", tokens, "prefill-0"), (1, 2, 3, 4))
    tp.receiver.submit_load(load)
    tp.senders[0].submit(SendSpec("p0", handoff("t2", tokens, "decode-0"), (5, 6, 7, 8)))
    sends, _ = tp.results(1, 0)
    assert sends[0].ok  # its part is in; the reservation waits for rank 1's
    assert tp.receiver.pool.lookup("t2").state.name == "ALLOCATED"
    tp.senders[1].give_up(handoff("t2", tokens, "decode-0"), "request aborted")
    _, loads = tp.results(0, 1)
    assert not loads[0].ok and "request aborted" in loads[0].error, loads
    deadline = time.monotonic() + 5
    while tp.receiver.pool.free_pages != tp.receiver.pool.num_pages:
        assert time.monotonic() < deadline, "pages stayed held"
        time.sleep(0.01)
