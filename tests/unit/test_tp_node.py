"""Prefill and decode of different TP sizes in one process (issue 20): every prefill rank writes
the KV heads each decode rank holds straight into that rank's pool pages (heads.plan_heads), and
every decode rank's blocks end up bitwise equal to the full cache's heads it holds.

- TP 2 -> 1: two prefill ranks merge their heads into the same pages of one decode rank (one
  reservation, two writers: the second joins the first's pages);
- TP 1 -> 2 and wider: one prefill rank sends to several decode ranks, a lane each (its own
  pages, transfer and TransferDone; node/lanes.py), the hand-off ok only when every lane is;
- replicated heads (TP above the model's KV heads): a decode rank holding a copy gets it from
  the first prefill rank that holds the head; a prefill rank holding only copies sends nothing.
Real zmq, every transport that runs here (cuda_ipc: the GPU path, on the H200)."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache_pd import heads as H
from lmcache_pd import transport as transports
from lmcache_pd.handoff import LoadSpec, SendSpec
from lmcache_pd.node.layered import LayerMarks
from tests.unit.nodes import BLOCK, LAYERS
from tests.unit.tp_nodes import HEAD, TPNode, handoff


@pytest.fixture
def tp():
    n = TPNode()
    yield n
    n.close()


SHAPES = [(2, 1, 2), (1, 2, 2), (1, 4, 4), (4, 1, 4), (2, 4, 4), (1, 4, 2), (4, 2, 2)]
"""(prefill TP, decode TP, the model's KV heads): merged, split, both four ways, split with
replicated decode heads (1 -> 4 of 2 heads: each head on two decode ranks), and replicated
prefill heads (4 -> 2 of 2 heads: prefill ranks 1 and 3 hold copies and send nothing)."""


def expected_bytes(n: TPNode, pages: int) -> int:
    return pages * LAYERS * HEAD * sum(k for _, k in n.d_heads)


@pytest.mark.parametrize("name,group_mib,shape", [
    *[("tcp", 128, s) for s in SHAPES], ("tcp", 1, (2, 1, 2)), ("tcp", 1, (1, 2, 2)),
    *[(t, g, s) for t in ("loopback", "cuda_ipc", "nixl") for g in (128, 1) for s in ((2, 1, 2), (1, 2, 2))]])
def test_heads_land_bitwise_between_tp_sizes(name, group_mib, shape):
    """Every decode rank's blocks hold the full cache's heads it holds, bitwise, and every
    rank's pool is free again; every prefill rank's hand-off is ok, one that holds only copies
    with nothing sent. Whole, and streamed in 1 MiB groups (each announced as it lands, and seen
    landing by the tcp data plane): merged pages may not be read while another rank's heads are
    on their way."""
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    p, d, heads = shape
    n = TPNode(p, d, heads, group_mib=group_mib, transport=name)
    try:
        p_blocks, d_blocks = list(range(3, 23)), list(range(20, 40))  # 20 blocks: 20 pages of the decode's
        tokens = 20 * BLOCK - 5  # the last block partly filled
        for r, s in enumerate(n.senders):
            s.submit(SendSpec(f"p{r}", handoff("t", tokens, "decode-0"), tuple(p_blocks)))
        n.load_all("t", tokens, d_blocks)
        sends, loads = n.results(p, d)
        assert all(s.ok for s in sends) and all(x.ok for x in loads), (sends, loads)
        assert sum(s.num_bytes for s in sends) == expected_bytes(n, 20)
        senders = {sl.src_rank for sl in H.head_map(heads, p, d)}
        assert sorted(s.req_id for s in sends if s.num_bytes == 0) == [f"p{r}" for r in range(p) if r not in senders]
        n.assert_landed(p_blocks, d_blocks)
    finally:
        n.close()


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 2), (4, 2, 2), (2, 4, 4)])
@pytest.mark.parametrize("damaged", [False, True])
def test_integrity_verify_between_tp_sizes_loads_what_was_sent_and_refuses_damage(shape, damaged):
    """``integrity.verify`` between TP sizes: each writer digests the bytes of its heads at
    their places in the decode's pages (digests.plan_sum), the decode adds its writers' digests up
    and checks them against its pages; damaged bytes (every batch, on the way) are refused and
    counted on every decode rank, never loaded."""
    p, d, heads = shape
    n = TPNode(p, d, heads, transport="loopback", verify=True, options={"corrupt_every": 1} if damaged else None)
    try:
        p_blocks, d_blocks = list(range(3, 9)), list(range(20, 26))
        tokens = 6 * BLOCK - 3
        for r, s in enumerate(n.senders):
            s.submit(SendSpec(f"p{r}", handoff("tv", tokens, "decode-0"), tuple(p_blocks)))
        n.load_all("tv", tokens, d_blocks)
        sends, loads = n.results(p, d)
        assert all(s.ok for s in sends), sends
        stats = [r.status()["loads"] for r in n.receivers]
        if damaged:
            assert not any(x.ok for x in loads) and all("integrity.verify" in x.error for x in loads), loads
            assert [(x["digests_verified_total"], x["digest_mismatches_total"]) for x in stats] == [(0, 1)] * d
            assert all(torch.all(t[b].view(torch.uint8) == 0xEE) for layers in n.d_layers for t in layers
                       for b in d_blocks)
        else:
            assert all(x.ok for x in loads), loads
            assert [(x["digests_verified_total"], x["digest_mismatches_total"]) for x in stats] == [(1, 0)] * d
            n.assert_landed(p_blocks, d_blocks)
    finally:
        n.close()


def test_a_reserved_handoff_to_a_wider_decode_is_submitted_on_the_callers_thread_on_every_lane():
    """TP 1 -> 2 with the pages reserved ahead (as the connector does): both lanes are planned
    and submitted on the submitting thread (``SendResult.on_caller``), and land bitwise."""
    n = TPNode(1, 2, 2)
    try:
        p_blocks, d_blocks = list(range(3, 11)), list(range(20, 28))
        tokens = 8 * BLOCK - 1
        h = handoff("tc", tokens, "decode-0")
        n.load_all("tc", tokens, d_blocks)
        n.senders[0].reserve(h).result(5)
        n.senders[0].submit(SendSpec("pc", h, tuple(p_blocks)))
        sends, loads = n.results(1, 2)
        assert sends[0].ok and sends[0].on_caller and sends[0].reserved, sends
        assert all(x.ok for x in loads), loads
        n.assert_landed(p_blocks, d_blocks)
    finally:
        n.close()


def test_a_lane_that_cannot_be_submitted_after_another_was_fails_the_handoff_on_both():
    """TP 1 -> 2, reserved ahead: the transport refuses the second lane's batch after the first
    was submitted on the caller's thread. The hand-off fails naming the lane, both decode ranks
    are told and both pools are whole again. The second rank's load fails at once (vLLM
    recomputes); the first rank's may have ended already on its bytes, which its receiver saw
    land whole (tcp), before the Cancel came: a failed rank makes vLLM recompute the blocks on
    every rank anyway."""
    n = TPNode(1, 2, 2)
    sender = n.senders[0]
    real, calls = sender.transport.submit, []

    def submit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the second lane's batch is refused")
        return real(*args, **kwargs)
    try:
        tokens = 4 * BLOCK
        h = handoff("tx", tokens, "decode-0")
        n.load_all("tx", tokens, [1, 2, 3, 4])
        sender.reserve(h).result(5)
        sender.transport.submit = submit
        sender.submit(SendSpec("px", h, (5, 6, 7, 8)))
        sends, loads = n.results(1, 2)
        assert not sends[0].ok and "rank 1 not submitted" in sends[0].error, sends
        by_rank = {x.req_id: x for x in loads}
        assert not by_rank["d1"].ok, loads
        assert not by_rank["d0"].ok or by_rank["d0"].signaled, loads
        deadline = time.monotonic() + 5
        while any(r.pool.free_pages != r.pool.num_pages for r in n.receivers):
            assert time.monotonic() < deadline, "pages stayed held"
            time.sleep(0.01)
    finally:
        sender.transport.submit = real
        n.close()


def test_a_layered_handoff_goes_to_every_lane_as_its_layers_compute():
    """TP 1 -> 2, layer by layer: each layer the forward marks goes to both decode ranks (the
    pieces feed both lanes), bitwise, and nothing waits for a layer not marked yet."""
    n = TPNode(1, 2, 2, layerwise=True)
    try:
        p_blocks, d_blocks = list(range(3, 11)), list(range(20, 28))
        tokens = 8 * BLOCK
        h = handoff("tl", tokens, "decode-0")
        n.senders[0].reserve(h)
        marks = LayerMarks(LAYERS)
        n.senders[0].submit_layered(SendSpec("pl", h, tuple(p_blocks), layered=True), marks)
        n.load_all("tl", tokens, d_blocks)
        for layer in range(LAYERS):
            time.sleep(0.05)
            assert not n.senders[0].drain(), "ended before its layers were computed"
            marks.layer(layer)
        marks.forward_done()
        sends, loads = n.results(1, 2)
        assert sends[0].ok and sends[0].layered and all(x.ok for x in loads), (sends, loads)
        assert sends[0].num_bytes == expected_bytes(n, 8)
        n.assert_landed(p_blocks, d_blocks)
    finally:
        n.close()


def test_a_lane_that_fails_fails_the_handoff_on_every_lane():
    """TP 1 -> 2 with decode rank 1 gone: the hand-off fails (naming the deadline), decode rank
    0 is told (its load fails at once, vLLM recomputes) and its pages come back."""
    n = TPNode(1, 2, 2, handshake_s=1)
    try:
        n.receivers[1].close()
        tokens = 4 * BLOCK
        n.receivers[0].submit_load(LoadSpec("d0", handoff("tf", tokens, "prefill-0"), (1, 2, 3, 4)))
        n.senders[0].submit(SendSpec("p0", handoff("tf", tokens, "decode-0"), (5, 6, 7, 8)))
        sends, loads = n.results(1, 1)
        assert not sends[0].ok and "timeouts.handshake_s" in sends[0].error, sends
        assert not loads[0].ok, loads
        wait = time.monotonic() + 5
        while n.receivers[0].pool.free_pages != n.receivers[0].pool.num_pages:
            assert time.monotonic() < wait, "decode rank 0's pages stayed held"
            time.sleep(0.01)
    finally:
        n.receivers.pop(1)
        n.close()


def test_a_rank_that_gives_up_fails_the_handoff_for_both_and_the_pages_return(tp):
    """Rank 0 writes its heads; rank 1's request was dropped (it gives the hand-off up): the
    decode's load fails as a whole (vLLM recomputes) and no page stays held."""
    tokens = 4 * BLOCK
    load = LoadSpec("d", handoff("t2", tokens, "prefill-0"), (1, 2, 3, 4))
    tp.receiver.submit_load(load)
    tp.senders[0].submit(SendSpec("p0", handoff("t2", tokens, "decode-0"), (5, 6, 7, 8)))
    sends, _ = tp.results(1, 0)
    assert sends[0].ok  # its part is in; the reservation waits for rank 1's
    assert tp.receiver.pool.lookup("t2").state.name == "ALLOCATED"
    tp.senders[1].give_up(handoff("t2", tokens, "decode-0"), "request aborted")
    _, loads = tp.results(0, 1)
    assert not loads[0].ok and "request aborted" in loads[0].error, loads
    deadline = time.monotonic() + 5
    while tp.receiver.pool.free_pages != tp.receiver.pool.num_pages:
        assert time.monotonic() < deadline, "pages stayed held"
        time.sleep(0.01)
