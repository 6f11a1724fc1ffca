"""No byte of an ended hand-off lands in pages another hand-off was given, over one-sided
transports: the decode side ends hand-off A while A's write is still coming,
hand-off B from another prefill worker is granted A's pages, and B's KV must arrive bitwise.

loopback delays A's copy (``delay_s``); cuda_ipc (GPU) orders A's copy after a CUDA event that
completes only after a long kernel. Neither lets the receiver see a batch, so the pool holds A's
pages until prefill worker 1 confirms that it stopped (its Cancel after the decode's Ended). tcp,
where the receiver admits each batch, is tested across two network namespaces
(tests/integration/test_netns.py).
"""

from __future__ import annotations

import time

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
from tests.unit.nodes import BLOCK, CPT, HEADS, LAYERS, C

PAGES = 8  # the pool (1 MiB of 128 KiB pages): A and B each need all of it
DELAY_S = 0.6


def deployment(transport: str, options: dict) -> dict:
    http1, http2, http_d, ctrl, data = free_ports(5)
    return {
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-1", "http_port": http1}, {"name": "prefill-2", "http_port": http2}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data}],
        "transport": {"name": transport, "options": options},
        "pool": {"size_mib": 1},
        "timeouts": {"handshake_s": 2, "control_s": 2, "alloc_s": 5, "transfer_s": 8, "data_s": 5, "lease_s": 8,
                     "heartbeat_s": 0.5},
    }


@pytest.mark.parametrize("name", ["loopback", "cuda_ipc"])
def test_a_late_one_sided_write_never_lands_in_the_next_handoffs_pages(name):
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    device = "cuda" if name == "cuda_ipc" else "cpu"
    base = deployment(name, {})
    slow_cfg = config_from_dict({**base, "transport": {"name": name, "options": {"delay_s": DELAY_S}}}
                                if name == "loopback" else base, source="test")
    cfg = config_from_dict(base, source="test")

    def cache(seed: int):
        layers = vllm_like_cache(LAYERS, 2 * PAGES, HEADS, BLOCK, C, torch.bfloat16, "LBHNC", device)
        g = torch.Generator().manual_seed(seed)  # bytes of their own: the helper seeds them all alike
        for t in layers:
            raw = t.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g).to(device))
        return layers, *kv_layout_of(layers)

    d_layers, d_kv, d_buf = cache(1)
    a_layers, a_kv, a_buf = cache(2)
    b_layers, b_kv, b_buf = cache(3)
    receiver = KVReceiver(Worker("decode-0", 0, CPT), NodeConfig.of(cfg), kv=d_kv, kv_buffer=d_buf)
    receiver.start()
    slow = KVSender(Worker("prefill-1", 0, CPT), NodeConfig.of(slow_cfg), kv=a_kv, kv_buffer=a_buf)
    fast = KVSender(Worker("prefill-2", 0, CPT), NodeConfig.of(cfg), kv=b_kv, kv_buffer=b_buf)
    slow.start()
    fast.start()
    try:
        blocks = tuple(range(PAGES))
        ready = None
        if device == "cuda":  # A's copy is queued on the GPU behind a kernel that runs ~DELAY_S
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                torch.cuda._sleep(int(DELAY_S * 2e9))
                ready = torch.cuda.Event()
                ready.record(side)
        receiver.submit_load(LoadSpec("dA", Handoff("A", "prefill-0", PAGES * BLOCK, "a" * 32), blocks))
        slow.submit(SendSpec("pA", Handoff("A", "decode-0", PAGES * BLOCK, "a" * 32), blocks), ready)
        deadline = time.monotonic() + 5
        while receiver.pool.lookup("A") is None:  # A's pages are granted: its write is coming
            assert time.monotonic() < deadline, "A was never granted pages"
            time.sleep(0.005)
        receiver.cancel_load("dA")  # the decode request was aborted while A's bytes were coming

        fast.submit(SendSpec("pB", Handoff("B", "decode-0", PAGES * BLOCK, "b" * 32), blocks))
        sent_b = _one(fast.drain, 10)
        assert sent_b.ok, sent_b.error
        time.sleep(DELAY_S + 0.3)  # before the fix, A's copy landed in B's pages meanwhile
        d_blocks = tuple(PAGES + b for b in blocks)
        receiver.submit_load(LoadSpec("dB", Handoff("B", "prefill-0", PAGES * BLOCK, "b" * 32), d_blocks))
        loads = {r.req_id: r for r in _all(receiver.drain, 2, 10)}
        assert loads["dB"].ok, loads["dB"].error
        for dl, bl in zip(d_layers, b_layers):
            for db, bb in zip(d_blocks, blocks):
                assert torch.equal(dl[db].view(torch.uint8), bl[bb].view(torch.uint8)), \
                    f"block {db}: B's KV differs from what its prefill sent (A's late write landed in B's pages)"
        assert not loads["dA"].ok

        sent_a = _one(slow.drain, 10)  # told (Ended), it stopped and confirmed with a Cancel
        assert not sent_a.ok and "decode side ended the hand-off" in sent_a.error, sent_a.error
        assert receiver.server.stats.ended_sent >= 1
        assert receiver.pool.free_pages == PAGES
    finally:
        slow.close()
        fast.close()
        receiver.close()


def _one(drain, timeout_s: float):
    (out,) = _all(drain, 1, timeout_s)
    return out


def _all(drain, n: int, timeout_s: float) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"{len(out)} of {n} results within {timeout_s} s"
        out += drain()
        time.sleep(0.005)
    return out
