"""NIXL across two processes (DRAM here; VRAM where CUDA is), its UCX path report, and its costs."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import resource
import time

import msgspec
import numpy as np
import pytest
import torch

from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState
from lmcache_pd.errors import ConfigError, PeerLost
from lmcache_pd.layout import coalesce
from tests.transport.handles import wait

_ok, _why = transports.available("nixl")
pytestmark = pytest.mark.skipif(not _ok, reason=f"nixl unavailable here: {_why}")


def _decode_side(conn, nbytes: int, device: str, options: dict) -> None:
    rx = transports.create("nixl", options)
    pool = rx.allocate(nbytes, torch.device(device))
    pool.fill_(0xEE)
    conn.send(rx.export_descriptor(rx.register(pool)))
    while conn.recv() != "bye":
        conn.send(hashlib.sha256(pool.cpu().numpy().tobytes()).hexdigest())
    rx.close()


def assert_decode_holds(parent, src: torch.Tensor, plan, nbytes: int) -> None:
    """The decode side's pool (``_decode_side``) holds ``plan``'s ranges of ``src``, and its fill
    byte everywhere else, bitwise."""
    expect = torch.full((nbytes,), 0xEE, dtype=torch.uint8)
    host = src.cpu()
    for s, d, n in zip(plan.src_offsets, plan.dst_offsets, plan.lengths):
        expect[d:d + n] = host[s:s + n]
    parent.send("hash")
    assert parent.recv() == hashlib.sha256(expect.numpy().tobytes()).hexdigest()


def _cases() -> list[tuple[str, str, dict]]:
    cases = [("cpu", "cpu", {})]
    if torch.cuda.is_available():
        last = f"cuda:{torch.cuda.device_count() - 1}"
        cases += [("cuda:0", last, {}),  # 700 ranges: gathered into a staging buffer first
                  ("cuda:0", last, {"stage_ranges": 0}),  # one descriptor per range
                  ("cuda:0", "cpu", {})]  # GPU -> host memory
    return cases


@pytest.mark.parametrize(("src_dev", "dst_dev", "options"), _cases())
def test_two_processes_bitwise_and_the_ucx_path_is_reported(src_dev, dst_dev, options):
    nbytes = 64 << 20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_side, args=(child, nbytes, dst_dev, options), daemon=True)
    proc.start()
    try:
        assert parent.poll(60), "decode side did not start"
        desc = parent.recv()
        tx = transports.create("nixl", options)
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        src = src.to(src_dev)
        rid = tx.register(src)
        peer = tx.connect(desc, timeout_s=10)
        # Another process, its pool on our GPU: said to share it (never for host memory).
        assert tx.shares_device(peer, rid) is (src_dev == dst_dev != "cpu")
        rng = np.random.default_rng(0)
        plan = coalesce(rng.permutation(1024)[:700].astype(np.int64) * 65536,
                        np.arange(700, dtype=np.int64) * 65536, np.full(700, 65536, dtype=np.int64))
        h = tx.submit(peer, rid, plan, timeout_s=30)
        assert wait(tx, h, 30) == BatchState.DONE, h.error
        h.close()
        assert_decode_holds(parent, src, plan, nbytes)
        # Which UCX transport carried the bytes, from UCX's own protocol report (read in the
        # background, at most twice a second).
        deadline = time.monotonic() + 10
        while not tx.stats.path and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tx.stats.path.startswith("UCX ") and "/" in tx.stats.path, tx.stats.path
        tx.close()
    finally:
        parent.send("bye")
        proc.join(20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: the wait before posting from GPU memory")
@pytest.mark.parametrize("options", [{"stage_ranges": 0}, {}], ids=["per-range", "staged"])
def test_a_gpu_post_given_its_event_does_not_wait_for_the_work_queued_after_it(options):
    """vLLM's forward runs on the default stream: a layer's event says its bytes are complete
    while the next layers are queued behind it. A post given that event must wait for nothing
    more (it waited for the whole stream once, and a staged post ordered its gather after it:
    every layer's post waited for the rest of the forward). 100 ranges: staged by default; the
    staging buffer exists already, as in a running instance."""
    from tests.unit.nodes import spin_cycles

    nbytes = 8 << 20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_side, args=(child, nbytes, "cuda:0", options), daemon=True)
    proc.start()
    tx = None
    try:
        assert parent.poll(60), "decode side did not start"
        desc = parent.recv()
        tx = transports.create("nixl", options)
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        src = src.to("cuda:0")
        rid = tx.register(src)
        peer = tx.connect(desc, timeout_s=10)
        plan = coalesce(np.random.default_rng(1).permutation(128)[:100].astype(np.int64) * 65536,
                        np.arange(100, dtype=np.int64) * 65536, np.full(100, 65536, dtype=np.int64))
        # A first post makes the staging buffer: a device allocation, which orders the GPU's
        # streams (CUDA's implicit synchronization) and so waits for queued work once.
        warm = tx.submit(peer, rid, plan, timeout_s=30)
        assert wait(tx, warm, 30) == BatchState.DONE, warm.error
        warm.close()
        cycles = spin_cycles(3_000_000)
        stream = torch.cuda.current_stream()  # the default stream, as vLLM's forward's
        ready = torch.cuda.Event()
        ready.record(stream)  # the layer's bytes are complete here
        torch.cuda._sleep(cycles)  # the next layers (3 s of GPU time)
        behind = torch.cuda.Event()
        behind.record(stream)
        while not ready.query():  # the sender's wait
            time.sleep(0.001)
        h = tx.submit(peer, rid, plan, timeout_s=30, after=ready)
        assert not behind.query(), "the post waited for the work queued after its event"
        assert wait(tx, h, 30) == BatchState.DONE, h.error
        h.close()
        assert_decode_holds(parent, src, plan, nbytes)
    finally:
        if tx is not None:
            tx.close()
        parent.send("bye")
        proc.join(20)


def test_ucx_protocol_report_parser():
    report = """
[1.0] [vm:1:0]   | pre self cfg#0                                           |
[1.0] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.0] [vm:1:0]   | 0..inf | zero-copy   | sysv/memory                        |
[1.1] [vm:1:0]   | pre intra-node cfg#1                                     |
[1.1] [vm:1:0]   | active message by ucp_am_send* from host memory |
[1.1] [vm:1:0]   |          0 | short              | tcp/lo        |
[1.2] [vm:1:0]   | pre intra-node cfg#1                                     |
[1.2] [vm:1:0]   | remote memory write by ucp_put*(multi) from cuda memory to cuda |
[1.2] [vm:1:0]   | Range  | Description |              Config               |
[1.2] [vm:1:0]   | 0..8192 | short   | cuda_copy/cuda                        |
[1.2] [vm:1:0]   | 8193..inf | zero-copy   | 50% on cuda_ipc/cuda and 50% on rc_mlx5/mlx5_0:1 |
"""
    from lmcache_pd.transport._ucx_report import ucx_write_paths

    assert ucx_write_paths(report, "VRAM", "VRAM") == ["cuda_copy/cuda", "cuda_ipc/cuda", "rc_mlx5/mlx5_0:1"]
    assert ucx_write_paths(report, "DRAM", "DRAM") == []  # only a `self` table for host memory
    assert ucx_write_paths(report.replace("pre self", "pre inter-node"), "DRAM", "DRAM") == ["sysv/memory"]
    assert ucx_write_paths("") == []


def test_garbled_agent_metadata_is_refused():
    from lmcache_pd.transport._nixl_peers import Descriptor

    tx = transports.create("nixl", {})
    try:
        tx.register(torch.zeros(16, dtype=torch.uint8))
        forged = msgspec.msgpack.encode(Descriptor("x", b"\x00garbage" * 9, 4096, 4096, 0, "DRAM"))
        with pytest.raises(PeerLost):
            tx.connect(forged, timeout_s=1)
        with pytest.raises(PeerLost):
            tx.connect(msgspec.msgpack.encode(Descriptor("x", b"", 0, 16, 0, "HBM")), timeout_s=1)
    finally:
        tx.close()


def test_options_are_validated():
    with pytest.raises(ConfigError, match="transport.options.poll_interval_ms"):
        transports.parse_options("nixl", {"poll_interval_ms": 5})
    with pytest.raises(ConfigError, match="transport.options.progress_thread"):
        transports.parse_options("nixl", {"progress_thread": "yes"})


def test_idle_transport_does_not_spin_a_core():
    # NIXL's own progress thread polls with no delay (one core at 100%); ours must sleep.
    tx = transports.create("nixl", {})
    rx = transports.create("nixl", {})
    try:
        rx.register(torch.zeros(1 << 16, dtype=torch.uint8))
        tx.connect(rx.export_descriptor(1), timeout_s=5)
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        time.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 0.3 * (time.monotonic() - t0), f"two idle agents used {cpu:.2f} s of CPU in 1 s"
    finally:
        tx.close()
        rx.close()


class _Counting:
    """A NIXL agent whose ``get_new_notifs`` calls (the idle progress) are counted."""

    def __init__(self, agent):
        self.agent, self.idle_calls = agent, 0

    def __getattr__(self, name):
        return getattr(self.agent, name)

    def get_new_notifs(self):
        self.idle_calls += 1
        return self.agent.get_new_notifs()


def test_only_the_decode_side_progresses_while_idle_and_the_prefill_side_still_sends():
    """The prefill side (writes, never written to) must not wake while idle: each wake-up takes
    the GIL of vLLM's engine process. The decode side (written to) progresses its worker every
    idle_progress_ms. A write posted after a long idle still completes, bitwise."""
    tx = transports.create("nixl", {})
    rx = transports.create("nixl", {})
    try:
        src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
        rid = tx.register(src)
        pool = torch.zeros(1 << 20, dtype=torch.uint8)
        peer = tx.connect(rx.export_descriptor(rx.register(pool)), timeout_s=10)
        tx._agent, rx._agent = _Counting(tx._agent), _Counting(rx._agent)
        time.sleep(0.5)
        assert tx._agent.idle_calls == 0, f"the prefill side woke {tx._agent.idle_calls} times while idle"
        assert rx._agent.idle_calls >= 50, f"the decode side progressed only {rx._agent.idle_calls} times in 0.5 s"
        h = tx.submit(peer, rid, coalesce(np.array([0]), np.array([0]), np.array([1 << 20])), timeout_s=5)
        assert wait(tx, h, 10) == BatchState.DONE
        assert torch.equal(pool, src)
    finally:
        tx.close()
        rx.close()


def test_a_killed_peer_fails_the_transfer_in_bounded_time_and_others_still_work():
    # The decode process dies with SIGKILL after the handshake: the write must end (failed or
    # timed out) within its deadline, and the same transport keeps serving a live peer.
    import os
    import signal

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_side, args=(child, 8 << 20, "cpu", {}), daemon=True)
    proc.start()
    assert parent.poll(60), "decode side did not start"
    desc = parent.recv()
    tx = transports.create("nixl", {})
    rx2 = transports.create("nixl", {})
    try:
        src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8)
        rid = tx.register(src)
        dead = tx.connect(desc, timeout_s=10)
        pool2 = torch.zeros(8 << 20, dtype=torch.uint8)
        alive = tx.connect(rx2.export_descriptor(rx2.register(pool2)), timeout_s=10)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        plan = coalesce(np.array([0]), np.array([0]), np.array([8 << 20]))
        h = tx.submit(dead, rid, plan, timeout_s=3)
        wait(tx, h, 10)  # a write to a dead peer must end
        assert h.state in (BatchState.FAILED, BatchState.TIMEOUT), h.state
        h.close()
        tx.disconnect(dead)
        h = tx.submit(alive, rid, plan, timeout_s=10)
        assert wait(tx, h) == BatchState.DONE, h.error
        h.close()
        assert torch.equal(pool2, src)
    finally:
        tx.close()
        rx2.close()
