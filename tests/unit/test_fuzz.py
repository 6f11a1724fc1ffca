"""Fuzzing the control plane's decoder and handlers (hypothesis): random and mutated frames.

The server's frame handler (``ControlServer._on_frames``) and the client's reply handler
(``ControlClient.on_frames``) get 11,000 generated frames (6,000 + 3,000 + 1,000 + 1,000):
  - random frame lists, with and without our header;
  - mutations of authentic frames (bit flips, cuts, insertions, swapped or dropped frames, other
    sequence numbers, other keys) of every message type, inside a live session with reservations;
  - authentic frames with random bodies (a peer that holds the secret but sends garbage).
Asserted: nothing raises and no handler crashes; a frame that does not verify changes no
state at all (sessions, sequence numbers, cookies, pool pages, reservations, queue) and gets
no reply; the pool's pages always add up.
"""

from __future__ import annotations

import copy
import struct

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.client import ControlClient
from lmcache_pd.control.server import ControlServer
from tests.unit.kv import COMPAT

KEYS = auth.Keyring(b"the fuzzed deployment's secret..")
IDENTITY = b"prefill-0/0/fuzz"
_FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def fuzz(examples: int) -> settings:
    """Derandomized: CI runs the same frames each time (a failure reproduces)."""
    return settings(_FUZZ, max_examples=examples)


class Recorder:
    """Stands in for the ROUTER socket: keeps what the server sends."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames, flags=0) -> None:
        self.sent.append(frames)


class Harness:
    """A server (never started: frames go straight to its handler) with one live session,
    a written reservation, a finished one and a queued allocation."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.srv = ControlServer(PagePool(8, lease_s=30), bind="tcp://127.0.0.1:0", compat=COMPAT,
                                 incarnation="dec-1", page_bytes=65536, descriptor=b"d", max_alloc_wait_s=60,
                                 keys=KEYS, clock=lambda: self.now)
        self.sock = Recorder()
        self.seq = 0
        nonce = b"n" * 16
        self.feed(P.seal(P.Hello(msg_id=1, peer="prefill-0", incarnation="i", nonce=nonce), KEYS.control.to_decode,
                         key_class=P.KEY_DEPLOYMENT, seq=0))
        cookie = P.decode_unverified(self.sock.sent[-1][1:]).cookie
        self.handshake = P.seal(P.Handshake(msg_id=2, peer="prefill-0", incarnation="i", compat_hash=COMPAT.digest(),
                                            compat=COMPAT, nonce=nonce, cookie=cookie),
                                KEYS.control.to_decode, key_class=P.KEY_DEPLOYMENT, seq=0)
        self.feed(self.handshake)
        self.keys = KEYS.session(IDENTITY, nonce, cookie)
        for tid, n in (("writing", 3), ("finished", 2), ("queued", 5)):
            self.send(P.Allocate(msg_id=3, transfer_id=tid, num_pages=n, num_tokens=n * 128, prompt_digest="d",
                                 wait_s=60))
        self.send(P.TransferDone(msg_id=4, transfer_id="finished", num_bytes=1, seconds=0))
        assert self.srv.sessions == 1 and len(self.srv.admission.waiting) == 1 and self.srv.pool.free_pages == 3

    def feed(self, frames: list[bytes], identity: bytes = IDENTITY) -> None:
        self.srv._on_frames(self.sock, [identity, *frames])

    def seal(self, msg: P.Message, seq: int | None = None) -> list[bytes]:
        return P.seal(msg, self.keys.to_decode, key_class=P.KEY_SESSION, seq=self.seq + 1 if seq is None else seq)

    def send(self, msg: P.Message) -> None:
        self.seq += 1
        self.feed(self.seal(msg, self.seq))

    def state(self):
        srv, pool = self.srv, self.srv.pool
        with pool._lock:
            live = sorted((r.transfer_id, r.state, r.landed, r.lease_deadline, tuple(r.pages), r.owner)
                          for r in pool._live.values())
            ended = sorted(pool._ended)
            free = sorted(pool._free)
        sessions = {k: (s.recv_seq, s.send_seq, s.last_seen) for k, s in srv._sessions.items()}
        return (live, ended, free, sessions, [w.msg.transfer_id for w in srv.admission.waiting],
                sorted(srv.admission.parked), dict(srv.cookies._used), srv.stats.handshakes, srv.stats.allocations,
                len(self.sock.sent))

    def dropped(self) -> int:
        """Frames the server dropped, by every cause it counts."""
        st = self.srv.stats
        return st.malformed + st.unauthenticated + st.stale + st.rejected

    def check_invariants(self) -> None:
        pool = self.srv.pool
        with pool._lock:
            held = [p for r in pool._live.values() for p in r.pages]
            assert len(held) == len(set(held)) and not set(held) & set(pool._free)
            assert len(held) + len(pool._free) == pool.num_pages
        assert self.srv.stats.crashes == 0


