"""Transport contract: bytes arrive bitwise, bad writes are refused, handles always end."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost
from lmcache_pd.layout import coalesce
from lmcache_pd.transport import Transport
from tests.transport.handles import wait


def device_for(t: Transport) -> torch.device:
    return torch.device("cpu" if "cpu" in t.capabilities.mem_kinds else "cuda")


def setup(pair, src_bytes: int = 1 << 20, dst_bytes: int = 1 << 20, seed: int = 0):
    sender, receiver = pair
    dev = device_for(sender)
    src = torch.randint(0, 256, (src_bytes,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed)).to(dev)
    dst = receiver.allocate(dst_bytes, dev)
    dst.fill_(0xEE)  # poisoned: every byte not in the plan must stay 0xEE
    rid = receiver.register(dst)
    if receiver.capabilities.listens:
        receiver.listen()
    sid = sender.register(src)
    peer = sender.connect(receiver.export_descriptor(rid), timeout_s=5)
    return sender, receiver, src, dst, sid, peer


def random_plan(rng: np.random.Generator, n: int, size: int, span: int):
    dst = np.sort(rng.choice(np.arange(0, span // size), n, replace=False)) * size
    src = rng.choice(np.arange(0, span // size), n, replace=False) * size
    return coalesce(src.astype(np.int64), dst.astype(np.int64), np.full(n, size, dtype=np.int64))


def test_plan_arrives_bitwise_and_nothing_else_changes(pair):
    sender, receiver, src, dst, sid, peer = setup(pair)
    plan = random_plan(np.random.default_rng(0), 40, 4096, 1 << 20)
    with sender.submit(peer, sid, plan, timeout_s=10) as h:
        assert wait(sender, h) == BatchState.DONE, h.error
    expect = torch.full_like(dst, 0xEE)
    for s, d, n in zip(plan.src_offsets, plan.dst_offsets, plan.lengths):
        expect[d:d + n] = src[s:s + n]
    assert torch.equal(dst, expect)
    assert sender.stats.bytes == plan.nbytes and sender.stats.batches == 1 and sender.stats.gbps > 0


def test_large_single_range(pair):
    sender, receiver, src, dst, sid, peer = setup(pair, 32 << 20, 32 << 20, seed=1)
    plan = coalesce(np.array([0]), np.array([0]), np.array([32 << 20]))
    h = sender.submit(peer, sid, plan, timeout_s=30)
    assert wait(sender, h, 30) == BatchState.DONE, h.error
    h.close()
    assert torch.equal(src, dst)


def test_write_outside_the_peer_region_is_refused_and_the_peer_survives(pair):
    sender, receiver, src, dst, sid, peer = setup(pair, dst_bytes=1 << 16)
    bad = coalesce(np.array([0]), np.array([(1 << 16) - 100]), np.array([200]))
    h = sender.submit(peer, sid, bad, timeout_s=5)
    assert wait(sender, h) == BatchState.FAILED
    h.close()
    assert torch.all(dst == 0xEE)
    good = coalesce(np.array([100]), np.array([0]), np.array([1000]))
    h = sender.submit(peer, sid, good, timeout_s=5)
    assert wait(sender, h) == BatchState.DONE, h.error
    h.close()
    assert torch.equal(dst[:1000], src[100:1100])


@pytest.mark.parametrize("start", [-100, (1 << 16) - 100], ids=["before the source", "past the source"])
def test_a_read_outside_the_local_region_is_refused(pair, start):
    """Never bytes from beside our own region (another request's KV, or memory not ours) to a peer."""
    sender, receiver, src, dst, sid, peer = setup(pair, src_bytes=1 << 16)
    bad = coalesce(np.array([0, start]), np.array([0, 4096]), np.array([1000, 200]))
    h = sender.submit(peer, sid, bad, timeout_s=5)
    assert wait(sender, h) == BatchState.FAILED
    h.close()
    assert torch.all(dst == 0xEE)


def test_concurrent_submits_from_many_threads(pair):
    sender, receiver, src, dst, sid, peer = setup(pair, 1 << 20, 1 << 20, seed=2)
    states: list[BatchState] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        plan = coalesce(np.array([k * 65536]), np.array([k * 65536]), np.array([65536]))
        h = sender.submit(peer, sid, plan, timeout_s=10)
        s = wait(sender, h)
        h.close()
        with lock:
            states.append(s)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states == [BatchState.DONE] * 16
    assert torch.equal(src, dst)


def test_garbage_descriptor_is_refused(pair):
    sender, receiver = pair
    sender.register(torch.zeros(16, dtype=torch.uint8, device=device_for(sender)))
    with pytest.raises(PeerLost):
        sender.connect(b"\x92\xa3not\xa1a", timeout_s=1)


def test_a_closed_peer_is_refused_or_fails(pair):
    sender, receiver, src, dst, sid, peer = setup(pair)
    desc = receiver.export_descriptor(1)
    receiver.close()
    try:
        peer2 = sender.connect(desc, timeout_s=1)
    except PeerLost:
        return
    h = sender.submit(peer2, sid, coalesce(np.array([0]), np.array([0]), np.array([10])), timeout_s=2)
    assert wait(sender, h) in (BatchState.FAILED, BatchState.TIMEOUT)
    h.close()


def test_empty_plan_is_done(pair):
    sender, receiver, src, dst, sid, peer = setup(pair)
    empty = coalesce(np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    h = sender.submit(peer, sid, empty, timeout_s=5)
    assert wait(sender, h) == BatchState.DONE
    h.close()


def test_close_is_idempotent(pair):
    sender, receiver, *_ = setup(pair)
    sender.close()
    sender.close()
    receiver.close()
    receiver.close()
