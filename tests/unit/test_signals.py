"""Signaled loads: the writer's landing word and semaphore end a decode load before TransferDone
(transport/landing.py, node/loader.py). Everywhere with loopback's ``signals`` option (its copy
thread writes the word, as cuda_ipc's copy stream does); cuda_ipc on a GPU below. The pool's half
(``claim_signaled``, a TransferDone after it) and the words themselves, between two processes,
run everywhere."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import time

import pytest
import torch

from lmcache_pd._types import ReservationState
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.errors import TransferError
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec, signal_of
from lmcache_pd.transport.landing import LandingMap, LandingWords
from tests.unit.nodes import BLOCK, HeldTransferDone, Node, late_forward, make_cfg, warm

D = "d" * 32


# --- the pool ------------------------------------------------------------------------------------
def _reserved(pool: PagePool, tid: str = "t1") -> int:
    pool.reserve(Handoff(tid, "prefill-0", 2 * BLOCK, D), 2, owner="p", now=0.0, signals=True)
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


def test_a_direct_handoffs_word_is_its_first_blocks_past_the_pool_and_never_zero():
    assert signal_of([3, 4], (), 100, 7) == (3, 7)
    assert signal_of([100, 101], (17, 9), 100, 7) == (117, 7)  # (direct: pages past the pool name no memory)
    assert signal_of([3], (), 100, 0x7FFFFFFF + 1)[1] == 1  # wraps past 0, which a fresh word holds,
    assert signal_of([3], (), 100, 0x7FFFFFFF)[1] == 0x7FFFFFFF  # below the writer's launched mark


# --- the words, between two processes ------------------------------------------------------------
def _writer(name: str, slots: int, slot: int, value: int, delay_s: float) -> None:
    time.sleep(delay_s)
    m = LandingMap(name, slots)
    m.write(slot, value)
    m.close()


def test_another_process_writes_a_word_and_its_post_wakes_the_sleeper():
    words = LandingWords(64)
    path = os.path.join("/dev/shm", words.name)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "landing words readable by other users"
        assert not words.wait(0.05), "a wait with no post returned as posted"
        p = mp.get_context("spawn").Process(target=_writer, args=(words.name, 64, 9, 1234, 0.3))
        p.start()
        t0 = time.monotonic()
        assert words.wait(20.0), "the writer's post did not wake the wait"
        woke = time.monotonic() - t0
        assert words.holds(9, 1234) and not words.holds(8, 1234) and not words.holds(64, 0)
        assert 0.2 < woke < 15, f"woke after {woke:.2f} s: not by the writer's post"
        p.join(10)
        assert p.exitcode == 0
    finally:
        words.close()
    assert not os.path.exists(path), "the landing words' file outlived its owner's close"


def _orphan(conn) -> None:
    words = LandingWords(4)
    conn.send(words.name)  # (a pipe's send is written before it returns)
    os.kill(os.getpid(), 9)  # killed: its close never runs


def test_the_words_of_a_killed_process_are_removed_by_the_next_one():
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_orphan, args=(there,))
    p.start()
    assert here.poll(30), "the child made no landing words"
    name = here.recv()
    p.join(10)
    assert p.exitcode == -9
    path = os.path.join("/dev/shm", name)
    assert os.path.exists(path), "the killed process's words were not left behind: nothing to sweep"
    words = LandingWords(4)
    try:
        assert not os.path.exists(path), "a killed process's landing words outlived it"
        assert os.path.exists(os.path.join("/dev/shm", words.name))
    finally:
        words.close()


def test_a_name_that_is_not_landing_words_is_refused():
    with pytest.raises(ValueError):
        LandingMap("../etc/passwd", 4)
    with pytest.raises(OSError):
        LandingMap("lmcache-pd-landing-0-none", 4)


# --- loads, over loopback ------------------------------------------------------------------------
def _node(**kw) -> Node:
    kw.setdefault("options", {"signals": True})
    return Node(make_cfg("loopback", **kw))


def _reserve_then_send(n: Node, tid: str, p_blocks: tuple[int, ...], d_blocks: tuple[int, ...]) -> None:
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", 2 * BLOCK, D), d_blocks))
    n.sender.reserve(Handoff(tid, "decode-0", 2 * BLOCK, D)).result(5)
    n.sender.submit(SendSpec(f"p-{tid}", Handoff(tid, "decode-0", 2 * BLOCK, D), p_blocks))


def _ends_before_transfer_done(n: Node, tid: str):
    """A hand-off whose load ends, bitwise, while its TransferDone is held; then the TransferDone
    that comes after is answered as done and the pool is whole. The load's result."""
    warm(n)
    held = HeldTransferDone(n)
    _reserve_then_send(n, tid, (4, 9), (11, 12))
    _, (ld,) = n.results(0, 1, timeout_s=10)
    assert ld.ok and ld.signaled, ld
    assert held.held == 1 and not held.release.is_set(), "the load did not end before TransferDone"
    n.assert_moved([4, 9], [11, 12])
    held.release.set()
    (s,), _ = n.results(1, 0)
    assert s.ok, s.error
    assert ld.num_bytes == s.num_bytes > 0, "the load counts the bytes it got, TransferDone or not"
    assert n.pool_full()
    return ld