@pytest.fixture(scope="module")
def harness() -> Harness:
    return Harness()


def _messages(h: Harness) -> list[P.Message]:
    return [
        P.Allocate(msg_id=7, transfer_id="new", num_pages=2, num_tokens=256, prompt_digest="d", wait_s=1),
        P.TransferDone(msg_id=7, transfer_id="writing", num_bytes=1, seconds=0),
        P.Landed(msg_id=7, transfer_id="writing", pages=2),
        P.Landed(msg_id=7, transfer_id="writing", layers=[0, 1]),
        P.Cancel(msg_id=7, transfer_id="writing", reason="x"),
        P.Cancel(msg_id=7, transfer_id="queued", reason="x"),
        P.Heartbeat(msg_id=7, transfer_ids=["writing", "finished"]),
        P.Hello(msg_id=7, peer="p", incarnation="j", nonce=b"m" * 16),
    ]


def _mutate(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    frames = [bytearray(f) for f in frames]
    op = data.draw(st.sampled_from(["flip", "cut", "insert", "replace", "drop", "dup", "swap", "seq", "rekey"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    f = frames[i]
    if op == "flip" and f:
        pos = data.draw(st.integers(0, len(f) - 1))
        f[pos] ^= data.draw(st.integers(1, 255))
    elif op == "cut" and f:
        del f[data.draw(st.integers(0, len(f) - 1)):]
    elif op == "insert":
        pos = data.draw(st.integers(0, len(f)))
        f[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    elif op == "replace":
        frames[i] = bytearray(data.draw(st.binary(max_size=64)))
    elif op == "drop":
        del frames[i]
    elif op == "dup":
        frames.insert(i, bytearray(f))
    elif op == "swap" and len(frames) > 1:
        j = (i + 1) % len(frames)
        frames[i], frames[j] = frames[j], frames[i]
    elif op == "seq" and len(frames) == 3 and len(frames[2]) == P.AUTH_BYTES:
        struct.pack_into("!Q", frames[2], 1, data.draw(st.integers(0, 2**64 - 1)))
    elif op == "rekey" and len(frames) == 3:  # a tag made with a key that is not this session's
        key = data.draw(st.sampled_from([auth.Keyring(None).control.to_decode, KEYS.control.to_prefill,
                                         b"\x00" * 32]))
        head = bytes(frames[2][:9])
        frames[2] = bytearray(head + auth.tag(key, bytes(frames[0]), head, bytes(frames[1])))
    return [bytes(x) for x in frames]


@fuzz(6000)
@given(data=st.data())
def test_mutated_frames_change_no_state(harness, data):
    h = harness
    kind = data.draw(st.sampled_from(["session", "handshake", "replay"]))
    if kind == "session":
        base = h.seal(data.draw(st.sampled_from(_messages(h))))
    elif kind == "handshake":
        base = h.handshake  # its cookie is spent: even intact it must change nothing
    else:
        base = h.seal(P.Heartbeat(msg_id=9, transfer_ids=["writing"]), seq=data.draw(st.integers(0, h.seq)))
    frames = _mutate(base, data) if kind == "session" else base
    if frames == base and kind == "session":
        return  # a mutation that changed nothing leaves an authentic frame
    identity = data.draw(st.sampled_from([IDENTITY, b"prefill-1/0/other", b"", b"\xff" * 300]))
    before, dropped = h.state(), h.dropped()
    h.feed(frames, identity)
    assert h.state() == before, (kind, frames)
    assert h.dropped() == dropped + 1, (kind, frames)  # seen and counted, not only ignored
    h.check_invariants()


@fuzz(3000)
@given(frames=st.one_of(
    st.lists(st.binary(max_size=120), max_size=5),
    st.tuples(st.just(P.HEADER), st.binary(max_size=200), st.binary(min_size=P.AUTH_BYTES, max_size=P.AUTH_BYTES))
    .map(list),
    st.tuples(st.just(P.HEADER), st.binary(max_size=200),
              st.tuples(st.sampled_from([b"\x00", b"\x01"]), st.binary(min_size=8 + 32, max_size=8 + 32))
              .map(lambda t: t[0] + t[1])).map(list),
))
def test_random_frames_change_no_state(harness, frames):
    before, dropped = harness.state(), harness.dropped()
    harness.feed(frames)
    assert harness.state() == before
    assert harness.dropped() == dropped + 1, frames  # seen and counted, not only ignored
    harness.check_invariants()


_FIELDS = st.dictionaries(st.sampled_from(["type", "msg_id", "transfer_id", "num_pages", "num_tokens", "pages",
                                           "prompt_digest", "wait_s", "transfer_ids", "chains", "reason",
                                           "num_bytes", "seconds", "tenant", "x"]),
                          st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=20), st.floats(),
                                    st.lists(st.integers(-5, 20), max_size=10), st.binary(max_size=40), st.none(),
                                    st.sampled_from(["Allocate", "TransferDone", "Landed", "Cancel", "Heartbeat",
                                                     "Hello", "Handshake", "Ack", "Allocated"])),
                          max_size=10)


@fuzz(1000)
@given(body=st.one_of(st.binary(max_size=200), _FIELDS.map(msgspec.msgpack.encode)))
def test_authentic_garbage_never_crashes_a_handler(body):
    """A peer holding the secret may send anything: it is refused or handled, never a crash.
    (Each example gets a harness of its own: valid messages may change state.)"""
    h = Harness()
    head = struct.pack("!BQ", P.KEY_SESSION, h.seq + 1)
    h.feed([P.HEADER, body, head + auth.tag(h.keys.to_decode, P.HEADER, head, body)])
    h.check_invariants()


@pytest.fixture(scope="module")
def client():
    ctx = zmq.Context()
    c = ControlClient(ctx, endpoint="tcp://127.0.0.1:9", identity=IDENTITY.decode(), peer="decode-0", keys=KEYS)
    c._session = KEYS.session(IDENTITY, b"n" * 16, b"c" * 16)
    yield c
    c._sock.close(linger=0)
    c._monitor.close(linger=0)
    ctx.term()


@fuzz(1000)
@given(data=st.data())
def test_the_client_drops_every_reply_that_does_not_verify(client, data):
    keys = client._session
    seq = client._recv_seq + 1
    msg = data.draw(st.sampled_from([P.Allocated(msg_id=1, transfer_id="t", pages=[1], lease_s=1),
                                     P.Ack(msg_id=1, incarnation="d"),
                                     P.Error(msg_id=1, code=P.ErrorCode.BAD_STATE, message="x")]))
    base = P.seal(msg, keys.to_prefill, key_class=P.KEY_SESSION, seq=seq)
    frames = data.draw(st.one_of(st.just(None), st.lists(st.binary(max_size=80), max_size=4)))
    frames = _mutate(base, data) if frames is None else frames
    if frames == base:
        return
    before = (client._recv_seq, client.malformed)
    assert client.on_frames(copy.copy(frames)) is None
    assert client._recv_seq == before[0] and client.malformed == before[1] + 1
