"""Test helpers: one prefill sender and one decode receiver with vLLM-like KV caches, in one
process (real zmq, real transports), and their config."""

from __future__ import annotations

import threading
import time

import msgspec
import torch

from lmcache_pd import protocol as P
from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import PDConfig, config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.receiver import KVReceiver, LoadResult
from lmcache_pd.node.sender import KVSender, SendResult
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import COMPAT, per_layer_cache, vllm_like_cache

BLOCK, LAYERS, HEADS, C = 16, 2, 2, 1024
PAGE = LAYERS * HEADS * BLOCK * C * 2  # bf16: 128 KiB, so pool.size_mib=1 is 8 pages
CPT = msgspec.structs.replace(COMPAT, block_size=BLOCK, num_layers=LAYERS, page_bytes=PAGE)


def make_cfg(transport: str = "tcp", *, options: dict | None = None, pool_mib: int = 1, group_mib: int = 128,
             cache: dict | None = None, layerwise: bool = False, direct: bool = False, verify: bool = False,
             **timeouts) -> PDConfig:
    """A 1P1D config for in-process tests. Whole hand-offs unless ``layerwise`` (the default of
    ``transport.layerwise`` is on: the tests of layered hand-offs say so)."""
    http_p, http_d, ctrl, data = free_ports(4)
    t = {"handshake_s": 2, "control_s": 2, "alloc_s": 2, "transfer_s": 3, "data_s": 3, "lease_s": 5,
         "heartbeat_s": 0.5, **timeouts}
    return config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": http_p}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data}],
        "transport": {"name": transport, "options": options or {}, "group_mib": group_mib, "layerwise": layerwise,
                      "direct": direct},
        "integrity": {"verify": verify},
        "pool": {"size_mib": pool_mib},
        "timeouts": t,
        **({"cache": cache} if cache else {}),
    }, source="test")


