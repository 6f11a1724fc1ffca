"""TCP-specific behaviour: deadlines against a peer that stops answering, stale peers, bad hellos,
the authenticated hello (another secret, a replayed hello, an impostor receiver)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgspec
import numpy as np
import pytest
import torch

from lmcache_pd import auth
from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost, TransferError
from lmcache_pd.layout import coalesce
from lmcache_pd.transport._tcp_wire import _CHALLENGE, _HELLO, _HELLO_REPLY, _Descriptor, _hello_tag
from tests.integration.relay import pump
from tests.threads_os import wakeups
from tests.transport.handles import wait

PUBLIC = auth.Keyring(None)  # what transports created without keys use


def raw_hello(conn: socket.socket, d: _Descriptor, keys: auth.Keyring = PUBLIC) -> bytes:
    """Say hello by hand, as a sender does; returns the receiver's reply."""
    _, theirs = _CHALLENGE.unpack(recv_n(conn, _CHALLENGE.size))
    ours = auth.nonce()
    conn.sendall(_HELLO.pack(b"LPDH", d.token, d.region, ours, 0, bytes(16),
                             _hello_tag(keys.tcp, theirs, d.token, d.region, ours)))
    return recv_n(conn, _HELLO_REPLY.size)


def recv_n(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        assert chunk, "the peer closed the connection"
        out += chunk
    return out


def answer_hello(conn: socket.socket, keys: auth.Keyring = PUBLIC) -> None:
    """Play a receiver's part of the hello (accepting any token)."""
    ours = auth.nonce()
    conn.sendall(_CHALLENGE.pack(b"LPDC", ours))
    _, _, _, theirs, _, _, _ = _HELLO.unpack(recv_n(conn, _HELLO.size))
    conn.sendall(_HELLO_REPLY.pack(b"LPDR", 0, auth.tag(keys.tcp, b"reply", theirs, ours, b"\x00")))


def blackhole(reply_hello: bool) -> tuple[socket.socket, threading.Event]:
    """A server that accepts, (optionally) says hello back, then never acks anything."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        conns = []
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conns.append(c)
            if reply_hello:
                answer_hello(c)
        for c in conns:
            c.close()

    threading.Thread(target=run, daemon=True).start()
    return srv, stop


def test_a_peer_that_never_acks_times_out_within_the_deadline():
    srv, stop = blackhole(reply_hello=True)
    tx = transports.create("tcp", {"streams": 1})
    sid = tx.register(torch.zeros(1 << 16, dtype=torch.uint8))
    desc = msgspec.msgpack.encode(_Descriptor("127.0.0.1", srv.getsockname()[1], b"x" * 16, 1, 1 << 16))
    peer = tx.connect(desc, timeout_s=2)
    t0 = time.monotonic()
    h = tx.submit(peer, sid, coalesce(np.array([0]), np.array([0]), np.array([1024])), timeout_s=0.5)
    assert wait(tx, h, 5) == BatchState.TIMEOUT
    assert 0.4 < time.monotonic() - t0 < 2
    h.close()
    tx.close()
    stop.set()
    srv.close()


def test_hello_with_a_stale_token_is_refused():
    rx = transports.create("tcp", {}, host="127.0.0.1", port=0)
    region = rx.register(torch.zeros(1024, dtype=torch.uint8))
    rx.listen()
    good = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    stale = msgspec.msgpack.encode(msgspec.structs.replace(good, token=b"\x00" * 16))
    tx = transports.create("tcp", {})
    tx.register(torch.zeros(16, dtype=torch.uint8))
    with pytest.raises(PeerLost, match="restarted, is not this pool"):
        tx.connect(stale, timeout_s=2)
    assert rx.stats.refused == 1
    tx.close()
    rx.close()


def test_a_sender_with_another_secret_is_refused_and_writes_nothing():
    rx, dst, region = listening(1 << 16, io_timeout_s=2, keys=auth.Keyring(b"the decode side's secret........"))
    tx = transports.create("tcp", {}, keys=auth.Keyring(b"another secret, not the deploy's"))
    tx.register(torch.ones(16, dtype=torch.uint8))
    with pytest.raises(PeerLost, match="auth secret"):
        tx.connect(rx.export_descriptor(region), timeout_s=2)
    assert rx.stats.refused == 1 and not dst.any()
    tx.close()
    rx.close()


def test_a_recorded_hello_opens_no_connection():
    """A hello answers one challenge: replayed on a new connection (a fresh challenge) it fails."""
    rx, dst, region = listening(1 << 16, io_timeout_s=2)
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    first = socket.create_connection((d.host, d.port))
    recv_n(first, _CHALLENGE.size)
    ours = auth.nonce()
    # What an eavesdropper saw on the first connection, answering that connection's challenge:
    c1 = socket.create_connection((d.host, d.port))
    _, theirs = _CHALLENGE.unpack(recv_n(c1, _CHALLENGE.size))
    recorded = _HELLO.pack(b"LPDH", d.token, d.region, ours, 0, bytes(16),
                           _hello_tag(PUBLIC.tcp, theirs, d.token, d.region, ours))
    c1.close()
    first.sendall(recorded)  # ... replayed on another connection, whose challenge differs
    magic, status, _ = _HELLO_REPLY.unpack(recv_n(first, _HELLO_REPLY.size))
    assert (magic, status) == (b"LPDR", 2) and rx.stats.refused == 1
    first.close()
    rx.close()


def test_a_receiver_without_the_secret_is_not_trusted():
    """The reply's tag proves the receiver holds the secret: an impostor that accepts every hello
    (and would receive the KV) is refused by the sender."""
    srv = socket.create_server(("127.0.0.1", 0))

    def impostor() -> None:
        c, _ = srv.accept()
        answer_hello(c, auth.Keyring(b"the impostor does not know it..."))
        time.sleep(0.5)
        c.close()

    threading.Thread(target=impostor, daemon=True).start()
    tx = transports.create("tcp", {}, keys=auth.Keyring(b"the deployment's secret........."))
    tx.register(torch.zeros(16, dtype=torch.uint8))
    desc = msgspec.msgpack.encode(_Descriptor("127.0.0.1", srv.getsockname()[1], b"x" * 16, 1, 16))
    with pytest.raises(PeerLost, match="without our auth secret"):
        tx.connect(desc, timeout_s=2)
    tx.close()
    srv.close()


def test_silent_peer_connect_times_out():
    srv, stop = blackhole(reply_hello=False)
    tx = transports.create("tcp", {})
    tx.register(torch.zeros(16, dtype=torch.uint8))
    desc = msgspec.msgpack.encode(_Descriptor("127.0.0.1", srv.getsockname()[1], b"x" * 16, 1, 16))
    t0 = time.monotonic()
    with pytest.raises(PeerLost):
        tx.connect(desc, timeout_s=0.5)
    assert time.monotonic() - t0 < 3
    tx.close()
    stop.set()
    srv.close()


def listening(nbytes: int, io_timeout_s: float, keys: auth.Keyring | None = None):
    """A tcp receiver with a zeroed pool of ``nbytes``: (transport, pool, region)."""
    rx = transports.create("tcp", {"io_timeout_s": io_timeout_s}, host="127.0.0.1", port=0, keys=keys)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    region = rx.register(dst)
    rx.listen()
    return rx, dst, region


def sender_to(rx, region: int, src: torch.Tensor):
    """A tcp sender with ``src`` registered, connected to ``rx``'s region: (transport, region, peer)."""
    tx = transports.create("tcp", {})
    sid = tx.register(src)
    return tx, sid, tx.connect(rx.export_descriptor(region), timeout_s=2)


def test_receiver_survives_a_sender_dying_mid_batch():
    rx, dst, region = listening(1 << 20, io_timeout_s=0.5)
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    raw = socket.create_connection((d.host, d.port))
    assert raw_hello(raw, d)[:5] == struct.pack("!4sB", b"LPDR", 0)
    table = np.zeros((8, 2), dtype="<i8")  # every batch carries at least 8 rows (empty ones pad it)
    table[0] = (0, 1 << 20)
    raw.sendall(struct.pack("!4sQQH", b"LPDB", 1, 8, 0) + table.tobytes() + b"\x01" * 100)
    raw.close()  # dies with the batch half sent
    deadline = time.monotonic() + 5
    while rx._conns:  # the receiver took in what came of it and dropped the connection (else, on a
        assert time.monotonic() < deadline  # busy machine, its 100 bytes could land after the batch below)
        time.sleep(0.01)
    tx, sid, peer = sender_to(rx, region, torch.full((1 << 20,), 7, dtype=torch.uint8))
    h = tx.submit(peer, sid, coalesce(np.array([0]), np.array([0]), np.array([1 << 20])), timeout_s=5)
    assert wait(tx, h) == BatchState.DONE, h.error
    assert torch.all(dst == 7)
    tx.close()
    rx.close()


def test_an_idle_connection_outlives_the_io_timeout():
    # The receiver waits for the next batch with the kernel's io_timeout_s; idling past it must
    # not end the connection (only a stall inside a batch does).
    rx, dst, region = listening(1 << 16, io_timeout_s=0.2)
    src = torch.arange(1 << 16, dtype=torch.int64).to(torch.uint8)
    tx, sid, peer = sender_to(rx, region, src)
    plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 15]))
    assert wait(tx, tx.submit(peer, sid, plan, timeout_s=5)) == BatchState.DONE
    sock = tx._peers[peer].streams[0].sock
    time.sleep(0.7)  # several receive timeouts on the decode side
    plan = coalesce(np.array([1 << 15]), np.array([1 << 15]), np.array([1 << 15]))
    h = tx.submit(peer, sid, plan, timeout_s=5)
    assert wait(tx, h) == BatchState.DONE, h.error
    assert tx._peers[peer].streams[0].sock is sock, "the connection was dropped and re-opened"
    assert torch.equal(dst, src)
    tx.close()
    rx.close()