@pytest.mark.parametrize("direct", [False, True], ids=["pool", "direct"])
def test_a_signaled_load_ends_while_its_transfer_done_is_still_held(direct):
    n = _node(direct=direct)
    try:
        assert _ends_before_transfer_done(n, "s1").direct == direct
    finally:
        n.close()


def _waits_for_transfer_done(n: Node, tid: str, why: str) -> None:
    """A hand-off whose load must not end before its TransferDone (``why`` if it does)."""
    warm(n)
    held = HeldTransferDone(n)
    _reserve_then_send(n, tid, (4, 9), (11, 12))
    time.sleep(0.5)
    assert held.held == 1 and not n.receiver.drain(), why
    held.release.set()
    (s,), (ld,) = n.results(1, 1)
    assert s.ok and ld.ok and not ld.signaled
    n.assert_moved([4, 9], [11, 12])


def test_with_signals_off_the_load_waits_for_transfer_done():
    n = _node(options={})
    try:
        _waits_for_transfer_done(n, "o1", "the load ended before TransferDone without signals")
    finally:
        n.close()


def test_a_word_holding_another_generation_ends_nothing():
    n = _node(transfer_s=10)
    try:
        warm(n)
        n.receiver.submit_load(LoadSpec("d-g1", Handoff("g1", "prefill-0", 2 * BLOCK, D), (11, 12)))
        n.sender.reserve(Handoff("g1", "decode-0", 2 * BLOCK, D)).result(5)
        r = n.receiver.pool.lookup("g1")
        assert r is not None and r.signals, "the reservation does not expect a landing signal"
        slot, value = signal_of(r.pages, r.direct, n.receiver.pool.num_pages, r.generation)
        stranger = LandingMap(n.receiver.loader._words.name, n.receiver.loader._words.slots)
        try:
            stranger.write(slot, value + 1)  # an older reservation's late writer
            time.sleep(0.5)
            assert not n.receiver.drain(), "a word holding another generation ended the load"
            assert n.receiver.loader._words.holds(slot, value + 1)
        finally:
            stranger.close()
        n.sender.submit(SendSpec("p-g1", Handoff("g1", "decode-0", 2 * BLOCK, D), (4, 9)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and ld.signaled
        n.assert_moved([4, 9], [11, 12])
    finally:
        n.close()


def test_a_load_watching_its_word_is_canceled_or_times_out_naming_the_field():
    n = _node(transfer_s=1.0)
    try:
        warm(n)
        for tid in ("c1", "t1"):
            n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", 2 * BLOCK, D), (11, 12)
                                            if tid == "c1" else (20, 21)))
            n.sender.reserve(Handoff(tid, "decode-0", 2 * BLOCK, D)).result(5)
        t0 = time.monotonic()
        n.receiver.cancel_load("d-c1")
        _, (c,) = n.results(0, 1, timeout_s=5)
        assert c.req_id == "d-c1" and not c.ok and "aborted" in c.error and time.monotonic() - t0 < 0.5, c
        _, (t,) = n.results(0, 1, timeout_s=5)
        assert t.req_id == "d-t1" and not t.ok and "timeouts.transfer_s" in t.error, t
        for tid in ("c1", "t1"):
            n.sender.unreserve(tid)
        assert n.pool_full()
    finally:
        n.close()


