"""A layered hand-off's last chunk prepared at once and posted layer by layer by the forward's
marks (``transport.post_layers``, node/layered.py, ``Transport.prepare_layers``): sender and
receiver in one process, over loopback with its ``posts_layers`` option.

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


def in_pool(n: Node, layer: int, blocks: list[int]) -> bool:
    """The decode pool holds ``layer`` of each of the prefill's ``blocks`` (found byte for byte)."""
    pool = n.receiver.pool_buffer.numpy().tobytes()
    return all(n.p_layers[layer][b].view(torch.uint8).numpy().tobytes() in pool for b in blocks)


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


@pytest.mark.parametrize("post_layers,shared", [(True, True), (False, True), (True, False)],
                         ids=["posted", "post_layers-off", "decode-told"])
def test_the_last_chunk_goes_in_one_batch_each_layer_posted_as_marked(post_layers, shared, woke, calls):
    cfg = make_cfg("loopback", options={"shares_device": shared, "posts_layers": True}, layerwise=True)
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
        posted = post_layers and shared
        if posted:  # prepared before the forward computed any layer ...
            wait_until(lambda: calls["prepare_layers"] == 1)
        time.sleep(0.1)
        assert not in_pool(n, 0, p_blocks), "a layer went before the forward marked it"
        wakes = len(woke)
        marks.layer(0)
        wait_until(lambda: in_pool(n, 0, p_blocks))  # ... and layer 0 lands once marked
        if posted:
            assert len(woke) == wakes, "the sender's loop woke for a layer posted by its mark"
        time.sleep(0.1)
        assert not in_pool(n, 1, p_blocks), "layer 1 went before it was marked"
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


def test_a_chunked_prompts_earlier_piece_goes_whole_and_its_last_chunk_posted(calls):
    """Chunked prefill with posted layers: the first chunk's blocks go in one submitted batch once
    its forward computed them; the last chunk's are prepared as one batch when its piece comes
    and posted layer by layer by its marks; everything lands bitwise."""
    n = posted_node()
    spy_on(n, calls)
    try:
        p_blocks, d_blocks = [5, 6, 30, 31], [11, 12, 40, 41]
        pieces = first_chunk(n, "chunked", p_blocks, d_blocks, 3 * BLOCK + 3, split=2)
        wait_until(lambda: in_pool(n, LAYERS - 1, p_blocks[:2]))
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


def posted_node(**timeouts) -> Node:
    return Node(make_cfg("loopback", options={"shares_device": True, "posts_layers": True}, layerwise=True, **timeouts))


def start(n: Node, tid: str, p_blocks: list[int], d_blocks: list[int]) -> LayerMarks:
    marks = LayerMarks(LAYERS)
    h = Handoff(tid, "decode-0", len(p_blocks) * BLOCK, "d" * 32)
    n.sender.reserve(h).result(5)
    n.sender.submit_layered(SendSpec(f"p-{tid}", h, tuple(p_blocks), layered=True), marks)
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", len(p_blocks) * BLOCK, "d" * 32),
                                    tuple(d_blocks)))
    return marks


def test_posted_a_forward_that_stops_fails_the_handoff_naming_data_s_and_the_pages_return():
    n = posted_node(data_s=0.5)
    try:
        marks = start(n, "stall", [5, 6], [11, 12])
        marks.layer(0)  # layer 1 never comes: its post never does
        (s,), (ld,) = n.results(1, 1, timeout_s=10)
        assert not s.ok and "timeouts.data_s" in s.error, s.error
        assert not ld.ok
        assert n.pool_full()
        marks.layer(1)  # a post after the batch ended: nothing moves, nothing raises
    finally:
        n.close()


def test_posted_an_aborted_request_ends_its_handoff_at_once_and_the_pages_return():
    """An unreserve (the request aborted) ends the hand-off whose posted batch still waits for
    layers at the sender's next look (it sleeps 0.25 s at most), well before ``timeouts.data_s``
    (3 s here), naming the abort; the batch is closed and posts no more."""
    n = posted_node()
    try:
        marks = start(n, "gone", [5, 6], [11, 12])
        marks.layer(0)
        wait_until(lambda: in_pool(n, 0, [5, 6]))
        t0 = time.monotonic()
        n.sender.unreserve("gone", "request aborted")
        (s,), (ld,) = n.results(1, 1, timeout_s=5)
        assert not s.ok and not ld.ok
        assert "aborted" in s.error, s.error
        assert time.monotonic() - t0 < 1.5
        assert n.pool_full()
    finally:
        n.close()