def tampering_relay(target: tuple[str, int], flip_at: int) -> socket.socket:
    """Forwards one connection both ways and flips one byte of the sender's stream at ``flip_at``
    (counted from the first byte the sender sends): an on-path attacker."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        c, _ = srv.accept()
        up = socket.create_connection(target)
        threading.Thread(target=pump, args=(c, up, flip_at), daemon=True).start()
        threading.Thread(target=pump, args=(up, c, None), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return srv


SECRET = auth.Keyring(b"the encrypted data plane's secret")


def test_encrypted_batches_tampered_on_the_wire_never_reach_the_pool():
    rx = transports.create("tcp", {"io_timeout_s": 2}, host="127.0.0.1", port=0, keys=SECRET, encrypt=True)
    dst = torch.full((1 << 20,), 0xEE, dtype=torch.uint8)
    region = rx.register(dst)
    rx.listen()
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    hello = _HELLO.size  # the sender's first bytes; then the batch header (20) and the table record
    relay = tampering_relay((d.host, d.port), flip_at=hello + 20 + 8 * 16 + 16 + 1000)  # inside the payload
    tx = transports.create("tcp", {}, keys=SECRET, encrypt=True)
    sid = tx.register(torch.full((1 << 20,), 7, dtype=torch.uint8))
    peer = tx.connect(msgspec.msgpack.encode(msgspec.structs.replace(d, port=relay.getsockname()[1])), 2)
    h = tx.submit(peer, sid, coalesce(np.array([0]), np.array([0]), np.array([1 << 17])), timeout_s=3)
    assert wait(tx, h) in (BatchState.FAILED, BatchState.TIMEOUT)
    assert (dst[:1 << 16] == 0xEE).all(), "the tampered piece was written into the pool"  # not even in part
    tx.close()
    rx.close()
    relay.close()


def test_one_encrypting_side_and_one_clear_side_are_refused_naming_the_field():
    rx = transports.create("tcp", {}, host="127.0.0.1", port=0, keys=SECRET, encrypt=True)
    region = rx.register(torch.zeros(1024, dtype=torch.uint8))
    rx.listen()
    tx = transports.create("tcp", {}, keys=SECRET)
    tx.register(torch.zeros(16, dtype=torch.uint8))
    with pytest.raises(PeerLost, match="auth.encrypt"):
        tx.connect(rx.export_descriptor(region), timeout_s=2)
    tx.close()
    rx.close()


def test_a_transport_that_cannot_encrypt_refuses_to():
    from lmcache_pd.errors import TransportUnavailable

    ok, why = transports.available("nixl")
    if not ok:
        pytest.skip(f"nixl unavailable here: {why}")
    with pytest.raises(TransportUnavailable, match="auth.encrypt"):
        transports.create("nixl", {}, encrypt=True)


class Gate:
    """The receiver's write admission as the pool would answer (session b"s" * 16 owns ticket b"ok")."""

    def __init__(self) -> None:
        self.writing = 0
        self.admitted = 0
        self.landed: list[bool] = []

    def admit(self, session: bytes, ticket: bytes, dst: list[int], lengths: list[int]):
        if session != b"s" * 16:
            raise TransferError("its connection names no live control session")
        if ticket != b"ok":
            raise TransferError("not a live reservation of this session")
        self.writing += 1
        self.admitted += 1

        def done(landed: bool) -> None:
            self.writing -= 1
            self.landed.append(landed)
        return done