def test_a_layered_handoff_signals_after_its_last_layer_only():
    from lmcache_pd.node.layered import LayerMarks
    from tests.unit.nodes import LAYERS

    n = _node(options={"signals": True, "posts_layers": True}, layerwise=True)
    try:
        warm(n)
        held = HeldTransferDone(n)
        n.receiver.submit_load(LoadSpec("d-L1", Handoff("L1", "prefill-0", 2 * BLOCK, D), (11, 12)))
        n.sender.reserve(Handoff("L1", "decode-0", 2 * BLOCK, D)).result(5)
        marks = LayerMarks(LAYERS)
        n.sender.submit_layered(SendSpec("p-L1", Handoff("L1", "decode-0", 2 * BLOCK, D), (4, 9), layered=True), marks)
        for layer in range(LAYERS):
            marks.layer(layer)
            if layer == 0:
                time.sleep(0.3)  # layer 0 has long landed: the load must still wait for the rest
                assert not n.receiver.drain(), "the load ended before the last layer was sent"
        marks.forward_done()
        _, (ld,) = n.results(0, 1)
        assert ld.ok and ld.signaled and not held.release.is_set(), ld
        n.assert_moved([4, 9], [11, 12])
        held.release.set()
        (s,), _ = n.results(1, 0)
        assert s.ok and s.layered, s.error
    finally:
        n.close()


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layered"])
def test_over_tcp_a_load_ends_once_its_receiver_saw_every_layer_land(layerwise):
    # No word: tcp's receiver sees each batch land in the pool itself (the WriteGate), so a load
    # every layer of which landed in every page needs no TransferDone either.
    n = Node(make_cfg("tcp", layerwise=layerwise))
    try:
        _ends_before_transfer_done(n, "w1")
    finally:
        n.close()


def test_with_integrity_verify_a_landed_load_still_waits_for_transfer_done_and_its_digest():
    n = Node(make_cfg("tcp", verify=True))
    try:
        _waits_for_transfer_done(n, "v1", "a verified load ended before its digest came")
        assert n.receiver.loader.digests_verified == 2  # (the warm-up's and this one's)
    finally:
        n.close()


# --- cuda_ipc, on a GPU ---------------------------------------------------------------------------
def _gpu_node(**kw) -> Node:
    from lmcache_pd import transport as transports

    ok, why = transports.available("cuda_ipc")
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs CUDA and cuda_ipc: {why or 'no CUDA device'}")
    kw.setdefault("options", {"signals": True})
    return Node(make_cfg("cuda_ipc", **kw), device="cuda")


@pytest.mark.parametrize("spin_us", [0, 1_000_000], ids=["sleeping", "watching"])
@pytest.mark.parametrize("direct", [False, True], ids=["pool", "direct"])
def test_cuda_ipc_signals_after_the_copy_on_the_gpu_and_the_load_arrives_bitwise(direct, spin_us):
    """``watching``: the decode's loader watches the launched word through the whole late
    forward (1 s against 0.5 s) and must still end the load only on the copy's own write."""
    n = _gpu_node(direct=direct, options={"signals": True, "spin_us": spin_us})
    try:
        warm(n)
        held = HeldTransferDone(n)
        # The prefill's forward writes the blocks late on its own stream and the copy waits for
        # it on the GPU: a word written before the copy, or a load ended on it too early, would
        # leave the decode's blocks without these values.
        values = [torch.randn(t[4].shape, device="cuda").to(t.dtype) for t in n.p_layers]
        n.receiver.submit_load(LoadSpec("d-a1", Handoff("a1", "prefill-0", 2 * BLOCK, D), (11, 12)))
        n.sender.reserve(Handoff("a1", "decode-0", 2 * BLOCK, D)).result(5)
        t0 = time.monotonic()
        torch.cuda.synchronize()  # nothing on the decode's GPU waits for the bytes (the old design did)
        assert time.monotonic() - t0 < 1.0
        ready = late_forward(n, (4, 9), values)
        n.sender.submit(SendSpec("p-a1", Handoff("a1", "decode-0", 2 * BLOCK, D), (4, 9)), ready)
        _, (ld,) = n.results(0, 1)
        assert ld.ok and ld.signaled and ld.direct == direct and not held.release.is_set(), ld
        assert ld.spun == bool(spin_us and n.receiver.loader._words.spin_s), ld
        torch.cuda.synchronize()
        n.assert_moved([4, 9], [11, 12])
        held.release.set()
        (s,), _ = n.results(1, 0)
        assert s.ok, s.error
        assert n.pool_full()
    finally:
        n.close()