class Node:
    """One prefill sender and one decode receiver with vLLM-like KV caches."""

    def __init__(self, cfg: PDConfig, *, start_receiver: bool = True, compat: P.CompatInfo = CPT,
                 device: str | None = None, per_layer: bool = False):
        self.cfg = cfg
        device = device or ("cuda" if cfg.transport.name == "cuda_ipc" else "cpu")
        if per_layer:  # vLLM 0.24: one buffer per layer, with memory that is not ours between them
            self.p_layers, self._spacers = per_layer_cache(LAYERS, 40, HEADS, BLOCK, C // 2, torch.bfloat16, device)
            self.d_layers, spacers = per_layer_cache(LAYERS, 48, HEADS, BLOCK, C // 2, torch.bfloat16, device)
            self._spacers += spacers
        else:
            self.p_layers = vllm_like_cache(LAYERS, 40, HEADS, BLOCK, C, torch.bfloat16, "LBHNC", device)
            self.d_layers = vllm_like_cache(LAYERS, 48, HEADS, BLOCK, C, torch.bfloat16, "LBHNC", device)
        for t in self.d_layers:
            t.view(torch.uint8).fill_(0xEE)
        p_kv, p_buf = kv_layout_of(self.p_layers)
        d_kv, d_buf = kv_layout_of(self.d_layers)
        self.receiver = KVReceiver(Worker("decode-0", 0, CPT), NodeConfig.of(cfg), kv=d_kv, kv_buffer=d_buf)
        if start_receiver:
            self.receiver.start()
        self.sender = KVSender(Worker("prefill-0", 0, compat), NodeConfig.of(cfg), kv=p_kv, kv_buffer=p_buf)
        self.sender.start()

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()

    def handoff(self, tid: str, p_blocks: list[int], d_blocks: list[int], num_tokens: int,
                digest: str = "d" * 32, load_digest: str | None = None) -> None:
        self.sender.submit(SendSpec(f"p-{tid}", Handoff(tid, "decode-0", num_tokens, digest), tuple(p_blocks)))
        self.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", num_tokens, load_digest or digest), tuple(d_blocks)))

    def results(self, n_send: int, n_load: int, timeout_s: float = 15) -> tuple[list[SendResult], list[LoadResult]]:
        sends: list[SendResult] = []
        loads: list[LoadResult] = []
        deadline = time.monotonic() + timeout_s
        while len(sends) < n_send or len(loads) < n_load:
            assert time.monotonic() < deadline, f"only {len(sends)} sends / {len(loads)} loads ended"
            sends += self.sender.drain()
            loads += self.receiver.drain()
            time.sleep(0.005)
        return sends, loads

    def assert_moved(self, p_blocks: list[int], d_blocks: list[int]) -> None:
        for pl, dl in zip(self.p_layers, self.d_layers):
            for pb, db in zip(p_blocks, d_blocks):
                assert torch.equal(pl[pb].view(torch.uint8), dl[db].view(torch.uint8)), (pb, db)

    def in_pool(self, layer: int, blocks: list[int]) -> bool:
        """The decode pool holds ``layer`` of each of the prefill's ``blocks`` (found byte for byte;
        their bytes must be unique). Not the transport's batch count: a batch of posted layers
        counts once, after its last layer."""
        pool = self.receiver.pool_buffer.cpu().numpy().tobytes()
        return all(self.p_layers[layer][b].view(torch.uint8).cpu().numpy().tobytes() in pool for b in blocks)

    def pool_full(self, timeout_s: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.receiver.pool.free_pages == self.receiver.pool.num_pages:
                return True
            time.sleep(0.01)
        return False


def spin_cycles(us: float) -> int:
    """``torch.cuda._sleep`` cycles for about ``us`` microseconds of GPU time (measured here, after a
    warm-up: an idle GPU runs its first spin at a lower clock, and its measure would be long)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * us / (start.elapsed_time(end) * 1e3))


def late_forward(n: Node, blocks: tuple[int, ...], values: list[torch.Tensor]) -> torch.cuda.Event:
    """A "forward" on a stream of its own that sleeps about 0.5 s of GPU time, then writes
    ``values`` (one per layer, made beforehand: nothing here may block the host) into the
    prefill's ``blocks``; returns the event recorded after it."""
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        torch.cuda._sleep(1_000_000_000)
        for t, v in zip(n.p_layers, values):
            for b in blocks:
                t[b].copy_(v)
        ready = torch.cuda.Event()
        ready.record(forward)
    assert not ready.query(), "the forward ended before the hand-off started: the test proves nothing"
    return ready


def warm(n: Node) -> None:
    """One hand-off first: links the peers and builds the kernels."""
    n.handoff("warm", [1], [5], num_tokens=BLOCK)
    assert all(r.ok for r in sum(n.results(1, 1), []))


def first_chunk(n: Node, tid: str, p_blocks: list[int], d_blocks: list[int], num_tokens: int, split: int):
    """Chunked prefill: a layered hand-off of ``p_blocks`` whose first chunk's forward completed
    ``p_blocks[:split]`` (every layer marked, the forward ended), and the decode's load asked
    for; returns its ``Pieces``, for the last chunk's."""
    from lmcache_pd.node.layered import LayerMarks

    h = Handoff(tid, "decode-0", num_tokens, "d" * 32)
    first = LayerMarks(LAYERS)
    n.sender.reserve(h).result(5)
    pieces = n.sender.submit_layered(SendSpec(f"p-{tid}", h, tuple(p_blocks[:split]), layered=True, final=False), first)
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", num_tokens, "d" * 32), tuple(d_blocks)))
    for i in range(LAYERS):
        first.layer(i)
    first.forward_done()
    return pieces


def last_chunk(n: Node, pieces, p_blocks: list[int], split: int):
    """The last chunk's forward starts (after :func:`first_chunk`): it writes ``p_blocks[split:]``
    anew and adds its piece; returns its marks (no layer marked yet)."""
    from lmcache_pd.node.layered import LayerMarks

    for layer in n.p_layers:
        for b in p_blocks[split:]:
            layer[b].view(torch.uint8).copy_(torch.randint(0, 256, layer[b].view(torch.uint8).shape, dtype=torch.uint8))
    last = LayerMarks(LAYERS)
    pieces.add(tuple(p_blocks), split, last, True)
    return last


class HeldTransferDone:
    """Holds the decode's TransferDone (its control server's thread, in ``mark_ready``) until
    released: a load that ends meanwhile ended without it."""

    def __init__(self, n: Node):
        self.release = threading.Event()
        self.held = 0
        pool = n.receiver.pool
        real = pool.mark_ready

        def mark_ready(*args, **kwargs):
            self.held += 1
            self.release.wait(10)
            return real(*args, **kwargs)
        pool.mark_ready = mark_ready  # type: ignore[method-assign]