def test_every_batch_is_admitted_by_the_gate_and_a_refused_one_writes_nothing():
    gate = Gate()
    rx = transports.create("tcp", {"io_timeout_s": 2}, host="127.0.0.1", port=0)
    dst = torch.full((1 << 20,), 0xEE, dtype=torch.uint8)
    region = rx.register(dst)
    rx.listen(gate)
    src = torch.full((1 << 20,), 7, dtype=torch.uint8)
    tx = transports.create("tcp", {})
    sid = tx.register(src)
    peer = tx.connect(rx.export_descriptor(region), timeout_s=2, session=b"s" * 16)
    plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 16]))
    assert wait(tx, tx.submit(peer, sid, plan, timeout_s=3, ticket=b"ok")) == BatchState.DONE
    assert (dst[:1 << 16] == 7).all() and gate.admitted == 1 and gate.writing == 0  # its write ended
    assert gate.landed == [True]  # every byte of it landed: the receiver may read it now
    # A batch of a hand-off that is not (or no longer) the session's: refused before a byte lands.
    later = coalesce(np.array([0]), np.array([1 << 16]), np.array([1 << 16]))
    h = tx.submit(peer, sid, later, timeout_s=3, ticket=b"stale")
    assert wait(tx, h) == BatchState.FAILED and "refused the batch" in h.error
    assert rx.stats.refused_batches == 1 and (dst[1 << 16:] == 0xEE).all()
    # A stranger's connection (another session's token, the deployment's secret) is counted too.
    other = transports.create("tcp", {})
    osid = other.register(src)
    opeer = other.connect(rx.export_descriptor(region), timeout_s=2, session=b"x" * 16)
    h = other.submit(opeer, osid, later, timeout_s=3, ticket=b"ok")
    assert wait(other, h) == BatchState.FAILED
    assert rx.stats.refused_batches == 2 and (dst[1 << 16:] == 0xEE).all() and gate.admitted == 1
    other.close()
    tx.close()
    rx.close()


