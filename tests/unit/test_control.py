"""Control plane over real zmq sockets: handshake, allocation, queueing, refusals, garbage.

Authentication, replays and liveness are in test_control_auth.py; random frames in test_fuzz.py."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd._types import ReservationState
from lmcache_pd.control import server as server_module
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.client import ControlClient
from lmcache_pd.control.server import ControlServer
from lmcache_pd.errors import IncompatiblePeer, PeerLost, PoolExhausted, TransferError, TransferTimeout
from lmcache_pd.handoff import Handoff
from tests.threads_os import wakeups
from tests.unit.control_peers import (
    KEYS,
    RawPeer,
    alloc,
    client_for,
    handshake,
    req,
    run,
)
from tests.unit.kv import COMPAT


@pytest.fixture
def server():
    pool = PagePool(8, lease_s=30)
    srv = ControlServer(pool, bind="tcp://127.0.0.1:0", compat=COMPAT, incarnation="dec-1", page_bytes=65536,
                        descriptor=b"pool-descriptor", max_alloc_wait_s=5.0, keys=KEYS, prefix=Holder(0))
    srv.start()
    yield srv
    srv.close()


def test_handshake_allocate_and_ready(server):
    async def go():
        ctx, c = await client_for(server)
        reply = await handshake(c)
        assert isinstance(reply, P.HandshakeReply)
        assert (reply.incarnation, reply.num_pages, reply.descriptor) == ("dec-1", 8, b"pool-descriptor")
        got = await req(c, alloc(c, "t1", 3))
        assert isinstance(got, P.Allocated) and got.pages == [0, 1, 2]
        r = server.pool.lookup("t1")
        assert r.state == ReservationState.ALLOCATED
        # The reservation holds the hand-off as the session's peer described it.
        assert (r.claim.peer, r.claim.num_tokens, r.claim.prompt_digest) == ("prefill-0", 3 * 128, "d")
        assert await c.post(P.Landed(msg_id=c.next_id(), transfer_id="t1", pages=2))
        await req(c, P.Heartbeat(msg_id=c.next_id(), transfer_ids=["t1"]))  # handled in order after it
        assert server.pool.lookup("t1").landed == 2
        ack = await req(c, P.TransferDone(msg_id=c.next_id(), transfer_id="t1", num_bytes=3, seconds=0.1))
        assert isinstance(ack, P.Ack) and ack.incarnation == "dec-1"
        assert server.pool.lookup("t1").state == ReservationState.READY
        await c.close()
        ctx.term()
    run(go())


def test_a_round_trip_costs_the_clients_loop_two_turns(server):
    """The client reads replies in a callback on its socket's descriptor, with no future or task
    per frame: a request's round trip turns the loop twice (the reply read, the request resumed).
    On the prefill's core every turn is a wake-up (about 0.1 ms of CPU each on the CPU machine);
    zmq.asyncio's reader took three turns for the same round trip, a heartbeat's task more."""
    async def go():
        loop = asyncio.get_running_loop()
        ctx, c = await client_for(server)
        await handshake(c)
        turns, real = [0], loop._run_once

        def counting() -> None:
            turns[0] += 1
            real()
        loop._run_once = counting  # (an instance attribute: run_forever calls it)
        try:
            await asyncio.sleep(0)
            before = turns[0]
            for _ in range(20):
                ack = await req(c, P.Heartbeat(msg_id=c.next_id(), transfer_ids=[]))
                assert isinstance(ack, P.Ack)
            assert turns[0] - before <= 2 * 20, (turns[0] - before) / 20
        finally:
            del loop._run_once
        await c.close()
        ctx.term()
    run(go())
    import zmq.asyncio  # (its sockets answer with futures, which the client does not read)
    actx = zmq.asyncio.Context()
    with pytest.raises(TypeError, match="zmq.Context"):
        ControlClient(actx, endpoint=server.endpoint, identity="p/0/a", peer="decode-0", keys=KEYS)
    actx.term()


def test_incompatible_peer_is_refused_naming_the_field(server):
    async def go():
        ctx, c = await client_for(server)
        bad = msgspec.structs.replace(COMPAT, block_size=16, dtype="torch.float16/auto")
        with pytest.raises(IncompatiblePeer) as e:
            await handshake(c, bad)
        assert set(e.value.fields) == {"block_size", "dtype"}
        assert "block_size: prefill 16 != decode 128" in str(e.value)
        # A forged hash over a different compat is refused too.
        forged = P.Handshake(msg_id=0, peer="p", incarnation="i", compat_hash=COMPAT.digest(),
                             compat=bad, nonce=b"", cookie=b"")
        with pytest.raises(IncompatiblePeer):
            await c.open_session(forged, timeout_s=5)
        await c.close()
        ctx.term()
    run(go())
    assert server.stats.refused_handshakes == 2 and server.stats.handshakes == 0


def test_a_refused_prefill_is_remembered_by_name_until_its_rank_is_accepted_and_the_record_is_bounded(server):
    bad = msgspec.structs.replace(COMPAT, dtype="torch.float16/auto")
    peer = RawPeer(server, b"prefill-0/0/a")
    try:
        assert isinstance(peer.open(bad), P.Error)
        assert "dtype" in (server.refusal("prefill-0") or "") and server.refusal("prefill-1") is None
        assert isinstance(peer.open(COMPAT), P.HandshakeReply)  # the same rank, now compatible
        assert server.refusal("prefill-0") is None
        # Peers name themselves: a flood of refused names keeps the newest _MAX_REFUSED only.
        assert isinstance(peer.open(bad, peer="first"), P.Error)
        for k in range(server_module._MAX_REFUSED):
            assert isinstance(peer.open(bad, peer=f"other-{k}"), P.Error)
        assert server.refusal("first") is None and server.refusal(f"other-{server_module._MAX_REFUSED - 1}")
        assert server.stats.refused_handshakes == server_module._MAX_REFUSED + 2
    finally:
        peer.close()


def test_requests_before_handshake_change_nothing(server):
    async def go():
        ctx, c = await client_for(server)
        with pytest.raises(PeerLost, match="no session"):  # the client does not even send them
            await req(c, alloc(c, "t1", 1))
        await c.close()
        ctx.term()
    run(go())
    peer = RawPeer(server)  # one that does: a session frame without a session is dropped unanswered
    peer.send(P.Allocate(msg_id=1, transfer_id="t1", num_pages=1, num_tokens=1, prompt_digest="d", wait_s=1),
              session=auth.DirectionKeys(b"k" * 32, b"k" * 32))
    assert peer.recv(0.5) is None
    peer.close()
    assert server.stats.unauthenticated == 1
    assert server.pool.free_pages == 8 and server.pool.lookup("t1") is None


def test_too_large_is_refused_at_once_and_leaves_a_tombstone(server):
    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted) as e:
            await req(c, alloc(c, "big", 9, wait_s=5))
        assert e.value.too_large and time.monotonic() - t0 < 1
        await c.close()
        ctx.term()
    run(go())
    assert server.pool.lookup("big").state == ReservationState.ABORTED


def test_queued_allocation_is_served_fifo_when_pages_return(server):
    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        await req(c, alloc(c, "a", 6))
        waiting_big = asyncio.ensure_future(req(c, alloc(c, "big", 5, wait_s=3)))
        await asyncio.sleep(0.1)
        small = asyncio.ensure_future(req(c, alloc(c, "small", 1, wait_s=3)))  # fits, but must not overtake
        await asyncio.sleep(0.2)
        assert not waiting_big.done() and not small.done()
        await req(c, P.Cancel(msg_id=c.next_id(), transfer_id="a", reason="done"))
        big, sm = await asyncio.gather(waiting_big, small)
        assert len(big.pages) == 5 and len(sm.pages) == 1 and not set(big.pages) & set(sm.pages)
        await c.close()
        ctx.term()
    run(go())
    assert server.stats.queued_allocations == 2


def test_pages_returned_by_the_decodes_thread_wake_the_server_for_a_queued_allocation(server, monkeypatch):
    """With nothing received the loop waits up to ``_IDLE_S`` for its housekeeping; pages that
    another thread returns (the decode's loader freeing a consumed hand-off) wake it, so a
    queued Allocate is served then, not at the next tick, and ``close`` is as prompt. The tick
    is stretched to 30 s here: only the wake-up can serve it in time."""
    monkeypatch.setattr(server_module, "_IDLE_S", 30.0)

    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        await req(c, alloc(c, "a", 8))
        await req(c, P.TransferDone(msg_id=c.next_id(), transfer_id="a", num_bytes=8, seconds=0.1))
        server.pool.claim("a")  # the decode's loader scatters it ...
        waiting = asyncio.ensure_future(req(c, alloc(c, "b", 4, wait_s=20)))
        await asyncio.sleep(0.3)  # (queued, and the loop back in its now long wait)
        assert not waiting.done() and server.stats.queued_allocations == 1
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, lambda: server.pool.free("a", now=time.time()))
        got = await waiting  # ... and returns its pages from its own thread
        assert isinstance(got, P.Allocated) and len(got.pages) == 4
        assert time.monotonic() - t0 < 5, "served only at the next tick"
        await c.close()
        ctx.term()
    run(go())
    t0 = time.monotonic()
    server.close()
    assert time.monotonic() - t0 < 5 and not server._thread.is_alive()


def test_an_idle_server_sleeps_until_something_is_due(server):
    """A linked peer and nothing in flight: the loop has nothing to do until the peer's silence
    (timeouts.peer_s) or the next message, and it sleeps (it turned every 100 ms before, a
    decode's core burning 12-23 ms a request on CPU). Its tombstone and ended session cost no
    turns either."""
    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        await req(c, alloc(c, "a", 2))
        await req(c, P.Cancel(msg_id=c.next_id(), transfer_id="a", reason="done"))  # (a tombstone now)
        before = wakeups(server._thread)
        await asyncio.sleep(2.0)
        woke = wakeups(server._thread) - before
        assert woke <= 4, f"the idle control loop woke {woke} times in 2 s"
        await c.close()
        ctx.term()
    run(go())


def test_a_lease_runs_out_on_time_with_nothing_received():
    """Sleeping until the next thing due must not make a lease late: with nothing received, the
    loop wakes when the earliest lease ends (at most _EXPIRE_EVERY_S later), not after _IDLE_S."""
    srv = ControlServer(PagePool(8, lease_s=0.3), bind="tcp://127.0.0.1:0", compat=COMPAT, incarnation="dec-1",
                        page_bytes=65536, descriptor=b"pool-descriptor", max_alloc_wait_s=5.0, keys=KEYS)
    srv.start()
    try:
        async def go():
            ctx, c = await client_for(srv)
            await handshake(c)
            await req(c, alloc(c, "a", 2))
            t0 = time.monotonic()
            while srv.pool.lookup("a").state == ReservationState.ALLOCATED and time.monotonic() - t0 < 3:
                await asyncio.sleep(0.01)
            assert srv.pool.lookup("a").state == ReservationState.EXPIRED
            assert time.monotonic() - t0 < 0.3 + 0.25, f"expired {time.monotonic() - t0:.2f} s after its grant"
            await c.close()
            ctx.term()
        run(go())
    finally:
        srv.close()


def test_queued_allocation_times_out_with_a_named_field(server):
    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        await req(c, alloc(c, "a", 8))
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted, match="timeouts.alloc_s") as e:
            await req(c, alloc(c, "b", 2, wait_s=0.3))
        assert not e.value.too_large and 0.25 < time.monotonic() - t0 < 2
        await c.close()
        ctx.term()
    run(go())
    assert server.stats.alloc_timeouts == 1 and server.pool.lookup("b").state == ReservationState.ABORTED


def test_peers_cannot_touch_each_others_transfers(server):
    async def go():
        ctx, a = await client_for(server, "prefill-0/0/a")
        _, b = await client_for(server, "prefill-1/0/b")
        await handshake(a)
        await handshake(b)
        await req(a, alloc_chains(a, "mine", 2))  # the decode cache is asked (and holds nothing)
        with pytest.raises(TransferError):
            await req(b, P.Cancel(msg_id=b.next_id(), transfer_id="mine", reason="evil"))
        assert server.admission.prefix.asked == ["mine"] and server.admission.prefix.released == []  # b ends no hold of a's
        with pytest.raises(TransferError):
            await req(b, P.TransferDone(msg_id=b.next_id(), transfer_id="mine", num_bytes=1, seconds=0))
        rejected = server.stats.rejected
        assert await b.post(P.Landed(msg_id=b.next_id(), transfer_id="mine", pages=2))  # one-way: no reply
        await req(b, P.Heartbeat(msg_id=b.next_id(), transfer_ids=[]))  # the Landed was handled before this
        assert server.stats.rejected == rejected + 1 and server.pool.lookup("mine").landed == 0
        await req(b, P.Heartbeat(msg_id=b.next_id(), transfer_ids=["mine"]))  # renews nothing of b's
        await a.close()
        await b.close()
        ctx.term()
    run(go())
    assert server.pool.lookup("mine").state == ReservationState.ALLOCATED


def test_garbled_frames_are_counted_dropped_and_change_nothing(server):
    peer = RawPeer(server)
    good = P.seal(P.Hello(msg_id=1, peer="p", incarnation="i", nonce=b"n" * 16), KEYS.control.to_decode,
                  key_class=P.KEY_DEPLOYMENT, seq=0)
    garbage = [
        [b"just one frame"],
        [P.HEADER, b"\xc1\xc1"],                     # two frames: a peer of version 3
        [b"\x00" * 6, b"x", b"y"],
        [good[0], good[1][:-1], good[2]],             # the body cut short: its tag fails
        [good[0], good[1], good[2][:-1] + b"\x00"],   # a wrong tag
    ]
    for frames in garbage:
        peer.send_raw(frames)
    assert peer.recv(0.5) is None  # nothing is answered
    peer.close()
    assert server.stats.malformed == 3 and server.stats.unauthenticated == 2
    assert server.pool.free_pages == 8 and server.sessions == 0


def test_request_to_a_silent_peer_times_out_naming_the_field():
    async def go():
        ctx = zmq.Context()
        c = ControlClient(ctx, endpoint="tcp://127.0.0.1:9", identity="p/0/x", peer="decode-9", keys=KEYS)
        c.start()
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="timeouts.handshake_s") as e:
            await handshake(c, timeout_s=0.3)
        assert 0.25 < time.monotonic() - t0 < 2 and e.value.config_field == "timeouts.handshake_s"
        await c.close()
        ctx.term()
    run(go())


def test_an_authentic_frame_of_another_version_gets_a_version_error(server):
    import struct
    peer = RawPeer(server)
    other = struct.pack("!4sH", P.MAGIC, 99)
    head = struct.pack("!BQ", P.KEY_DEPLOYMENT, 0)
    body = b"anything"
    peer.send_raw([other, body, head + auth.tag(KEYS.control.to_decode, other, head, body)])
    reply = peer.recv()
    assert isinstance(reply, P.Error) and reply.code == P.ErrorCode.VERSION and "99" in reply.message
    wrong_key = auth.tag(auth.Keyring(None).control.to_decode, other, head, body)
    peer.send_raw([other, body, head + wrong_key])  # not authentic: not answered
    assert peer.recv(0.5) is None
    peer.close()


class Holder:
    """Stands in for the decode worker's cache (tests/unit/test_decode_reuse.py has the real
    one): says it holds ``skip`` leading pages and records what it was asked and released."""

    def __init__(self, skip: int | Exception):
        self.skip = skip
        self.asked: list[str] = []
        self.released: list[str] = []

    def hold(self, msg: P.Allocate) -> int:
        self.asked.append(msg.transfer_id)
        if isinstance(self.skip, Exception):
            raise self.skip
        return self.skip

    def release(self, transfer_id: str) -> None:
        self.released.append(transfer_id)


def holder_server(holder: Holder, pages: int = 8) -> ControlServer:
    srv = ControlServer(PagePool(pages, lease_s=30), bind="tcp://127.0.0.1:0", compat=COMPAT, incarnation="dec-1",
                        page_bytes=65536, descriptor=b"d", max_alloc_wait_s=5.0, keys=KEYS, prefix=holder)
    srv.start()
    return srv


def alloc_chains(c: ControlClient, tid: str, n: int, wait_s: float = 1.0, chains: int = 4) -> P.Allocate:
    return P.Allocate(msg_id=c.next_id(), transfer_id=tid, num_pages=n, num_tokens=n * 128, prompt_digest="d",
                      wait_s=wait_s, chains=[bytes([i]) * 32 for i in range(chains)])


def with_client(srv: ControlServer, body, identity: str = "prefill-0/0/x"):
    async def go():
        ctx, c = await client_for(srv, identity)
        await handshake(c)
        try:
            return await body(c)
        finally:
            await c.close()
            ctx.term()
    try:
        return run(go())
    finally:
        srv.close()


def test_allocated_skips_what_the_decode_cache_holds():
    holder = Holder(4)
    srv = holder_server(holder)

    async def body(c):
        got = await req(c, alloc_chains(c, "t1", 6))
        assert isinstance(got, P.Allocated) and got.skip_pages == 4 and len(got.pages) == 2
        assert srv.pool.lookup("t1").skip_pages == 4 and srv.pool.free_pages == 6
        plain = await req(c, alloc_chains(c, "t2", 2, chains=0))  # no chains: the cache is not asked
        assert plain.skip_pages == 0 and len(plain.pages) == 2
        for tid in ("t1", "t2"):
            await req(c, P.Cancel(msg_id=c.next_id(), transfer_id=tid, reason="done"))
        # A prompt larger than the pool fits once the decode holds enough of it.
        big = await req(c, alloc_chains(c, "t3", 10))
        assert big.skip_pages == 4 and len(big.pages) == 6
    with_client(srv, body)
    assert holder.asked == ["t1", "t3"] and holder.released == ["t1", "t2"]


@pytest.mark.parametrize("skip", [6, -1, RuntimeError("tier broke")])
def test_a_holder_answer_out_of_range_or_failing_sends_everything(skip):
    srv = holder_server(Holder(skip))

    async def body(c):
        got = await req(c, alloc_chains(c, "t1", 6))
        assert got.skip_pages == 0 and len(got.pages) == 6
    with_client(srv, body)


def test_refused_queued_or_cancelled_allocations_end_their_holds():
    holder = Holder(2)
    srv = holder_server(holder)

    async def body(c):
        with pytest.raises(PoolExhausted):  # 12 - 2 > 8 pages
            await req(c, alloc_chains(c, "big", 12))
        await req(c, alloc_chains(c, "a", 8))  # 6 pages taken
        with pytest.raises(PoolExhausted, match="timeouts.alloc_s"):
            await req(c, alloc_chains(c, "late", 6, wait_s=0.2))  # needs 4, 2 free
        with pytest.raises(TransferError):  # a known transfer id: refused, the first hold kept
            await req(c, alloc_chains(c, "a", 4))
        await req(c, P.Cancel(msg_id=c.next_id(), transfer_id="a", reason="x"))
    with_client(srv, body)
    assert holder.asked == ["big", "a", "late"]
    assert holder.released == ["big", "late", "a"]


# --- bounded by a peer that holds the secret -------------------------------

def test_an_oversized_allocate_for_another_peers_id_leaves_that_reservation_alone(server):
    async def go():
        ctx, a = await client_for(server, "prefill-0/0/a")
        _, b = await client_for(server, "prefill-1/0/b")
        await handshake(a)
        await handshake(b)
        await req(a, alloc(a, "mine", 2))
        with pytest.raises(TransferError, match="already known"):  # not "too large": that would tombstone it
            await req(b, alloc(b, "mine", 99))
        await a.close()
        await b.close()
        ctx.term()
    run(go())
    r = server.pool.lookup("mine")
    assert r.state == ReservationState.ALLOCATED and r.owner == "prefill-0/0/a"


def test_a_nan_wait_is_no_wait_at_all(server):
    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        await req(c, alloc(c, "fill", 8))  # the pool is full now: the next one queues
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted):
            await req(c, alloc(c, "nan", 1, wait_s=float("nan")), timeout_s=3)
        assert time.monotonic() - t0 < 1.0
        await c.close()
        ctx.term()
    run(go())


def test_overlong_ids_are_refused_unread_and_counted(server):
    peer = RawPeer(server)
    assert isinstance(peer.open(), P.HandshakeReply)
    malformed = server.stats.malformed
    peer.send(P.Cancel(msg_id=3, transfer_id="x" * 100_000, reason="a 100 kB tombstone"))
    peer.send(P.Heartbeat(msg_id=4, transfer_ids=[]))
    assert isinstance(peer.recv(), P.Ack)  # handled after the Cancel, which was dropped
    assert server.stats.malformed == malformed + 1 and server.pool.lookup("x" * 100_000) is None
    peer.close()


def test_cancels_of_unknown_ids_keep_a_bounded_number_of_tombstones():
    pool = PagePool(4, lease_s=30)
    reserve_one = pool.reserve(Handoff("live", "p", 1, "d"), 1, owner="p", now=0)
    assert reserve_one == [0]
    pool.abort("live", reason="ended", now=0)
    for i in range(5 * pool.max_tombstones):
        pool.abort(f"unknown-{i}", reason="never was", now=1)
    assert len(pool._ended) <= pool.max_tombstones
    assert pool.lookup(f"unknown-{5 * pool.max_tombstones - 1}") is not None  # the newest stay
