"""One hand-off node in its own process (and network namespace): a decode receiver or a
prefill sender over vLLM-like KV caches, driven by JSON lines on stdin, answering on stdout.

Run by tests/integration/test_netns.py as ``ip netns exec NS python -m tests.integration.nsnode
SPEC``; SPEC (JSON): ``role`` (decode|prefill), ``instance``, ``cfg`` (the deployment's config
dict, the same for every node), ``fill`` (a byte every KV block holds, or null for random
bytes from ``seed``), ``blocks``. Commands: see ``_decode`` and ``_prefill`` below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import torch

from lmcache_pd import protocol as P
from lmcache_pd.config import config_from_dict, keyring
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import kv_layout_of

LAYERS, HEADS, BLOCK, C = 2, 2, 16, 1024
"""128 KiB per block of 16 tokens (bf16), the unit tests' shape."""


def compat() -> P.CompatInfo:
    return P.CompatInfo(model="ns-test", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=BLOCK,
                        num_layers=LAYERS, num_kv_heads=HEADS, head_size=C, page_bytes=LAYERS * HEADS * BLOCK * C * 2,
                        tp_size=1, tp_rank=0, transport="tcp", attn_backend="cpu", vllm_version="none")


def kv_cache(blocks: int, fill: int | None, seed: int) -> list[torch.Tensor]:
    buf = torch.empty(LAYERS * blocks * HEADS * BLOCK * C * 2, dtype=torch.uint8)
    if fill is None:
        buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    else:
        buf.fill_(fill)
    per = blocks * HEADS * BLOCK * C
    typed = buf.view(torch.bfloat16)
    return [typed[i * per:(i + 1) * per].view(blocks, HEADS, BLOCK, C) for i in range(LAYERS)]


def digest(layers: list[torch.Tensor], blocks: list[int]) -> str:
    h = hashlib.sha256()
    for layer in layers:
        for b in blocks:
            h.update(layer[b].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _decode(receiver: KVReceiver, layers: list[torch.Tensor], cmd: dict) -> object:
    op = cmd["op"]
    if op == "load":
        receiver.submit_load(LoadSpec(cmd["req"], Handoff(cmd["tid"], "prefill-0", cmd["num_tokens"], cmd["digest"]), tuple(cmd["blocks"])))
        return True
    if op == "cancel":
        receiver.cancel_load(cmd["req"])
        return True
    if op == "results":
        return [dataclasses.asdict(r) for r in receiver.drain(cmd.get("wait_s", 0.0))]
    if op == "pool_fill":  # the share of a pool page's bytes (one layer) that hold ``byte``
        pl = receiver.pool_layout
        off = (cmd["layer"] * pl.num_pages + cmd["page"]) * pl.block_bytes
        chunk = receiver.pool_buffer[off:off + pl.block_bytes]
        return float((chunk == cmd["byte"]).float().mean())
    if op == "digest":
        return digest(layers, cmd["blocks"])
    if op == "status":
        return receiver.status()
    raise ValueError(op)


def _prefill(sender: KVSender, layers: list[torch.Tensor], cmd: dict) -> object:
    op = cmd["op"]
    if op == "send":
        sender.submit(SendSpec(cmd["req"], Handoff(cmd["tid"], cmd["peer"], cmd["num_tokens"], cmd["digest"]), tuple(cmd["blocks"])))
        return True
    if op == "results":
        return [dataclasses.asdict(r) for r in sender.drain()]
    if op == "digest":
        return digest(layers, cmd["blocks"])
    if op == "status":
        return sender.status()
    raise ValueError(op)


def main() -> None:
    spec = json.loads(sys.argv[1])
    cfg = config_from_dict(spec["cfg"], source="nsnode")
    layers = kv_cache(spec["blocks"], spec.get("fill"), spec.get("seed", 0))
    kv, buf = kv_layout_of(layers)
    if spec["role"] == "decode":
        node = KVReceiver(Worker(spec["instance"], 0, compat()), NodeConfig.of(cfg), kv=kv, kv_buffer=buf,
                          keys=keyring(cfg))
        node.start()
        serve = _decode
    else:
        node = KVSender(Worker(spec["instance"], 0, compat()), NodeConfig.of(cfg), kv=kv, kv_buffer=buf,
                        keys=keyring(cfg))
        node.start()
        serve = _prefill
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                out = {"ok": serve(node, layers, cmd)}
            except Exception as e:  # noqa: BLE001 - the test reads the error
                out = {"error": repr(e)}
            print(json.dumps(out), flush=True)
    finally:
        node.close()


if __name__ == "__main__":
    main()
