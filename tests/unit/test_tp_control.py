"""Prefill and decode of different TP sizes on the control plane (issue 20): which prefill ranks
a decode rank accepts (control/ranks.py), and reservations written by several prefill ranks at
once (a decode rank merging the heads of a wider prefill: ``PagePool.join``), over real zmq
sockets where the server is involved."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from lmcache_pd import protocol as P
from lmcache_pd._types import ReservationState
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.ranks import check_ranks
from lmcache_pd.control.server import ControlServer
from lmcache_pd.errors import IncompatiblePeer, TransferError
from lmcache_pd.handoff import Handoff
from tests.unit.control_peers import KEYS, alloc, client_for, handshake, req, run
from tests.unit.kv import COMPAT

# The test model's shape: 2 KV heads. A decode at TP 1 holds both; a prefill rank at TP 2 one.
DECODE_TP1 = COMPAT
TP2 = [msgspec.structs.replace(COMPAT, tp_size=2, tp_rank=r, num_kv_heads=1, page_bytes=32768) for r in range(2)]


def rank(c: P.CompatInfo, r: int, tp: int, heads: int, model_heads: int = 0) -> P.CompatInfo:
    return msgspec.structs.replace(c, tp_size=tp, tp_rank=r, num_kv_heads=heads, page_bytes=heads * 32768,
                                   model_kv_heads=model_heads)


def test_the_hash_covers_what_every_rank_shares_and_ranks_decide_who_sends():
    assert TP2[0].digest() == TP2[1].digest() == DECODE_TP1.digest()  # per-rank fields are left out
    assert msgspec.structs.replace(COMPAT, dtype="x").digest() != COMPAT.digest()
    assert check_ranks(DECODE_TP1, TP2[0]).senders == check_ranks(DECODE_TP1, TP2[1]).senders == 2  # merged
    assert check_ranks(DECODE_TP1, TP2[1]).sections == ((0, 1), (1, 1))  # each writer's heads: its section of the pages
    assert check_ranks(TP2[0], TP2[0]).sections == check_ranks(TP2[1], DECODE_TP1).sections == ()  # whole pages
    for r in range(2):  # equal sizes: the rank of the same number only
        assert check_ranks(TP2[r], TP2[r]).senders == 1
        other = check_ranks(TP2[r], TP2[1 - r])
        assert other.field == "tp_rank" and "sends no KV heads" in other.why
    assert check_ranks(TP2[1], DECODE_TP1).senders == 1  # a narrow prefill: each decode rank has one sender
    # 2 heads over a prefill of TP 4: each head held by two ranks, sent by the first of them.
    tp4 = [rank(COMPAT, r, 4, 1, model_heads=2) for r in range(4)]
    d1 = msgspec.structs.replace(DECODE_TP1, model_kv_heads=2)
    assert [check_ranks(d1, c).ok for c in tp4] == [True, False, True, False]
    assert check_ranks(d1, tp4[0]).senders == 2 and check_ranks(d1, tp4[2]).sections == ((0, 1), (1, 1))


def test_mappings_that_cannot_work_are_refused_naming_the_field():
    three = rank(COMPAT, 0, 2, 1, model_heads=3)  # 3 heads do not split over 2 ranks
    assert check_ranks(msgspec.structs.replace(DECODE_TP1, model_kv_heads=3, num_kv_heads=3), three).field == "tp_size"
    assert check_ranks(DECODE_TP1, msgspec.structs.replace(TP2[0], num_kv_heads=2)).field == "num_kv_heads"
    nhd = msgspec.structs.replace(DECODE_TP1, kv_layout="NHD")
    got = check_ranks(nhd, msgspec.structs.replace(TP2[0], kv_layout="NHD"))
    assert got.field == "kv_layout" and "heads outermost" in got.why
    assert check_ranks(nhd, msgspec.structs.replace(COMPAT, kv_layout="NHD")).ok  # equal sizes: whole blocks


# --- the pool: one reservation, several writers ------------------------------------------------

def claim(tid: str = "t", digest: str = "d") -> Handoff:
    return Handoff(tid, "prefill-0", 3 * 128, digest)


def test_a_merged_reservation_is_ready_when_every_writer_is_done():
    pool = PagePool(8, lease_s=10)
    pages = pool.reserve(claim(), 3, owner="a", now=0, senders=2)
    r = pool.join(claim(), 3, owner="b", now=0)
    assert r.pages == pages and pool.free_pages == 5
    pool.mark_landed("t", owner="a", layers=[0, 1], num_layers=2, now=0)  # one writer's heads: not whole
    assert r.layers_landed == frozenset()
    pool.mark_ready("t", owner="a", num_bytes=100, seconds=0.1, now=1)
    assert r.state == ReservationState.ALLOCATED  # b's heads are not in yet
    with pytest.raises(TransferError):
        pool.mark_ready("t", owner="a", num_bytes=100, seconds=0.1, now=1)  # not twice
    pool.mark_ready("t", owner="b", num_bytes=100, seconds=0.2, now=1)
    assert r.state == ReservationState.READY and r.num_bytes == 200


def test_only_the_expected_writers_of_the_same_prompt_join():
    pool = PagePool(8, lease_s=10)
    pool.reserve(claim(), 3, owner="a", now=0, senders=2)
    for bad in ((claim(digest="other"), 3, "b"), (claim(), 4, "b"), (claim(), 3, "a")):
        with pytest.raises(TransferError, match="already known"):
            pool.join(bad[0], bad[1], owner=bad[2], now=0)
    pool.join(claim(), 3, owner="b", now=0)
    with pytest.raises(TransferError, match="already known"):  # a third writer of two
        pool.join(claim(), 3, owner="c", now=0)
    pool.reserve(claim("one"), 1, owner="a", now=0)  # one writer expected: nobody joins
    with pytest.raises(TransferError):
        pool.join(claim("one"), 1, owner="b", now=0)


def test_one_writer_cancelling_ends_it_for_all_and_the_rest_must_confirm():
    """Over a one-sided transport (quarantine): a's Cancel ends the reservation; b may still be
    writing, so b is told (Ended) and the pages stay out of use until b confirms."""
    pool = PagePool(4, lease_s=10, quarantine_s=5)
    pool.reserve(claim(), 3, owner="a", now=0, senders=2)
    pool.join(claim(), 3, owner="b", now=0)
    assert pool.abort("t", reason="canceled", now=1, owner="a")
    assert [n[0] for n in pool.take_notices()] == ["b"]
    assert pool.free_pages == 1 and pool.held("t")
    assert not pool.confirm_end("t", owner="a", now=2)  # a stopped already: nothing to confirm
    assert pool.confirm_end("t", owner="b", now=2) and pool.free_pages == 4


def test_a_writer_whose_session_ended_aborts_its_unfinished_reservations_only():
    pool = PagePool(8, lease_s=10, quarantine_s=5)
    pool.reserve(claim("t1"), 2, owner="a", now=0, senders=2)
    pool.join(claim("t1"), 2, owner="b", now=0)
    pool.reserve(claim("t2"), 2, owner="a", now=0, senders=2)
    pool.join(claim("t2"), 2, owner="b", now=0)
    pool.mark_ready("t2", owner="b", num_bytes=1, seconds=0.1, now=0)  # b finished t2
    assert pool.abort_writing("b", reason="b is gone", now=1) == ["t1"]
    assert pool.lookup("t1").state == ReservationState.ABORTED
    assert pool.take_notices() == [("a", "t1", pool.lookup("t1").generation, "b is gone")]  # a is told, b cannot be
    assert pool.lookup("t2").state == ReservationState.ALLOCATED  # b's part of t2 is in; a's still to come


# --- the control server -------------------------------------------------------------------------

@pytest.fixture
def decode_tp1():
    pool = PagePool(4, lease_s=30)
    srv = ControlServer(pool, bind="tcp://127.0.0.1:0", compat=DECODE_TP1, incarnation="dec-1", page_bytes=65536,
                        descriptor=b"pool", max_alloc_wait_s=5.0, keys=KEYS)
    srv.start()
    yield srv
    srv.close()


def test_two_prefill_ranks_write_one_reservation_of_a_narrower_decode(decode_tp1):
    """Both ranks of a TP 2 prefill Allocate the same transfer: the second joins the first's
    pages; READY only after both TransferDones. A joiner that comes while the first waits for
    pages queues behind it and gets the same pages."""
    async def go():
        ctx0, c0 = await client_for(decode_tp1, identity="prefill-0/0/x")
        ctx1, c1 = await client_for(decode_tp1, identity="prefill-0/1/x")
        for c, compat in ((c0, TP2[0]), (c1, TP2[1])):
            assert isinstance(await handshake(c, compat), P.HandshakeReply)
        a = await req(c0, alloc(c0, "t1", 3))
        b = await req(c1, alloc(c1, "t1", 3))
        assert isinstance(a, P.Allocated) and isinstance(b, P.Allocated)
        assert (a.pages, a.generation) == (b.pages, b.generation)
        await req(c0, P.TransferDone(msg_id=c0.next_id(), transfer_id="t1", num_bytes=5, seconds=0.1))
        assert decode_tp1.pool.lookup("t1").state == ReservationState.ALLOCATED
        await req(c1, P.TransferDone(msg_id=c1.next_id(), transfer_id="t1", num_bytes=5, seconds=0.1))
        assert decode_tp1.pool.lookup("t1").state == ReservationState.READY
        # The pool has 1 page left: t2's first writer waits, its joiner queues behind it.
        first = c1.request(alloc(c1, "t2", 3, wait_s=5.0), timeout_s=10, config_field="t", what="alloc")
        t_first = asyncio.ensure_future(first)
        await asyncio.sleep(0.2)
        t_join = asyncio.ensure_future(c0.request(alloc(c0, "t2", 3, wait_s=5.0), timeout_s=10, config_field="t",
                                                  what="alloc"))
        await asyncio.sleep(0.2)
        assert not t_first.done() and not t_join.done()
        decode_tp1.pool.claim("t1")
        decode_tp1.pool.free("t1", now=decode_tp1.clock())
        x, y = await t_first, await t_join
        assert x.pages == y.pages and len(x.pages) == 3
        for c, ctx in ((c0, ctx0), (c1, ctx1)):
            await c.close()
            ctx.term()
    run(go())
    assert decode_tp1.stats.handshakes == 2


def test_a_rank_that_sends_nothing_here_is_refused(decode_tp1):
    async def go():
        ctx, c = await client_for(decode_tp1)
        with pytest.raises(IncompatiblePeer) as e:
            await handshake(c, rank(COMPAT, 1, 4, 1, model_heads=2))  # holds a copy rank 0 sends
        assert list(e.value.fields) == ["tp_rank"]
        await c.close()
        ctx.term()
    run(go())
    assert decode_tp1.stats.refused_handshakes == 1
