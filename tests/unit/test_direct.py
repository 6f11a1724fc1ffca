"""Direct hand-offs (``transport.direct``): the prefill writes straight into the decode's vLLM
blocks, and the decode has nothing to scatter. Sender and receiver in one process (real zmq,
real transports, all one-sided: loopback, nixl, and on a GPU cuda_ipc).

A direct hand-off takes no pool page (its pages are places past the pool); the pool stays
untouched (it holds the zeros ``allocate`` wrote), which is how each test sees the bytes went
direct; the counters say so too.
"""

from __future__ import annotations

import time

import pytest
import torch

from lmcache_pd import transport as transports
from lmcache_pd.errors import ConfigError
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.layered import LayerMarks
from tests.unit.nodes import BLOCK, LAYERS, PAGE, Node, make_cfg
from tests.waiting import wait_for

ONE_SIDED = ["loopback", "nixl", "cuda_ipc"]


def need(name: str) -> None:
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")


def pool_untouched(n: Node) -> bool:
    return not bool(n.receiver.pool_buffer.any())


def load_then_send(n: Node, tid: str, p_blocks: list[int], d_blocks: list[int], num_tokens: int) -> None:
    """The decode's load first (vLLM allocated its blocks), then the prefill's hand-off."""
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", num_tokens, "d" * 32), tuple(d_blocks)))
    n.sender.submit(SendSpec(f"p-{tid}", Handoff(tid, "decode-0", num_tokens, "d" * 32), tuple(p_blocks)))


@pytest.mark.parametrize("name", ONE_SIDED)
def test_a_whole_handoff_lands_in_the_decodes_blocks_and_nothing_is_scattered(name):
    need(name)
    n = Node(make_cfg(name, direct=True))
    try:
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        load_then_send(n, "d1", p_blocks, d_blocks, 2 * BLOCK + 3)  # the prompt ends inside its last block
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.direct and ld.direct and ld.scatter_s == 0 and ld.groups == 0, (s, ld)
        assert s.num_bytes == ld.num_bytes == 3 * PAGE
        n.assert_moved(p_blocks, d_blocks)
        assert pool_untouched(n), "bytes went through the pool"
        assert n.receiver.server.stats.direct == 1
        assert n.pool_full()
    finally:
        n.close()


@pytest.mark.parametrize("name", ONE_SIDED)
def test_a_layered_chunked_handoff_goes_direct_piece_by_piece(name):
    """The first chunk's blocks go in one batch, the last chunk's layer by layer, all of it into
    the decode's blocks; no Landed(layers) is needed (nothing to scatter)."""
    need(name)
    n = Node(make_cfg(name, direct=True))
    try:
        p_blocks, d_blocks = [5, 6, 30, 31], [11, 12, 40, 41]
        tid, num_tokens = "chunked", 3 * BLOCK + 3
        n.receiver.submit_load(LoadSpec("d-c", Handoff(tid, "prefill-0", num_tokens, "d" * 32), tuple(d_blocks)))
        h = Handoff(tid, "decode-0", num_tokens, "d" * 32)
        n.sender.reserve(h)
        first = LayerMarks(LAYERS)
        pieces = n.sender.submit_layered(SendSpec("p-c", h, tuple(p_blocks[:2]), layered=True, final=False), first)
        for i in range(LAYERS):
            first.layer(i)
        first.forward_done()
        deadline = time.monotonic() + 5
        while not all(torch.equal(n.p_layers[0][p].view(torch.uint8), n.d_layers[0][d].view(torch.uint8))
                      for p, d in zip(p_blocks[:2], d_blocks[:2])):
            assert time.monotonic() < deadline, "the first chunk's blocks never reached the decode's blocks"
            time.sleep(0.002)
        last = LayerMarks(LAYERS)
        pieces.add(tuple(p_blocks), 2, last, True)
        for i in range(LAYERS):
            last.layer(i)
        last.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.direct and ld.direct and s.pieces == 2 and ld.early_layers == 0, (s, ld)
        assert s.num_bytes == ld.num_bytes == 4 * PAGE
        n.assert_moved(p_blocks, d_blocks)
        assert pool_untouched(n)
    finally:
        n.close()


