"""CUDA IPC across two processes: the pool lives in a child, the parent writes into it."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost
from lmcache_pd.layout import coalesce
from tests.threads_os import cpu_s

_ok, _why = transports.available("cuda_ipc")
pytestmark = pytest.mark.skipif(not _ok, reason=f"cuda_ipc unavailable here: {_why}")


def _decode_side(conn, nbytes: int, device: int) -> None:
    rx = transports.create("cuda_ipc", {})
    pool = rx.allocate(nbytes, torch.device("cuda", device))
    pool.fill_(0xEE)
    torch.cuda.synchronize()
    conn.send(rx.export_descriptor(rx.register(pool)))
    while conn.recv() != "bye":
        conn.send(hashlib.sha256(pool.cpu().numpy().tobytes()).hexdigest())
    rx.close()


def test_two_processes_bitwise():
    ndev = torch.cuda.device_count()
    src_dev, dst_dev = 0, ndev - 1  # across GPUs when there are two
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_side, args=(child, 64 << 20, dst_dev), daemon=True)
    proc.start()
    try:
        desc = parent.recv()
        tx = transports.create("cuda_ipc", {})
        src = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, device=f"cuda:{src_dev}")
        peer = tx.connect(desc, timeout_s=10)
        rid = tx.register(src)
        # Another process: on our GPU (one GPU here, or P and D on one of two) it is said to share it.
        assert tx.shares_device(peer, rid) is (src_dev == dst_dev)
        rng = np.random.default_rng(0)
        plan = coalesce(rng.permutation(512).astype(np.int64) * 65536, np.arange(512, dtype=np.int64) * 65536,
                        np.full(512, 65536, dtype=np.int64))
        plan = coalesce(plan.src_offsets[:400], plan.dst_offsets[:400], plan.lengths[:400])
        h = tx.submit(peer, rid, plan, timeout_s=30)
        deadline = time.monotonic() + 30
        while not tx.poll(h).terminal:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert h.state == BatchState.DONE, h.error
        h.close()
        expect = torch.full((64 << 20,), 0xEE, dtype=torch.uint8)
        host = src.cpu()
        for s, d, n in zip(plan.src_offsets, plan.dst_offsets, plan.lengths):
            expect[d:d + n] = host[s:s + n]
        parent.send("hash")
        assert parent.recv() == hashlib.sha256(expect.numpy().tobytes()).hexdigest()
        tx.close()
    finally:
        parent.send("bye")
        proc.join(20)


def test_handle_of_an_exited_process_is_refused():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_side, args=(child, 1 << 20, 0), daemon=True)
    proc.start()
    desc = parent.recv()
    parent.send("bye")
    proc.join(20)
    tx = transports.create("cuda_ipc", {})
    tx.register(torch.zeros(16, dtype=torch.uint8, device="cuda"))
    with pytest.raises(PeerLost):
        tx.connect(desc, timeout_s=5)
    tx.close()


def _foreign_side(conn) -> None:
    """A decode's vLLM-like KV cache (one torch allocation per layer, others between them),
    exported for direct hand-offs; answers with the bytes of asked blocks."""
    from lmcache_pd.ops import kv_layout_of
    from tests.unit.kv import per_layer_cache

    rx = transports.create("cuda_ipc", {})
    layers, spacers = per_layer_cache(2, 8, 2, 16, 64, torch.bfloat16, "cuda")
    kv, buf = kv_layout_of(layers)
    torch.cuda.synchronize()
    conn.send((rx.export_descriptor(rx.register(buf, kv.extents)), kv.layer_offsets, kv.block_stride, kv.extents))
    while (msg := conn.recv()) != "bye":
        layer, block = msg
        conn.send(layers[layer][block].view(torch.uint8).cpu().numpy().tobytes())
    rx.close()


def test_a_region_not_its_own_is_written_piece_by_piece_from_another_process():
    """transport.direct: the decode's vLLM blocks (PyTorch's allocations, one per layer) are
    exported as each allocation's handle and offset; the peer writes both layers at their
    addresses, bitwise, and a range into the memory between them is refused."""
    from lmcache_pd.layout import RangePlan

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_foreign_side, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(120), "the decode side did not start"
        descriptor, offsets, stride, extents = parent.recv()
        assert len(extents) == 2, extents
        tx = transports.create("cuda_ipc", {})
        bb = 2 * 16 * 2 * 64 * 2  # one block of one layer: [2, 16, 2, 64] bf16
        src = torch.randint(0, 256, (4 * bb,), dtype=torch.uint8, device="cuda")
        region = tx.register(src)
        peer = tx.connect(descriptor, timeout_s=10)
        plan = RangePlan(np.array([0, bb], dtype=np.int64),
                         np.array([offsets[0] + 3 * stride, offsets[1] + 5 * stride], dtype=np.int64),
                         np.array([bb, bb], dtype=np.int64))
        h = tx.submit(peer, region, plan, timeout_s=10)
        deadline = time.monotonic() + 10
        while not tx.poll(h).terminal:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert h.state == BatchState.DONE, h
        for (layer, block), lo in (((0, 3), 0), ((1, 5), bb)):
            parent.send((layer, block))
            assert parent.recv() == src[lo:lo + bb].cpu().numpy().tobytes(), (layer, block)
        gap = extents[0][0] + extents[0][1]  # the first byte after layer 0's allocation
        bad = tx.submit(peer, region, RangePlan(np.array([0], dtype=np.int64), np.array([gap], dtype=np.int64),
                                                np.array([bb], dtype=np.int64)), timeout_s=10)
        assert bad.state == BatchState.FAILED and "outside" in bad.error
        # Posted layers whose plans share their lengths (layout.plan_layers): laid out in one pass
        # (ops.prepare_rows) over the same pieces.
        one = np.array([bb], dtype=np.int64)

        def layers(dst0: int, dst1: int) -> list:
            return [(0, RangePlan(np.array([2 * bb], dtype=np.int64), np.array([dst0], dtype=np.int64), one)),
                    (1, RangePlan(np.array([3 * bb], dtype=np.int64), np.array([dst1], dtype=np.int64), one))]
        posts = tx.prepare_layers(peer, region, layers(offsets[0] + 6 * stride, offsets[1] + 7 * stride), timeout_s=10)
        for layer in (1, 0):
            e = torch.cuda.Event()
            e.record()
            posts.post(layer, e)
        deadline = time.monotonic() + 10
        while not tx.poll(posts.handle).terminal:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert posts.handle.state == BatchState.DONE, posts.handle
        for (layer, block), lo in (((0, 6), 2 * bb), ((1, 7), 3 * bb)):
            parent.send((layer, block))
            assert parent.recv() == src[lo:lo + bb].cpu().numpy().tobytes(), (layer, block)
        bad = tx.prepare_layers(peer, region, layers(offsets[0] + 6 * stride, gap), timeout_s=10)
        assert bad.handle.state == BatchState.FAILED and "outside" in bad.handle.error
        tx.disconnect(peer)
        tx.close()
    finally:
        parent.send("bye")
        proc.join(10)


def test_a_peer_in_this_process_does_not_share_our_gpu_the_costly_way():
    """``shares_device`` is about two processes (two contexts the GPU switches between): a pool
    in this process, on this GPU, is not."""
    rx, tx = transports.create("cuda_ipc", {}), transports.create("cuda_ipc", {})
    try:
        pool = rx.allocate(1 << 20, torch.device("cuda", 0))
        peer = tx.connect(rx.export_descriptor(rx.register(pool)), timeout_s=10)
        rid = tx.register(torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0"))
        assert not tx.shares_device(peer, rid)
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("posted", [False, True], ids=["submitted", "posted"])
@pytest.mark.parametrize("wait", ["nap", "spin"])
def test_the_completion_thread_sleeps_while_the_producer_works(wait, posted):
    """A batch queued behind 0.4 s of its producer's GPU work (vLLM's forward, whose event the
    copy waits for): with ``completion_wait: nap`` (the default) the completion thread sleeps
    through it, where it spun a CPU core throughout before (as it still does with ``spin``: the
    case that shows this measure sees a spin); either way the batch ends DONE with the bytes the
    producer wrote."""
    rx, tx = transports.create("cuda_ipc", {}), transports.create("cuda_ipc", {"completion_wait": wait})
    try:
        pool = rx.allocate(1 << 20, torch.device("cuda", 0))
        peer = tx.connect(rx.export_descriptor(rx.register(pool)), timeout_s=10)
        src = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
        rid = tx.register(src)
        torch.cuda.synchronize()
        producer = torch.cuda.Stream()
        with torch.cuda.stream(producer):
            torch.cuda._sleep(int(0.4 * 2e9))  # (cycles: about 0.4 s at 2 GHz, longer at a lower clock)
            src.fill_(7)
        ready = torch.cuda.Event()
        ready.record(producer)
        plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 20]))
        cpu0, t0 = cpu_s(tx._waiter), time.monotonic()
        if posted:
            posts = tx.prepare_layers(peer, rid, [(0, plan)], timeout_s=30)
            posts.post(0, after=ready)
            h = posts.handle
        else:
            h = tx.submit(peer, rid, plan, timeout_s=30, after=ready)
        while not tx.poll(h).terminal:
            assert time.monotonic() - t0 < 30
            time.sleep(0.005)
        waited, cpu = time.monotonic() - t0, cpu_s(tx._waiter) - cpu0
        assert h.state == BatchState.DONE, h.error
        assert bool((pool == 7).all())
        assert waited > 0.2, f"the producer's work was over after {waited:.3f} s"
        if wait == "nap":
            assert cpu < 0.25 * waited, f"the completion thread spent {cpu:.3f} s of CPU in a {waited:.3f} s wait"
        else:
            assert cpu > 0.5 * waited, f"spinning, it spent only {cpu:.3f} s of CPU in a {waited:.3f} s wait"
    finally:
        tx.close()
        rx.close()