def test_a_range_table_that_wraps_int64_is_refused():
    rx, d, raw = bare_connection(2.0)
    assert raw_hello(raw, d)[:5] == struct.pack("!4sB", b"LPDR", 0)
    table = np.zeros((8, 2), dtype="<i8")
    table[0] = (1 << 62, 1 << 62)  # the sum wraps negative in int64: a check in int64 lets it pass
    raw.sendall(struct.pack("!4sQQH", b"LPDB", 1, 8, 0) + table.tobytes())
    magic, batch, status = struct.unpack("!4sQB", recv_n(raw, 13))
    assert (magic, batch, status) == (b"LPDA", 1, 1) and rx.stats.refused_batches == 1
    raw.close()
    rx.close()


def bare_connection(io_timeout_s: float) -> tuple[object, _Descriptor, socket.socket]:
    """A tcp receiver (64 KiB pool) and a bare connection to it: (receiver, descriptor, socket)."""
    rx, _dst, region = listening(1 << 16, io_timeout_s=io_timeout_s)
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    return rx, d, socket.create_connection((d.host, d.port))


def test_a_hello_dribbled_byte_by_byte_is_cut_at_io_timeout_s():
    rx, _d, c = bare_connection(1.0)
    recv_n(c, _CHALLENGE.size)
    t0 = time.monotonic()
    closed = None
    for _ in range(_HELLO.size):  # one byte every 0.2 s: each alone is well within io_timeout_s
        try:
            c.sendall(b"L")
        except OSError:
            closed = time.monotonic() - t0
            break
        time.sleep(0.2)
        c.settimeout(0.001)
        try:
            if c.recv(1) == b"":
                closed = time.monotonic() - t0
                break
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            closed = time.monotonic() - t0
            break
    assert closed is not None and closed < 2.0, f"the receiver held the dribbling hello for {closed} s"
    c.close()
    rx.close()


