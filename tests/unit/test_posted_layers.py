"""A layered hand-off's last chunk prepared at once and posted layer by layer by the forward's
marks (``transport.post_layers``, node/layered.py, ``Transport.prepare_layers``): sender and
receiver in one process, over tcp and over loopback with its ``posts_layers`` option.

Where the decode is told of no layer (its pool shares our GPU), the sender prepares the final
piece as one batch before any layer is computed, and the marking thread posts each layer: its
bytes land once marked (the sender's loop is not woken for it), and the hand-off arrives
bitwise. Off, or where the decode is told of each layer (Landed), it goes a batch per layer.
"""

from __future__ import annotations

import time

import msgspec
import pytest
import torch

from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.layered import LayerMarks
from tests.unit.nodes import BLOCK, LAYERS, Node, first_chunk, last_chunk, make_cfg
from tests.waiting import wait_for


def wait_until(cond, what: str = "condition met") -> None:
    wait_for(cond, 5.0, what, every_s=0.002)


@pytest.fixture
def calls() -> dict[str, int]:
    """Filled by :func:`spy_on`: how often the sender submitted a batch and prepared layers."""
    return {"submit": 0, "prepare_layers": 0}


def spy_on(n: Node, calls: dict[str, int]) -> None:
    t = n.sender.transport
    for name in calls:
        real = getattr(t, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        setattr(t, name, spy)


@pytest.fixture
def woke(monkeypatch) -> list[float]:
    """When a hand-off's loop woke from its wait (``layered.woken``, spied on)."""
    from lmcache_pd.node import layered

    seen: list[float] = []
    real = layered.woken

    async def spy(event, timeout_s):
        await real(event, timeout_s)
        seen.append(time.monotonic())
    monkeypatch.setattr(layered, "woken", spy)
    return seen


SHARED = {"shares_device": True, "posts_layers": True}  # loopback as cuda_ipc to a pool on our GPU


@pytest.mark.parametrize("name,options,post_layers,posted", [
    ("loopback", SHARED, True, True), ("loopback", SHARED, False, False),
    ("loopback", {"shares_device": False, "posts_layers": True}, True, False),
    ("tcp", {}, True, True), ("tcp", {}, False, False)],
    ids=["posted", "post_layers-off", "decode-told", "tcp", "tcp-post_layers-off"])
def test_the_last_chunk_goes_in_one_batch_each_layer_posted_as_marked(name, options, post_layers, posted, woke, calls):
    """tcp posts too: its receiver sees each layer land (a batch of the wire each), no Landed to send."""
    cfg = make_cfg(name, options=options, layerwise=True)
    cfg = msgspec.structs.replace(cfg, transport=msgspec.structs.replace(cfg.transport, post_layers=post_layers))
    n = Node(cfg)
    spy_on(n, calls)
    try:
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        for layer in n.p_layers:  # (each block's bytes unique, so that the pool can be searched)
            for b in p_blocks:
                layer[b].view(torch.uint8).copy_(torch.randint(0, 256, layer[b].view(torch.uint8).shape,
                                                               dtype=torch.uint8))
        marks = LayerMarks(LAYERS)
        h = Handoff("q1", "decode-0", 3 * BLOCK - 2, "d" * 32)
        n.sender.reserve(h).result(5)
        n.sender.submit_layered(SendSpec("p-q1", h, tuple(p_blocks), layered=True), marks)
        n.receiver.submit_load(LoadSpec("d-q1", Handoff("q1", "prefill-0", 3 * BLOCK - 2, "d" * 32), tuple(d_blocks)))
        if posted:  # prepared before the forward computed any layer ...
            wait_until(lambda: calls["prepare_layers"] == 1)
        time.sleep(0.1)
        assert not n.in_pool(0, p_blocks), "a layer went before the forward marked it"
        wakes = len(woke)
        marks.layer(0)
        wait_until(lambda: n.in_pool(0, p_blocks))  # ... and layer 0 lands once marked
        if posted:
            assert len(woke) == wakes, "the sender's loop woke for a layer posted by its mark"
        time.sleep(0.1)
        assert not n.in_pool(1, p_blocks), "layer 1 went before it was marked"
        for b in p_blocks:  # the forward writes layer 1 after layer 0 landed: what goes is this
            n.p_layers[1][b].view(torch.uint8).copy_(torch.randint(0, 256, n.p_layers[1][b].view(torch.uint8).shape,
                                                                   dtype=torch.uint8))
        computing_1 = time.time()
        marks.layer(1)
        marks.forward_done()
        sends, loads = n.results(1, 1)
        assert sends[0].ok and loads[0].ok, (sends[0].error, loads[0].error)
        n.assert_moved(p_blocks, d_blocks)
        assert calls == ({"submit": 0, "prepare_layers": 1} if posted else {"submit": LAYERS, "prepare_layers": 0}), calls
        assert sends[0].first_byte_at < sends[0].computed_at, sends[0]
        assert sends[0].posted is posted and sends[0].layered, sends[0]  # (the hand-off log says which way it went)
        sent_0, sent_1 = sends[0].layers_sent_at  # each layer handed over once marked ...
        assert 0 < sent_0 < computing_1 <= sent_1, sends[0]
        if posted:  # ... posted: by the marking thread, before the forward's end
            assert sent_1 <= sends[0].computed_at, sends[0]
        assert n.pool_full()
    finally:
        n.close()


@pytest.fixture(params=["loopback", "tcp"])
def posting(request) -> str:
    """The transports whose node posts a layered hand-off's last chunk by default."""
    return request.param


def test_a_chunked_prompts_earlier_piece_goes_whole_and_its_last_chunk_posted(calls, posting):
    """Chunked prefill with posted layers: the first chunk's blocks go in one submitted batch once
    its forward computed them; the last chunk's are prepared as one batch when its piece comes
    and posted layer by layer by its marks; everything lands bitwise."""
    n = posted_node(posting)
    spy_on(n, calls)
    try:
        p_blocks, d_blocks = [5, 6, 30, 31], [11, 12, 40, 41]
        pieces = first_chunk(n, "chunked", p_blocks, d_blocks, 3 * BLOCK + 3, split=2)
        wait_until(lambda: n.in_pool(LAYERS - 1, p_blocks[:2]))
        assert calls == {"submit": 1, "prepare_layers": 0}, calls
        last = last_chunk(n, pieces, p_blocks, split=2)  # its forward writes its blocks now
        wait_until(lambda: calls["prepare_layers"] == 1)
        for i in range(LAYERS):
            last.layer(i)
        last.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.pieces == 2 and s.posted, s
        assert calls == {"submit": 1, "prepare_layers": 1}, calls
        n.assert_moved(p_blocks, d_blocks)
        assert n.pool_full()
    finally:
        n.close()


def posted_node(name: str, **timeouts) -> Node:
    return Node(make_cfg(name, options=SHARED if name == "loopback" else {}, layerwise=True, **timeouts))


def start(n: Node, tid: str, p_blocks: list[int], d_blocks: list[int]) -> LayerMarks:
    marks = LayerMarks(LAYERS)
    h = Handoff(tid, "decode-0", len(p_blocks) * BLOCK, "d" * 32)
    n.sender.reserve(h).result(5)
    n.sender.submit_layered(SendSpec(f"p-{tid}", h, tuple(p_blocks), layered=True), marks)
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", len(p_blocks) * BLOCK, "d" * 32),
                                    tuple(d_blocks)))
    return marks


