"""Pages reserved ahead of a hand-off (while the last prompt chunk computes), taken by the
hand-off, given back when it never comes, and dropped when nobody takes them.

Sender and receiver together in one process (real zmq, real transports), as in test_node.
"""

from __future__ import annotations

import time

import pytest

from lmcache_pd.errors import PDError
from lmcache_pd.handoff import Handoff
from tests.unit.nodes import BLOCK, Node, make_cfg


def held(n: Node) -> int:
    return n.receiver.pool.num_pages - n.receiver.pool.free_pages


def test_reserved_handoff_takes_its_reserved_pages(node):  # noqa: F811 - the fixture
    n_tok = 3 * BLOCK + 5
    node.sender.reserve(Handoff("t1", "decode-0", n_tok, "d" * 32)).result(5)
    assert held(node) == 4, "the reservation holds the hand-off's pages"
    node.sender.reserve(Handoff("t1", "decode-0", n_tok, "d" * 32)).result(5)  # again: e.g. after preemption
    assert held(node) == 4, "a second reservation of the same hand-off must not take more pages"
    node.handoff("t1", [5, 6, 7, 30], [11, 12, 13, 40], num_tokens=n_tok)
    (s,), (ld,) = node.results(1, 1)
    assert s.ok and ld.ok, (s.error, ld.error)
    assert s.reserved
    assert s.on_caller, "granted pages: the hand-off is planned and submitted on the caller's thread"
    node.assert_moved([5, 6, 7, 30], [11, 12, 13, 40])
    # Had the hand-off allocated again, the reserved pages would stay held until their lease.
    assert node.pool_full(), f"{held(node)} pages still held"


def test_a_handoff_whose_pages_are_not_granted_yet_or_that_streams_goes_through_the_senders_loop():
    n = Node(make_cfg("loopback", pool_mib=4, group_mib=1))
    try:
        n.handoff("t0", [1, 2], [3, 4], num_tokens=2 * BLOCK)  # not reserved
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and not s.on_caller and not s.reserved
        n.sender.reserve(Handoff("t1", "decode-0", 20 * BLOCK, "d" * 32)).result(5)
        n.handoff("t1", list(range(1, 21)), list(range(21, 41)), num_tokens=20 * BLOCK)  # 3 groups of 1 MiB
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.reserved and not s.on_caller, (s.error, ld.error)
        n.assert_moved(list(range(1, 21)), list(range(21, 41)))
        assert n.pool_full()
    finally:
        n.close()


