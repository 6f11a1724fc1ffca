"""Prepared layers posted one by one (``Transport.prepare_layers``, ``LayerPosts.post``), over every
transport that can: cuda_ipc on a GPU, tcp, loopback with its ``posts_layers`` option. A layer's bytes
land only once it is posted, bitwise, in one batch that is DONE after the last layer; posts from
two threads at once, a layer posted twice or one the batch does not hold change nothing; a batch
closed or sealed before every layer was posted ends CANCELED without copying the rest."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lmcache_pd import auth
from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState
from lmcache_pd.cli.local import free_ports
from lmcache_pd.layout import RangePlan
from tests.transport.handles import wait
from tests.transport.test_contract import setup

LAYER = 64 << 10  # bytes of one layer's plan


KEYS = {"keys": auth.Keyring(b"the layer posts' test secret"), "encrypt": True}


@pytest.fixture(params=[("loopback", {"posts_layers": True}, {}), ("cuda_ipc", {}, {}), ("tcp", {}, {}),
                        ("tcp", {"same_host_reads": False}, {}), ("tcp", {}, KEYS)],
                ids=["loopback", "cuda_ipc", "tcp", "tcp+socket", "tcp+encrypted"])
def posting(request):
    name, options, extra = request.param
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    receiver = transports.create(name, options, host="127.0.0.1", port=free_ports(1)[0], **extra)
    sender = transports.create(name, options, **extra)
    assert sender.capabilities.posts_layers
    yield sender, receiver
    sender.close()
    receiver.close()


def layer_plans(n: int, shared: bool = False) -> list[tuple[int, RangePlan]]:
    """Layer i: two ranges of the source into its own part of the destination (disjoint).
    ``shared``: every plan holds the same lengths array, as layout.plan_layers makes them (cuda_ipc
    then lays every layer out in one pass, ops.prepare_rows)."""
    rng = np.random.default_rng(3)
    lengths = np.full(2, LAYER // 2, dtype=np.int64)
    out = []
    for i in range(n):
        src = rng.choice(np.arange(16), 2, replace=False).astype(np.int64) * (LAYER // 2)
        dst = np.array([2 * i, 2 * i + 1], dtype=np.int64) * (LAYER // 2)
        out.append((i, RangePlan(src, dst, lengths if shared else lengths.copy())))
    return out


def landed(src: torch.Tensor, dst: torch.Tensor, plan: RangePlan) -> bool:
    return all(torch.equal(dst[d:d + n].cpu(), src[s:s + n].cpu())
               for s, d, n in zip(plan.src_offsets, plan.dst_offsets, plan.lengths))


def untouched(dst: torch.Tensor, plan: RangePlan) -> bool:
    return all(bool((dst[d:d + n].cpu() == 0xEE).all()) for d, n in zip(plan.dst_offsets, plan.lengths))


def wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def ready(src: torch.Tensor) -> torch.cuda.Event | None:
    """An event after the work queued so far on the current stream (a forward's layer), on a GPU."""
    if not src.is_cuda:
        return None
    e = torch.cuda.Event()
    e.record()
    return e


@pytest.mark.parametrize("shared", [False, True], ids=["own lengths", "shared lengths"])
def test_each_layer_lands_once_posted_bitwise_in_one_batch(posting, shared):
    sender, receiver, src, dst, sid, peer = setup(posting)
    plans = layer_plans(3, shared)
    posts = sender.prepare_layers(peer, sid, plans, timeout_s=10)
    h = posts.handle
    time.sleep(0.2)
    assert all(untouched(dst, p) for _, p in plans), "a layer landed before it was posted"
    assert not sender.poll(h).terminal
    posts.post(0, ready(src))
    wait_for(lambda: landed(src, dst, plans[0][1]))
    time.sleep(0.1)
    assert untouched(dst, plans[1][1]) and untouched(dst, plans[2][1])
    assert not sender.poll(h).terminal, "DONE before every layer was posted"
    posts.post(0, ready(src))  # twice: ignored
    posts.post(7, ready(src))  # not in the batch: ignored
    posts.post(2, ready(src))  # out of order
    posts.post(1, ready(src))
    assert wait(sender, h) == BatchState.DONE, h.error
    assert all(landed(src, dst, p) for _, p in plans)
    assert h.nbytes == 3 * LAYER
    h.close()


def test_posts_from_two_threads_at_once_end_the_batch_once_after_every_layer(posting):
    """The forward's thread and the sender's (layers computed before the batch was prepared)."""
    sender, receiver, src, dst, sid, peer = setup(posting)
    plans = layer_plans(8)
    posts = sender.prepare_layers(peer, sid, plans, timeout_s=10)
    go = threading.Barrier(2)

    def half(layers: range) -> None:
        go.wait()
        for i in layers:
            posts.post(i, ready(src))
    other = threading.Thread(target=half, args=(range(0, 8, 2),))
    other.start()
    half(range(1, 8, 2))
    other.join()
    assert wait(sender, posts.handle) == BatchState.DONE, posts.handle.error
    assert all(landed(src, dst, p) for _, p in plans)
    posts.handle.close()


def test_a_batch_closed_before_every_layer_was_posted_ends_canceled_and_copies_no_more(posting):
    sender, receiver, src, dst, sid, peer = setup(posting)
    plans = layer_plans(2)
    posts = sender.prepare_layers(peer, sid, plans, timeout_s=10)
    posts.post(0, ready(src))
    wait_for(lambda: landed(src, dst, plans[0][1]))
    posts.handle.close()  # returns once nothing of it moves any more
    assert posts.handle.state == BatchState.CANCELED, posts.handle
    posts.post(1, ready(src))  # after the close: ignored
    time.sleep(0.1)
    assert untouched(dst, plans[1][1])


def test_a_sealed_batch_ends_canceled_after_the_layers_posted_and_posts_no_more(posting):
    """A preemption (``LayerPosts.seal``): what was posted lands, nothing posted after it goes,
    and the batch ends CANCELED with the reason; sealed after its last post, it is DONE."""
    sender, receiver, src, dst, sid, peer = setup(posting)
    plans = layer_plans(3)
    posts = sender.prepare_layers(peer, sid, plans, timeout_s=10)
    posts.post(0, ready(src))
    posts.seal("request preempted")
    posts.post(1, ready(src))  # the forward goes on: ignored
    assert wait(sender, posts.handle) == BatchState.CANCELED, posts.handle
    assert "preempted" in (posts.handle.error or ""), posts.handle.error
    assert landed(src, dst, plans[0][1])
    time.sleep(0.1)
    assert untouched(dst, plans[1][1]) and untouched(dst, plans[2][1])
    posts.handle.close()
    whole = sender.prepare_layers(peer, sid, layer_plans(1), timeout_s=10)
    whole.post(0, ready(src))
    whole.seal("too late")
    assert wait(sender, whole.handle) == BatchState.DONE, whole.handle
    whole.handle.close()


@pytest.mark.parametrize("shared", [False, True], ids=["own lengths", "shared lengths"])
@pytest.mark.parametrize("side", ["before the source", "past the source", "past the destination"])
def test_a_layer_outside_the_regions_fails_the_batch_and_copies_nothing(posting, shared, side):
    sender, receiver, src, dst, sid, peer = setup(posting)
    plans = layer_plans(3, shared)
    i, bad = plans[1]
    wild = np.array([0, -LAYER if side == "before the source" else 1 << 40], dtype=np.int64)  # its second range
    plans[1] = (i, RangePlan(wild, bad.dst_offsets, bad.lengths) if "source" in side
                else RangePlan(bad.src_offsets, wild, bad.lengths))
    posts = sender.prepare_layers(peer, sid, plans, timeout_s=10)
    assert wait(sender, posts.handle) == BatchState.FAILED
    for layer, _ in plans:
        posts.post(layer, ready(src))  # (after the failure: ignored)
    time.sleep(0.1)
    assert untouched(dst, plans[0][1]) and untouched(dst, plans[2][1])
    posts.handle.close()


def test_a_transport_that_cannot_post_layers_says_so():
    t = transports.create("loopback", {})
    try:
        assert not t.capabilities.posts_layers
        with pytest.raises(NotImplementedError, match="cannot post prepared layers"):
            t.prepare_layers(1, 1, [], 1.0)
    finally:
        t.close()
