"""A hand-off from an installed package (run by test_install.py with that environment's Python,
outside the checkout): tcp on loopback, sender and receiver in this process, bitwise; and the
kernel loader on a machine without CUDA: the sources found inside the package, the copy done by
the torch fallback, equal to the reference. Prints OK and what it checked."""

from __future__ import annotations

import sys
import time

import msgspec
import numpy as np
import torch

import lmcache_pd
from lmcache_pd import ops
from lmcache_pd import protocol as P
from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.layout import RangePlan
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker

BLOCK, LAYERS, HEADS, C, BLOCKS = 16, 2, 2, 512, 24


def cache(seed: int) -> list[torch.Tensor]:
    """vLLM-like per-layer [blocks, heads, block, C] bf16 views into one buffer, random bytes."""
    buf = torch.empty(LAYERS * BLOCKS * HEADS * BLOCK * C * 2, dtype=torch.uint8)
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    typed = buf.view(torch.bfloat16)
    per = BLOCKS * HEADS * BLOCK * C
    return [typed[i * per:(i + 1) * per].view(BLOCKS, HEADS, BLOCK, C) for i in range(LAYERS)]


def main(where: str) -> None:
    assert lmcache_pd.__file__.startswith(where), f"lmcache_pd from {lmcache_pd.__file__}, not {where}"
    # The kernel loader: sources inside the installed package; on CPU, the torch fallback.
    assert str(ops._CSRC).startswith(where) and (ops._CSRC / "copy_ranges.cu").is_file(), ops._CSRC
    ok, why = ops.cuda_kernels_available()
    assert ok or why == "no CUDA device", why
    src, dst, ref = (torch.arange(4096, dtype=torch.int64).view(torch.uint8), torch.zeros(32768, dtype=torch.uint8),
                     torch.zeros(32768, dtype=torch.uint8))
    plan = RangePlan(np.array([0, 9000, 20000]), np.array([100, 0, 30000]), np.array([512, 700, 100]))
    ops.copy_ranges(src, dst, plan)
    ops.copy_ranges_ref(src, ref, plan)
    assert torch.equal(dst, ref) and dst.any()

    # A hand-off over tcp on loopback.
    http_p, http_d, ctrl, data = free_ports(4)
    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": http_p}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data}],
        "transport": {"name": "tcp"}, "pool": {"size_mib": 1},
    }, source="installed")
    page = LAYERS * HEADS * BLOCK * C * 2
    compat = P.CompatInfo(model="tiny", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=BLOCK,
                          num_layers=LAYERS, num_kv_heads=HEADS, head_size=64, page_bytes=page, tp_size=1,
                          tp_rank=0, transport="tcp", attn_backend="cpu_attn/vec", vllm_version="0.32.0")
    p_layers, d_layers = cache(1), cache(2)
    p_kv, p_buf = ops.kv_layout_of(p_layers)
    d_kv, d_buf = ops.kv_layout_of(d_layers)
    receiver = KVReceiver(Worker("decode-0", 0, compat), NodeConfig.of(cfg), kv=d_kv, kv_buffer=d_buf)
    receiver.start()
    sender = KVSender(Worker("prefill-0", 0, msgspec.structs.replace(compat)), NodeConfig.of(cfg), kv=p_kv,
                      kv_buffer=p_buf)
    sender.start()
    try:
        p_blocks, d_blocks, tokens = (3, 4, 9), (20, 1, 7), 2 * BLOCK + 5
        sender.submit(SendSpec("p-1", Handoff("t-1", "decode-0", tokens, "d" * 32), p_blocks))
        receiver.submit_load(LoadSpec("d-1", Handoff("t-1", "prefill-0", tokens, "d" * 32), d_blocks))
        sends, loads, deadline = [], [], time.monotonic() + 30
        while not (sends and loads):
            assert time.monotonic() < deadline, "the hand-off did not end within 30 s"
            sends += sender.drain()
            loads += receiver.drain()
            time.sleep(0.01)
        assert sends[0].ok and loads[0].ok, (sends[0].error, loads[0].error)
        for pl, dl in zip(p_layers, d_layers):
            for pb, db in zip(p_blocks, d_blocks):
                assert torch.equal(pl[pb].view(torch.uint8), dl[db].view(torch.uint8)), (pb, db)
    finally:
        sender.close()
        receiver.close()
    print(f"OK kernels={'cuda' if ok else 'torch fallback (' + why + ')'} handoff=tcp {tokens} tokens bitwise")


if __name__ == "__main__":
    main(sys.argv[1])