def test_connections_beyond_the_bound_are_refused_and_counted_and_service_goes_on():
    rx = transports.create("tcp", {"io_timeout_s": 5, "max_connections": 3}, host="127.0.0.1", port=0)
    dst = torch.zeros(1 << 16, dtype=torch.uint8)
    region = rx.register(dst)
    rx.listen()
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    idle = [socket.create_connection((d.host, d.port)) for _ in range(5)]  # strangers saying nothing
    time.sleep(0.3)
    assert rx.stats.refused == 2
    closed = 0
    for c in idle:
        c.settimeout(0.5)
        try:
            data = c.recv(64)
        except TimeoutError:
            continue
        closed += data == b""
    assert closed == 2  # the two beyond the bound, at once; the three others got their challenge
    for c in idle:
        c.close()
    time.sleep(0.3)  # their threads end with their connections
    tx, sid, peer = sender_to(rx, region, torch.full((1 << 16,), 5, dtype=torch.uint8))
    plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 16]))
    assert wait(tx, tx.submit(peer, sid, plan, timeout_s=5)) == BatchState.DONE
    assert (dst == 5).all()
    tx.close()
    rx.close()


def test_the_accept_loop_survives_a_thread_that_cannot_start(monkeypatch):
    """``can't start new thread`` (the process is at its limit) refuses that one connection; the
    receiver keeps accepting. (The limit itself is not reachable safely here: the failure is
    scripted into the receiver's thread spawner.)"""
    rx, dst, region = listening(1 << 16, io_timeout_s=2)
    spawn = rx._spawn
    failed: list[str] = []

    def at_the_limit(target, name, *args):
        if name.startswith("pd-tcp-recv") and not failed:
            failed.append(name)
            raise RuntimeError("can't start new thread")
        return spawn(target, name, *args)

    monkeypatch.setattr(rx, "_spawn", at_the_limit)
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    with socket.create_connection((d.host, d.port), timeout=2) as c:
        assert c.recv(64) == b""  # closed at once, no challenge
    assert failed and rx.stats.refused == 1
    tx, sid, peer = sender_to(rx, region, torch.full((1 << 16,), 9, dtype=torch.uint8))
    plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 16]))
    assert wait(tx, tx.submit(peer, sid, plan, timeout_s=5)) == BatchState.DONE and (dst == 9).all()
    tx.close()
    rx.close()


def test_idle_threads_sleep_and_close_still_ends_them():
    """Between hand-offs the sender's stream threads and the receiver's accept thread have
    nothing to do, and sleep (they polled every 0.2 s before: wake-ups the prefill's core paid
    for); close() still ends each of them at once."""
    rx, dst, region = listening(1 << 16, io_timeout_s=10)
    tx, sid, peer = sender_to(rx, region, torch.full((1 << 16,), 5, dtype=torch.uint8))
    plan = coalesce(np.array([0]), np.array([0]), np.array([1 << 16]))
    assert wait(tx, tx.submit(peer, sid, plan, timeout_s=5)) == BatchState.DONE and (dst == 5).all()
    idle = [s.thread for s in tx._peers[peer].streams] + [th for th in rx._threads if th.name == "pd-tcp-accept"]
    assert len(idle) == 2, [th.name for th in idle]
    before = {th.name: wakeups(th) for th in idle}
    time.sleep(1.5)
    woke = {th.name: wakeups(th) - before[th.name] for th in idle}
    assert all(n <= 1 for n in woke.values()), f"idle threads woke (times in 1.5 s): {woke}"
    t0 = time.monotonic()
    tx.close()
    rx.close()
    for th in idle:
        th.join(3)
    assert not any(th.is_alive() for th in idle) and time.monotonic() - t0 < 3
