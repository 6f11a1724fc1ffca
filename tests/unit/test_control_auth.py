"""Authentication, replay protection and liveness of the control plane, over real zmq sockets.

Each test shows one rule of docs/security.md: a frame that does not verify (wrong secret, no
session, garbled), or that verified once already (replayed), changes no state; a session of one
peer is useless to another; silent or restarted peers lose the reservations they were writing.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd._types import ReservationState
from lmcache_pd.control import curve
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.client import ControlClient
from lmcache_pd.control.server import ControlServer
from lmcache_pd.control.session import Session
from lmcache_pd.errors import PeerLost, PoolExhausted, TransferTimeout
from tests.unit.control_peers import KEYS, RawPeer, alloc, client_for, handshake, handshake_msg, req, run
from tests.unit.kv import COMPAT


def make_server(pages: int = 8, **kwargs) -> ControlServer:
    kwargs.setdefault("keys", KEYS)
    srv = ControlServer(PagePool(pages, lease_s=30), bind="tcp://127.0.0.1:0", compat=COMPAT, incarnation="dec-1",
                        page_bytes=65536, descriptor=b"pool-descriptor", max_alloc_wait_s=5.0, **kwargs)
    srv.start()
    return srv


@pytest.fixture
def server():
    srv = make_server()
    yield srv
    srv.close()


def allocate(tid: str, n: int = 2, msg_id: int = 3) -> P.Allocate:
    return P.Allocate(msg_id=msg_id, transfer_id=tid, num_pages=n, num_tokens=n * 128, prompt_digest="d", wait_s=1)


def test_a_peer_with_another_secret_is_not_answered_and_changes_nothing(server):
    async def go():
        ctx, c = await client_for(server, keys=auth.Keyring(b"not the deployment's secret....."))
        with pytest.raises(TransferTimeout, match="timeouts.handshake_s"):
            await handshake(c, timeout_s=0.5)
        await c.close()
        ctx.term()
    run(go())
    assert server.stats.unauthenticated == 1 and server.stats.handshakes == 0 and server.sessions == 0
    # No secret at all is another secret too.
    peer = RawPeer(server, keys=auth.Keyring(None))
    peer.send(P.Hello(msg_id=1, peer="p", incarnation="i", nonce=auth.nonce()))
    assert peer.recv(0.5) is None
    peer.close()


def test_replayed_hello_handshake_and_session_frames_change_nothing(server):
    peer = RawPeer(server)
    assert isinstance(peer.open(), P.HandshakeReply)
    hello, handshake_frames = peer.sent
    peer.send(allocate("t1"))
    assert isinstance(peer.recv(), P.Allocated)
    allocate_frames = peer.sent[-1]
    stats = (server.stats.handshakes, server.pool.free_pages)

    peer.send_raw(allocate_frames)  # the same Allocate again: its sequence number is spent
    peer.send_raw(handshake_frames)  # the same Handshake again: its cookie is spent
    assert peer.recv(0.5) is None
    assert server.stats.stale == 2 and (server.stats.handshakes, server.pool.free_pages) == stats
    peer.send_raw(hello)  # a Hello is answered (it keeps no state), but its cookie opens nothing new
    assert isinstance(peer.recv(), P.Challenge)
    # The session still works, and its next sequence number is accepted.
    peer.send(P.Heartbeat(msg_id=9, transfer_ids=["t1"]))
    assert isinstance(peer.recv(), P.Ack)
    peer.close()
    assert server.pool.lookup("t1").state == ReservationState.ALLOCATED


def test_a_session_belongs_to_one_identity(server):
    a = RawPeer(server, b"prefill-0/0/aaaa")
    a.open()
    b = RawPeer(server, b"prefill-1/0/bbbb")
    b.send_raw(P.seal(allocate("evil"), a.session.to_decode, key_class=P.KEY_SESSION, seq=5))  # a's key, b's socket
    assert b.recv(0.5) is None and server.stats.unauthenticated == 1 and server.pool.lookup("evil") is None
    # Nor can b present a's cookie as its own: the cookie is bound to a's identity and nonce.
    hs = P.decode_unverified(a.sent[1])
    b.send(hs)
    assert b.recv(0.5) is None and server.stats.stale == 1
    a.close()
    b.close()


def test_a_reply_that_does_not_verify_is_dropped_by_the_client(server):
    async def go():
        ctx, c = await client_for(server)
        await handshake(c)
        forged = P.seal(P.Allocated(msg_id=99, transfer_id="x", pages=[1], lease_s=1), b"k" * 32,
                        key_class=P.KEY_SESSION, seq=1000)
        assert c.on_frames(forged) is None and c.malformed == 1
        replayed = P.seal(P.Ack(msg_id=99, incarnation="dec-1"), c._session.to_prefill, key_class=P.KEY_SESSION,
                          seq=1)  # a sequence number the client has already seen (the HandshakeReply's)
        assert c.on_frames(replayed) is None and c.malformed == 2
        await c.close()
        ctx.term()
    run(go())


def test_a_silent_peer_loses_what_it_was_writing_but_not_what_it_finished():
    srv = make_server(peer_s=0.6)
    try:
        peer = RawPeer(srv)
        peer.open()
        for i, tid in enumerate(("writing", "finished")):
            peer.send(allocate(tid, msg_id=10 + i))
            assert isinstance(peer.recv(), P.Allocated)
        peer.send(P.TransferDone(msg_id=12, transfer_id="finished", num_bytes=1, seconds=0.0))
        assert isinstance(peer.recv(), P.Ack)
        time.sleep(1.0)  # no heartbeat
        assert srv.sessions == 0 and srv.stats.peers_lost == 1
        assert srv.pool.lookup("writing").state == ReservationState.ABORTED
        assert "timeouts.peer_s" in srv.pool.lookup("writing").reason
        assert srv.pool.lookup("finished").state == ReservationState.READY  # its decode request may still come
        peer.send(P.Heartbeat(msg_id=13, transfer_ids=[]))  # too late: the session is gone
        assert peer.recv(0.5) is None
        peer.close()
    finally:
        srv.close()


def test_heartbeats_keep_a_quiet_peer_alive():
    srv = make_server(peer_s=0.6)
    try:
        peer = RawPeer(srv)
        peer.open()
        peer.send(allocate("t1"))
        peer.recv()
        for i in range(6):
            time.sleep(0.2)
            peer.send(P.Heartbeat(msg_id=20 + i, transfer_ids=["t1"]))
            assert isinstance(peer.recv(), P.Ack)
        assert srv.sessions == 1 and srv.pool.lookup("t1").state == ReservationState.ALLOCATED
        peer.close()
    finally:
        srv.close()


def test_a_restarted_prefill_worker_ends_its_predecessors_session(server):
    old = RawPeer(server, b"prefill-0/0/old")
    old.open(incarnation="old")
    old.send(allocate("t1"))
    assert isinstance(old.recv(), P.Allocated)
    other = RawPeer(server, b"prefill-1/0/x")  # another instance: untouched
    other.open(peer="prefill-1", incarnation="x")
    other.send(allocate("t2"))
    other.recv()
    new = RawPeer(server, b"prefill-0/0/new")
    assert isinstance(new.open(incarnation="new"), P.HandshakeReply)
    assert server.sessions == 2 and server.stats.peers_lost == 1
    assert server.pool.lookup("t1").state == ReservationState.ABORTED and "restarted" in server.pool.lookup("t1").reason
    assert server.pool.lookup("t2").state == ReservationState.ALLOCATED
    for p in (old, other, new):
        p.close()


def test_waiting_requests_fail_at_once_when_the_connection_drops():
    srv = make_server(pages=2)

    async def go():
        ctx, c = await client_for(srv)
        await handshake(c)
        await req(c, alloc(c, "a", 2))
        queued = asyncio.ensure_future(req(c, alloc(c, "b", 2, wait_s=4), timeout_s=8))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        srv.close()  # the decode worker dies
        with pytest.raises(PeerLost, match="connection"):
            await queued
        assert time.monotonic() - t0 < 2 and c.lost
        with pytest.raises(PeerLost):  # and the client knows it must open a new session
            await req(c, P.Heartbeat(msg_id=c.next_id(), transfer_ids=[]))
        await c.close()
        ctx.term()
    run(go())


def test_the_allocation_queue_is_bounded():
    srv = make_server(pages=1, max_waiting=2)

    async def go():
        ctx, c = await client_for(srv)
        await handshake(c)
        await req(c, alloc(c, "a", 1))
        waiting = [asyncio.ensure_future(req(c, alloc(c, f"w{i}", 1, wait_s=0.5))) for i in range(2)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted, match="backpressure.decode_queue"):
            await req(c, alloc(c, "over", 1, wait_s=0.5))
        assert time.monotonic() - t0 < 0.3  # refused at once, not after waiting
        for w in waiting:
            with pytest.raises(PoolExhausted, match="timeouts.alloc_s"):
                await w
        await c.close()
        ctx.term()
    try:
        run(go())
    finally:
        srv.close()
    assert srv.stats.queue_full == 1 and srv.pool.lookup("over").state == ReservationState.ABORTED


def test_no_secret_binds_loopback_only():
    srv = ControlServer(PagePool(1, lease_s=1), bind="tcp://0.0.0.0:0", compat=COMPAT, incarnation="d",
                        page_bytes=1, descriptor=b"", max_alloc_wait_s=1)
    with pytest.raises(PermissionError, match="LMCACHE_PD_SECRET"):
        srv.start()
    srv = make_server(keys=auth.Keyring(None))  # 127.0.0.1 without a secret: allowed
    srv.close()


def test_curve_encrypts_the_control_plane_and_refuses_clear_text_peers():
    public, secret = curve.server_keys(KEYS)
    srv = make_server(curve_secret=secret)

    async def go():
        ctx = zmq.Context()
        c = ControlClient(ctx, endpoint=srv.endpoint, identity="p/0/x", peer="decode-0", keys=KEYS,
                          curve_server_key=public)
        c.start()
        assert isinstance(await c.open_session(handshake_msg(), timeout_s=5), P.HandshakeReply)
        assert isinstance(await req(c, alloc(c, "t1", 1)), P.Allocated)
        plain = ControlClient(ctx, endpoint=srv.endpoint, identity="p/0/y", peer="decode-0", keys=KEYS)
        plain.start()
        with pytest.raises(TransferTimeout):
            await plain.open_session(handshake_msg(), timeout_s=0.5)
        wrong = ControlClient(ctx, endpoint=srv.endpoint, identity="p/0/z", peer="decode-0", keys=KEYS,
                              curve_server_key=curve.server_keys(auth.Keyring(b"x" * 32))[0])
        wrong.start()  # pins another server key: the Curve handshake fails, nothing gets through
        with pytest.raises(TransferTimeout):
            await wrong.open_session(handshake_msg(), timeout_s=0.5)
        for x in (c, plain, wrong):
            await x.close()
        ctx.term()
    try:
        run(go())
        # The strangers are counted, not only kept out (zmq reports the failed Curve handshakes).
        deadline = time.monotonic() + 5
        while srv.stats.unauthenticated < 2:
            assert time.monotonic() < deadline, f"strangers counted: {srv.stats.unauthenticated}"
            time.sleep(0.02)
    finally:
        srv.close()
    assert srv.stats.handshakes == 1 and srv.sessions == 1


def test_cookies_expire_and_are_redeemed_once():
    now = [100.0]
    cookies = auth.Cookies(10.0, clock=lambda: now[0])
    c = cookies.issue(b"id", b"n" * 16)
    assert not cookies.redeem(b"other", b"n" * 16, c) and not cookies.redeem(b"id", b"m" * 16, c)
    now[0] += 12  # within the next window: still good, once
    assert cookies.redeem(b"id", b"n" * 16, c) and not cookies.redeem(b"id", b"n" * 16, c)
    late = cookies.issue(b"id", b"n" * 16)
    now[0] += 25
    assert not cookies.redeem(b"id", b"n" * 16, late)
    assert not auth.Cookies(10.0, clock=lambda: now[0]).redeem(b"id", b"n" * 16, cookies.issue(b"id", b"n" * 16))


def test_the_decode_side_does_not_blame_peers_for_its_own_stall():
    now = [100.0]
    srv = ControlServer(PagePool(4, lease_s=30), bind="tcp://127.0.0.1:0", compat=COMPAT, incarnation="d",
                        page_bytes=1, descriptor=b"", max_alloc_wait_s=1, keys=KEYS, peer_s=3.0,
                        clock=lambda: now[0])
    srv._sessions[b"p/0/i"] = Session("prefill-0", 0, "i", KEYS.control, last_seen=now[0])
    def listen(seconds: float) -> None:  # the loop turns every few ms; here every 0.1 s
        for _ in range(round(seconds / 0.1)):
            now[0] += 0.1
            srv._housekeeping(None)  # never sends: nothing waits

    listen(2.0)  # the peer was silent 2 s while we listened ...
    now[0] += 10.0  # ... then this process was stopped for 10 s
    srv._housekeeping(None)
    assert srv.sessions == 1, "our own stall was taken for the peer's silence"
    listen(1.2)  # but silence while we listen counts: 2 + 1.2 s
    assert srv.sessions == 0 and srv.stats.peers_lost == 1