def test_posted_a_forward_that_stops_fails_the_handoff_naming_data_s_and_the_pages_return(posting):
    n = posted_node(posting, data_s=0.5)
    try:
        marks = start(n, "stall", [5, 6], [11, 12])
        marks.layer(0)  # layer 1 never comes: its post never does
        (s,), (ld,) = n.results(1, 1, timeout_s=10)
        assert not s.ok and "timeouts.data_s" in s.error and "forward" in s.error, s.error
        assert not ld.ok
        assert n.pool_full()
        marks.layer(1)  # a post after the batch ended: nothing moves, nothing raises
    finally:
        n.close()


def test_posted_a_forward_longer_than_data_s_whose_layers_each_come_within_it_completes(posting):
    """``timeouts.data_s`` bounds the wait for each next layer, not the whole forward: a post is
    progress, as a mark is for a batch per layer (layers come 0.35 s apart, data_s is 0.5 s)."""
    n = posted_node(posting, data_s=0.5)
    try:
        marks = start(n, "slow", [5, 6], [11, 12])
        time.sleep(0.35)  # (the batch is prepared by now: the pages were granted at once)
        for layer in range(LAYERS):
            marks.layer(layer)
            time.sleep(0.35)
        marks.forward_done()
        (s,), (ld,) = n.results(1, 1, timeout_s=5)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.posted, s
        n.assert_moved([5, 6], [11, 12])
        assert n.pool_full()
    finally:
        n.close()


def test_posted_an_aborted_request_ends_its_handoff_at_once_and_the_pages_return(posting):
    """An unreserve (the request aborted) ends the hand-off whose posted batch still waits for
    layers at the sender's next look (it sleeps 0.25 s at most), well before ``timeouts.data_s``
    (3 s here), naming the abort; the batch is closed and posts no more."""
    n = posted_node(posting)
    try:
        marks = start(n, "gone", [5, 6], [11, 12])
        marks.layer(0)
        wait_until(lambda: n.in_pool(0, [5, 6]))
        t0 = time.monotonic()
        n.sender.unreserve("gone", "request aborted")
        (s,), (ld,) = n.results(1, 1, timeout_s=5)
        assert not s.ok and not ld.ok
        assert "aborted" in s.error, s.error
        assert time.monotonic() - t0 < 1.5
        assert n.pool_full()
    finally:
        n.close()
