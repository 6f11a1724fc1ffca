"""Armed loads: the decode's scatter queued on its GPU behind the prefill's device-side signal
(node/armed.py; cuda_ipc, ``signals``: experimental, off by default). The pool's half of it
(``claim_signaled``, a TransferDone after it) runs everywhere.

The GPU tests below are skipped unless LMCACHE_PD_ARMED_TESTS=1: on the H200 (2026-12-03) the
first of them hung the process. Their sender and receiver share one process, so one CUDA
context, and a stream blocked in ``cuStreamWaitValue32`` also blocks every other stream that
the driver put on the same hardware queue (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default): the
prefill's copy, which would write the awaited value, or the release's write, can sit behind the
wait. The same false dependency can hold a decode's own work in a deployment, which is why
arming stays experimental (docs/transports.md). Two processes (benchmarks/handoff.py) do not
share hardware queues and ran bitwise."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from lmcache_pd._types import ReservationState
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.errors import TransferError
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from tests.unit.nodes import BLOCK, Node, late_forward, make_cfg, warm


# --- the pool (no GPU) ----------------------------------------------------------------------------
def _reserved(pool: PagePool, tid: str = "t1") -> int:
    pool.reserve(Handoff(tid, "prefill-0", 2 * BLOCK, "d" * 32), 2, owner="p", now=0.0, signals=True)
    r = pool.lookup(tid)
    assert r is not None and r.signals
    return r.generation


def test_a_signal_claims_pages_before_transfer_done_which_is_then_answered_as_done():
    pool = PagePool(8, lease_s=5.0)
    gen = _reserved(pool)
    assert pool.claim_signaled("t1", gen + 1) is None, "another generation's signal claimed the pages"
    r = pool.claim_signaled("t1", gen)
    assert r is not None and r.state == ReservationState.CONSUMING and r.landed == 2
    pool.free("t1", now=1.0)
    assert pool.free_pages == 8
    pool.mark_ready("t1", owner="p", num_bytes=10, seconds=0.1, now=1.0)  # the late TransferDone: no error
    with pytest.raises(TransferError):
        pool.mark_ready("t1", owner="someone-else", num_bytes=10, seconds=0.1, now=1.0)


def test_a_signal_for_an_ended_reservation_claims_nothing():
    pool = PagePool(8, lease_s=5.0)
    gen = _reserved(pool)
    pool.abort("t1", reason="prefill gone", now=1.0)
    assert pool.claim_signaled("t1", gen) is None
    with pytest.raises(TransferError):  # and a TransferDone for it is still refused
        pool.mark_ready("t1", owner="p", num_bytes=10, seconds=0.1, now=1.0)


# --- on a GPU -------------------------------------------------------------------------------------
def _node(**kw) -> Node:
    from lmcache_pd import transport as transports

    ok, why = transports.available("cuda_ipc")
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs CUDA and cuda_ipc: {why or 'no CUDA device'}")
    if os.environ.get("LMCACHE_PD_ARMED_TESTS") != "1":
        pytest.skip("armed loads in one process can deadlock behind their own GPU-side wait (shared "
                    "hardware queues; this module's docstring): set LMCACHE_PD_ARMED_TESTS=1 to run them")
    kw.setdefault("options", {"signals": True})
    return Node(make_cfg("cuda_ipc", **kw), device="cuda")


def _armed(n: Node, req_id: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with n.receiver.loader._lock:
            load = n.receiver.loader._loads.get(req_id)
            if load is not None and load.armed is not None:
                return
        time.sleep(0.002)
    raise AssertionError(f"the load {req_id} was never armed")


def _arm(n: Node, tid: str, d_blocks: tuple[int, ...], n_tok: int) -> None:
    """Reserve the pages (as the connector does during the last chunk's forward) with the
    decode's load already waiting: the loader arms it at the grant."""
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", n_tok, "d" * 32), d_blocks))
    n.sender.reserve(Handoff(tid, "decode-0", n_tok, "d" * 32)).result(5)
    _armed(n, f"d-{tid}")


def _device_idle(timeout_s: float = 5.0) -> bool:
    """No stream of this process waits forever: a device-wide synchronize returns."""
    done = threading.Event()
    threading.Thread(target=lambda: (torch.cuda.synchronize(), done.set()), daemon=True).start()
    return done.wait(timeout_s)


def test_an_armed_scatter_waits_on_the_gpu_for_the_bytes_and_arrives_bitwise():
    n = _node()
    try:
        warm(n)
        # The prefill's forward writes the blocks late on its own stream; the copy waits for it
        # on the GPU, and the decode's scatter for the copy's signal: a scatter that did not wait
        # would copy the pool's stale bytes.
        values = [torch.randn(t[4].shape, device="cuda").to(t.dtype) for t in n.p_layers]
        torch.cuda.synchronize()  # before arming: a device-wide synchronize waits for armed loads
        _arm(n, "a1", (11, 12), 2 * BLOCK)
        ready = late_forward(n, (4, 9), values)
        n.sender.submit(SendSpec("p-a1", Handoff("a1", "decode-0", 2 * BLOCK, "d" * 32), (4, 9)), ready)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert ld.signaled, "the load waited for TransferDone instead of the device-side signal"
        n.assert_moved([4, 9], [11, 12])
        assert n.pool_full()
    finally:
        n.close()


def test_an_armed_load_whose_bytes_never_come_is_released_and_fails_naming_its_deadline():
    n = _node(transfer_s=1.5)
    try:
        warm(n)
        t0 = time.monotonic()
        _arm(n, "stall", (11, 12), 2 * BLOCK)  # reserved; the prefill never sends
        _, (ld,) = n.results(0, 1, timeout_s=10)
        assert not ld.ok and "timeouts.transfer_s" in ld.error, ld.error
        assert time.monotonic() - t0 < 5
        assert _device_idle(), "a stream still waits for a signal nobody will write"
        n.sender.unreserve("stall")
        n.handoff("after", [2, 3], [20, 21], num_tokens=2 * BLOCK)  # the loader is not stuck behind it
        (s,), (ld2,) = n.results(1, 1)
        assert s.ok and ld2.ok, (s.error, ld2.error)
        n.assert_moved([2, 3], [20, 21])
        assert n.pool_full()
    finally:
        n.close()


def test_an_armed_load_canceled_ends_at_once_and_leaves_no_stream_waiting():
    n = _node(transfer_s=30)
    try:
        warm(n)
        _arm(n, "c1", (11, 12), 2 * BLOCK)
        t0 = time.monotonic()
        n.receiver.cancel_load("d-c1")
        _, (ld,) = n.results(0, 1, timeout_s=5)
        assert not ld.ok and "aborted" in ld.error and time.monotonic() - t0 < 2, ld.error
        assert _device_idle()
    finally:
        n.close()


def test_a_later_armed_load_is_not_held_up_by_an_earlier_one_still_waiting():
    n = _node(transfer_s=30)
    try:
        warm(n)
        _arm(n, "slow", (11, 12), 2 * BLOCK)  # its bytes never come while the next one runs
        _arm(n, "fast", (20, 21), 2 * BLOCK)
        n.sender.submit(SendSpec("p-fast", Handoff("fast", "decode-0", 2 * BLOCK, "d" * 32), (2, 3)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and ld.req_id == "d-fast" and ld.signaled, (s.error, ld.error)
        n.assert_moved([2, 3], [20, 21])
        n.receiver.cancel_load("d-slow")
        n.sender.unreserve("slow")
        _, (gone,) = n.results(0, 1)
        assert gone.req_id == "d-slow" and not gone.ok
        assert n.pool_full()
    finally:
        n.close()


def test_with_signals_off_the_load_waits_for_transfer_done():
    n = _node(options={"signals": False})
    try:
        warm(n)
        n.receiver.submit_load(LoadSpec("d-o1", Handoff("o1", "prefill-0", 2 * BLOCK, "d" * 32), (11, 12)))
        n.sender.reserve(Handoff("o1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        n.sender.submit(SendSpec("p-o1", Handoff("o1", "decode-0", 2 * BLOCK, "d" * 32), (2, 3)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and not ld.signaled
        n.assert_moved([2, 3], [11, 12])
    finally:
        n.close()


def test_a_layered_handoff_signals_after_its_last_layer_only():
    from lmcache_pd.node.layered import LayerMarks
    from tests.unit.nodes import LAYERS

    n = _node()
    try:
        warm(n)
        _arm(n, "L1", (11, 12), 2 * BLOCK)
        marks = LayerMarks(LAYERS)
        n.sender.submit_layered(SendSpec("p-L1", Handoff("L1", "decode-0", 2 * BLOCK, "d" * 32), (4, 9),
                                         layered=True), marks)
        forward = torch.cuda.Stream()
        for layer in range(LAYERS):
            with torch.cuda.stream(forward):
                for b in (4, 9):
                    n.p_layers[layer][b].copy_(torch.randn(n.p_layers[layer][b].shape, device="cuda"))
                ready = torch.cuda.Event()
                ready.record(forward)
            marks.layer(layer, ready)
            if layer == 0:
                ready.synchronize()
                time.sleep(0.2)  # layer 0 is long in the pool: the scatter must still wait
                assert not n.receiver.drain(), "the decode scattered before the last layer was sent"
        marks.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.layered and ld.signaled, (s.error, ld.error)
        torch.cuda.synchronize()
        n.assert_moved([4, 9], [11, 12])
        assert n.pool_full()
    finally:
        n.close()


def test_a_device_wide_synchronize_waits_for_an_armed_load_until_it_is_released():
    # Why arming is opt-in: the decode process's torch.cuda.synchronize() (vLLM makes one in steps
    # that return prompt logprobs) waits for an armed load's bytes; the deadline's release bounds it.
    n = _node(transfer_s=1.5)
    try:
        warm(n)
        _arm(n, "held", (11, 12), 2 * BLOCK)
        t0 = time.monotonic()
        torch.cuda.synchronize()
        waited = time.monotonic() - t0
        assert 0.5 < waited < 5, f"synchronize returned after {waited:.2f} s"
        _, (ld,) = n.results(0, 1)
        assert not ld.ok and "timeouts.transfer_s" in ld.error
        n.sender.unreserve("held")
    finally:
        n.close()