def test_unreserve_gives_the_pages_back():
    n = Node(make_cfg("loopback", lease_s=30))
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        assert held(n) == 2
        n.sender.unreserve("t1")
        assert n.pool_full(), "unreserved pages must return at once, not after their lease"
        n.sender.unreserve("t1")  # twice, or for an unknown hand-off: nothing happens
        n.sender.unreserve("never-reserved")
        # The pair keeps serving.
        n.handoff("t2", [1, 2], [3, 4], num_tokens=2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and not s.reserved, (s.error, ld.error)
    finally:
        n.close()


def test_reservation_nobody_takes_is_dropped_after_transfer_s():
    # The lease alone would hold the pages 30 s (heartbeats renew it); transfer_s bounds it.
    n = Node(make_cfg("loopback", lease_s=30, transfer_s=1, heartbeat_s=0.2))
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        assert held(n) == 2
        t0 = time.monotonic()
        assert n.pool_full(timeout_s=5), "an unused reservation must not hold pages past timeouts.transfer_s"
        assert time.monotonic() - t0 < 3
    finally:
        n.close()


def test_failed_reservation_fails_its_handoff_with_the_cause():
    n = Node(make_cfg("loopback", handshake_s=0.5), start_receiver=False)
    try:
        with pytest.raises(PDError, match="timeouts.handshake_s"):
            n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        n.handoff("t1", [1, 2], [3, 4], num_tokens=2 * BLOCK)
        (s,) = n.results(1, 0)[0]
        assert not s.ok and "handshake" in s.error, s.error
    finally:
        n.close()


def test_shutdown_does_not_wait_for_a_queued_reservation():
    n = Node(make_cfg("loopback", alloc_s=3, lease_s=2, heartbeat_s=0.2))
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        n.sender.unreserve("t1")  # the sender is linked; its pages are back
        assert n.pool_full()
        # Another prefill holds the whole pool (its lease runs out after lease_s).
        assert n.receiver.pool.reserve(Handoff("other", "p", 1, "x"), 8, owner="someone else",
                                       now=time.monotonic())
        queued = n.sender.reserve(Handoff("t2", "decode-0", 2 * BLOCK, "d" * 32))  # waits for pages
        time.sleep(0.2)
        assert not queued.done()
        t0 = time.monotonic()
        n.sender.close()
        assert time.monotonic() - t0 < 1.0, "shutdown waited for a reservation still queued for pages"
        # The other prefill's pages, and a late grant of the queued one, end with their leases.
        assert n.pool_full(timeout_s=6)
    finally:
        n.close()


def _prepared_submits(n: Node) -> int:
    return getattr(n.sender.transport, "prepared_submits", -1)  # (loopback counts them; cuda_ipc does not)


def test_a_reservation_naming_its_blocks_is_launched_as_laid_out_at_its_grant(node):  # noqa: F811 - the fixture
    n_tok = 3 * BLOCK + 5
    p_blocks, d_blocks = [5, 6, 7, 30], [11, 12, 13, 40]
    node.sender.reserve(Handoff("t1", "decode-0", n_tok, "d" * 32), tuple(p_blocks)).result(5)
    before = _prepared_submits(node)
    node.handoff("t1", p_blocks, d_blocks, num_tokens=n_tok)
    (s,), (ld,) = node.results(1, 1)
    assert s.ok and ld.ok, (s.error, ld.error)
    # (loopback and cuda_ipc lay a submit out ahead; tcp and nixl plan it at the submit, as before)
    prepares = node.cfg.transport.name in ("loopback", "cuda_ipc")
    assert s.on_caller and s.prepared == prepares, "its launch was laid out when the pages were granted"
    if before >= 0:
        assert _prepared_submits(node) == before + 1, "the transport started the prepared submit"
    node.assert_moved(p_blocks, d_blocks)
    assert node.pool_full()


def test_a_handoff_of_other_blocks_than_its_reservation_named_is_planned_anew():
    n = Node(make_cfg("loopback"))
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32), (1, 2)).result(5)
        n.handoff("t1", [3, 4], [8, 9], num_tokens=2 * BLOCK)  # (a preempted request's new blocks)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.on_caller and not s.prepared, (s.error, ld.error)
        assert _prepared_submits(n) == 0
        n.assert_moved([3, 4], [8, 9])
        n.sender.reserve(Handoff("t2", "decode-0", 2 * BLOCK, "d" * 32)).result(5)  # no blocks named
        n.handoff("t2", [5, 6], [10, 11], num_tokens=2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok and s.on_caller and not s.prepared
        n.assert_moved([5, 6], [10, 11])
        assert n.pool_full()
    finally:
        n.close()


def test_a_prepared_launch_whose_connection_was_dropped_since_never_starts():
    n = Node(make_cfg("loopback"))
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32), (1, 2)).result(5)
        transport = n.sender.transport
        (pid,) = list(transport._peers)
        transport.disconnect(pid)  # (as a dropped link does: its prepared submit names a gone peer)
        n.handoff("t1", [1, 2], [8, 9], num_tokens=2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert not s.ok and not ld.ok, "nothing can reach the decode through a dropped connection"
        assert _prepared_submits(n) == 0, "a prepared submit of a dropped peer must not start"
        assert n.pool_full(), "the hand-off's pages return"
    finally:
        n.close()