def test_blocks_the_decode_holds_already_are_not_sent():
    """vLLM's own prefix cache holds the prompt's first block on the decode: its load names only
    the last two blocks, and only those two go (into them)."""
    n = Node(make_cfg("loopback", direct=True))
    try:
        p_blocks, d_blocks = [5, 6, 30], [40, 41]
        load_then_send(n, "held", p_blocks, d_blocks, 3 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.direct, (s.error, ld.error)
        assert s.num_bytes == 2 * PAGE
        n.assert_moved(p_blocks[1:], d_blocks)
        assert pool_untouched(n)
    finally:
        n.close()


@pytest.mark.parametrize("name", ["loopback", "nixl"])
def test_a_direct_handoff_takes_no_pool_page_so_a_full_pool_does_not_hold_it_up(name):
    """Every pool page is held by a hand-off that went through the pool (its decode request not
    come yet), and another waits in the queue for pages; a direct one, whose blocks the decode
    named, needs none of them: it is granted at once, ahead of the queue (not after the other's
    lease or timeouts.alloc_s) and lands bitwise, and the pool still holds the first, whose
    pages come back when its load comes."""
    need(name)
    n = Node(make_cfg(name, direct=True))
    try:
        pages = n.receiver.pool.num_pages
        big = list(range(1, pages + 1))
        n.sender.submit(SendSpec("p-big", Handoff("big", "decode-0", pages * BLOCK, "d" * 32), tuple(big)))
        (s,), _ = n.results(1, 0)
        assert s.ok and not s.direct, s
        assert n.receiver.pool.free_pages == 0
        n.sender.submit(SendSpec("p-q", Handoff("queued", "decode-0", 2 * BLOCK, "d" * 32), (20, 21)))
        wait_for(lambda: n.receiver.server.stats.queued_allocations == 1, 5, "the second Allocate queued")
        p_blocks, d_blocks = [30, 31, 32], [40, 41, 42]
        load_then_send(n, "d1", p_blocks, d_blocks, 3 * BLOCK)
        (s,), (ld,) = n.results(1, 1, timeout_s=1.5)  # (queued behind, it would wait out alloc_s: 2 s)
        assert s.transfer_id == "d1" and s.ok and ld.ok and s.direct and ld.direct, (s, ld)
        n.assert_moved(p_blocks, d_blocks)
        assert n.receiver.pool.free_pages == 0  # (still the other's)
        n.receiver.submit_load(LoadSpec("d-big", Handoff("big", "prefill-0", pages * BLOCK, "d" * 32),
                                        tuple(range(1, pages + 1))))
        (ld,) = n.receiver.drain(5)
        assert ld.ok and not ld.direct, ld
        (q,), _ = n.results(1, 0)  # the queued one: no load came for it; it got pages, or gave up at alloc_s
        assert q.transfer_id == "queued", q
        n.receiver.submit_load(LoadSpec("d-q", Handoff("queued", "prefill-0", 2 * BLOCK, "d" * 32), (20, 21)))
        n.receiver.drain(5)
        assert n.pool_full()
    finally:
        n.close()


def test_an_allocate_before_the_decode_has_its_blocks_goes_through_the_pool():
    """The prefill reserves before the decode's vLLM scheduled the request: no blocks to name, so
    the pool as usual (and still bitwise)."""
    n = Node(make_cfg("loopback", direct=True))
    try:
        p_blocks, d_blocks = [5, 6], [11, 12]
        h = Handoff("early", "decode-0", 2 * BLOCK, "d" * 32)
        n.sender.reserve(h)
        deadline = time.monotonic() + 5
        while n.receiver.pool.lookup("early") is None:
            assert time.monotonic() < deadline, "the reservation never came"
            time.sleep(0.002)
        n.receiver.submit_load(LoadSpec("d-e", Handoff("early", "prefill-0", 2 * BLOCK, "d" * 32), tuple(d_blocks)))
        n.sender.submit(SendSpec("p-e", h, tuple(p_blocks)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and not s.direct and not ld.direct, (s, ld)
        n.assert_moved(p_blocks, d_blocks)
        assert not pool_untouched(n) and n.receiver.server.stats.direct == 0
        assert n.receiver.server.stats.direct_waits == 0  # its decode request was not said to be on its way
    finally:
        n.close()


def test_an_allocate_whose_decode_request_is_on_its_way_waits_for_its_blocks_and_goes_direct():
    """The proxy sent both requests at once (``decode_sent``): the prefill's Allocate comes before
    the decode's vLLM scheduled its request, and the decode side holds it (up to
    timeouts.direct_wait_s) until the load names its blocks: the hand-off goes direct."""
    n = Node(make_cfg("loopback", direct=True, direct_wait_s=2.0))
    try:
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        h = Handoff("waited", "decode-0", 3 * BLOCK, "d" * 32, decode_sent=True)
        n.sender.reserve(h)
        wait_for(lambda: n.receiver.server.stats.direct_waits == 1, 5, "the Allocate held", every_s=0.002)
        time.sleep(0.05)
        assert n.receiver.pool.lookup("waited") is None, "answered before the blocks were known"
        n.receiver.submit_load(LoadSpec("d-w", Handoff("waited", "prefill-0", 3 * BLOCK, "d" * 32), tuple(d_blocks)))
        n.sender.submit(SendSpec("p-w", h, tuple(p_blocks)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.direct and ld.direct, (s, ld)
        n.assert_moved(p_blocks, d_blocks)
        assert pool_untouched(n) and n.receiver.server.stats.direct == 1
    finally:
        n.close()


def test_a_decode_request_that_does_not_come_in_time_leaves_the_handoff_to_the_pool():
    """Held for timeouts.direct_wait_s (0.3 s here) and no load came: pool pages then, and the
    hand-off goes through the pool as usual once the load does come."""
    n = Node(make_cfg("loopback", direct=True, direct_wait_s=0.3))
    try:
        h = Handoff("late", "decode-0", 2 * BLOCK, "d" * 32, decode_sent=True)
        t0 = time.monotonic()
        n.sender.reserve(h)
        wait_for(lambda: n.receiver.pool.lookup("late") is not None, 5, "the pool pages", every_s=0.002)
        assert time.monotonic() - t0 >= 0.3 and n.receiver.server.stats.direct_waits == 1
        n.receiver.submit_load(LoadSpec("d-l", Handoff("late", "prefill-0", 2 * BLOCK, "d" * 32), (11, 12)))
        n.sender.submit(SendSpec("p-l", h, (5, 6)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and not s.direct and not ld.direct, (s, ld)
        n.assert_moved([5, 6], [11, 12])
        assert n.receiver.server.stats.direct == 0
    finally:
        n.close()


def test_with_integrity_verify_the_decode_checks_its_blocks():
    n = Node(make_cfg("loopback", direct=True, verify=True))
    try:
        load_then_send(n, "checked", [5, 6], [11, 12], 2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.direct, (s.error, ld.error)
        assert n.receiver.loader.digests_verified == 1 and n.receiver.loader.digest_mismatches == 0
    finally:
        n.close()


def test_a_garbled_direct_write_fails_the_digest_and_the_decode_recomputes():
    n = Node(make_cfg("loopback", options={"corrupt_every": 1}, direct=True, verify=True))
    try:
        load_then_send(n, "garbled", [5, 6], [11, 12], 2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.direct and not ld.ok and "integrity.verify" in ld.error, ld
        assert n.receiver.loader.digest_mismatches == 1
    finally:
        n.close()


def test_an_aborted_direct_load_is_reported_only_once_its_prefill_stopped_writing():
    """vLLM frees a request's blocks when its load is reported, so an aborted direct load is
    reported only once its prefill can no longer write into them. Here the prefill's batch is in
    flight (loopback: it copies 0.3 s after its submit) and its sender is busy for 0.8 s (its
    loop stalled: it cannot stop the batch, nor confirm), when the decode request is aborted:
    the batch still lands in the blocks, and the failure is reported after that, once the
    prefill confirmed it stopped (its Cancel after the decode's Ended)."""
    n = Node(make_cfg("loopback", options={"delay_s": 0.3}, direct=True))
    try:
        p_blocks, d_blocks = [5, 6], [11, 12]
        load_then_send(n, "aborted", p_blocks, d_blocks, 2 * BLOCK)
        deadline = time.monotonic() + 5
        while not n.receiver.server.stats.direct:
            assert time.monotonic() < deadline, "no direct Allocated"
            time.sleep(0.002)
        time.sleep(0.05)  # the batch is submitted: it copies 0.3 s after that

        async def busy() -> None:
            time.sleep(0.8)  # noqa: ASYNC251 - the point: the sender's loop can do nothing meanwhile
        n.sender._loop.submit(busy())
        n.receiver.cancel_load("d-aborted")
        t_cancel = time.monotonic()
        while time.monotonic() - t_cancel < 0.5:
            assert n.receiver.drain() == [], "reported while the prefill may still write into the blocks"
            time.sleep(0.01)
        assert n.receiver.pool.held("aborted")
        n.assert_moved(p_blocks, d_blocks)  # the late batch landed: had vLLM freed the blocks, in another's KV
        (s,), (ld,) = n.results(1, 1)
        assert not ld.ok and "aborted" in ld.error and not s.ok, (s, ld)
        assert not n.receiver.pool.held("aborted")
    finally:
        n.close()


def test_direct_with_a_transport_that_cannot_names_the_field():
    with pytest.raises(ConfigError, match="transport.direct"):
        Node(make_cfg("tcp", direct=True), start_receiver=False)


def test_cuda_ipc_translates_a_pieced_regions_offsets_to_each_pieces_address():
    """(No GPU needed: the arithmetic of cuda_ipc's direct writes.) Offsets into a region of two
    buffers with memory between them become addresses in each buffer's own mapping; a range
    that leaves its buffer, or starts before the first, is refused."""
    import numpy as np

    from lmcache_pd.layout import RangePlan
    from lmcache_pd.transport._cuda_regions import Peer, absolute_plan

    p = Peer(0, 10_000, opened=False)
    p.pieces = [(100, 1000, 0x7000_0000), (5000, 1000, 0x9000_0000)]
    plan = RangePlan(np.array([0, 64, 128]), np.array([100, 1050, 5936]), np.array([64, 50, 64]))
    out = absolute_plan(p, plan)
    assert out is not None and list(out.dst_offsets) == [0x7000_0000, 0x7000_0000 + 950, 0x9000_0000 + 936]
    assert list(out.src_offsets) == [0, 64, 128] and list(out.lengths) == [64, 50, 64]
    for dst, n in ((1090, 64), (50, 8), (6000, 1), (4000, 8)):
        assert absolute_plan(p, RangePlan(np.array([0]), np.array([dst]), np.array([n]))) is None
