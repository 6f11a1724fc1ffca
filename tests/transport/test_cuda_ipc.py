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
