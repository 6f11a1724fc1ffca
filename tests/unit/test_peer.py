"""The prefill side's session with one decode worker (node/peer.py), over a real sender and
receiver: what it sends, and what its heartbeats keep alive."""

from __future__ import annotations

import time

from lmcache_pd._types import ReservationState
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from tests.unit.nodes import BLOCK, Node, make_cfg


def test_heartbeats_keep_a_reserved_handoffs_pages_past_their_lease():
    """Pages reserved ahead are the peer's in-flight hand-off: each heartbeat renews their lease,
    so a hand-off whose last chunk computes longer than ``timeouts.lease_s`` still finds them."""
    n = Node(make_cfg(lease_s=0.4, heartbeat_s=0.1))
    try:
        h = Handoff("t1", "decode-0", BLOCK, "d" * 32)
        n.sender.reserve(h).result(5)
        time.sleep(1.2)  # three leases
        r = n.receiver.pool.lookup("t1")
        assert r is not None and r.state == ReservationState.ALLOCATED, r
        n.sender.submit(SendSpec("p-t1", h, (2,)))
        n.receiver.submit_load(LoadSpec("d-t1", Handoff("t1", "prefill-0", BLOCK, "d" * 32), (2,)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and s.reserved and ld.ok
        n.assert_moved([2], [2])
    finally:
        n.close()


def test_a_cancel_goes_out_once_per_transfer():
    n = Node(make_cfg())
    try:
        n.handoff("t1", [1], [1], BLOCK)
        n.results(1, 1)  # the link is up
        peer = n.sender.links.find("decode-0")
        assert peer is not None
        sent: list[str] = []
        request = peer.client.request

        async def counting(msg, **kwargs):
            sent.append(f"{type(msg).__name__} {msg.transfer_id}")
            return await request(msg, **kwargs)

        peer.client.request = counting

        async def cancels() -> None:
            await peer.cancel("tx", "first")
            await peer.cancel("tx", "again")
            await peer.cancel("ty", "another hand-off")

        n.sender._loop.call(cancels(), 5)
        assert sent == ["Cancel tx", "Cancel ty"]
    finally:
        n.close()
