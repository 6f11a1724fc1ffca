"""Test helpers: control-plane peers, a well-behaved client and one that speaks the protocol by
hand (to send what no client would), and the deployment's test keys."""

from __future__ import annotations

import asyncio

import zmq

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd.control.client import ControlClient
from lmcache_pd.control.server import ControlServer
from tests.unit.kv import COMPAT

KEYS = auth.Keyring(b"the deployment's test secret....")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def client_for(srv: ControlServer, identity: str = "prefill-0/0/x",
                     keys: auth.Keyring = KEYS) -> tuple[zmq.Context, ControlClient]:
    ctx = zmq.Context()
    c = ControlClient(ctx, endpoint=srv.endpoint, identity=identity, peer="decode-0", keys=keys)
    c.start()
    return ctx, c


def handshake_msg(compat: P.CompatInfo = COMPAT, peer: str = "prefill-0", incarnation: str = "pre-1") -> P.Handshake:
    return P.Handshake(msg_id=0, peer=peer, incarnation=incarnation, compat_hash=compat.digest(), compat=compat,
                       nonce=b"", cookie=b"")


async def handshake(c: ControlClient, compat: P.CompatInfo = COMPAT, timeout_s: float = 5.0) -> P.Message:
    return await c.open_session(handshake_msg(compat), timeout_s=timeout_s)


def alloc(c: ControlClient, tid: str, n: int, wait_s: float = 1.0) -> P.Allocate:
    return P.Allocate(msg_id=c.next_id(), transfer_id=tid, num_pages=n, num_tokens=n * 128, prompt_digest="d",
                      wait_s=wait_s)


async def req(c: ControlClient, msg: P.Message, timeout_s: float = 5.0) -> P.Message:
    return await c.request(msg, timeout_s=timeout_s, config_field="timeouts.control_s", what="test")


def raw_dealer(srv: ControlServer, identity: bytes = b"prefill-0/0/raw") -> tuple[zmq.Context, zmq.Socket]:
    """A bare DEALER, for sending frames no well-behaved client would."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, identity)
    s.connect(srv.endpoint)
    return ctx, s


class RawPeer:
    """Speaks the protocol by hand over a bare DEALER, and keeps every frame it sent (to replay)."""

    def __init__(self, srv: ControlServer, identity: bytes = b"prefill-0/0/raw", keys: auth.Keyring = KEYS):
        self.ctx, self.sock = raw_dealer(srv, identity)
        self.identity = identity
        self.keys = keys
        self.session: auth.DirectionKeys | None = None
        self.seq = 0
        self.sent: list[list[bytes]] = []

    def send(self, msg: P.Message, session: auth.DirectionKeys | None = None, seq: int | None = None) -> None:
        session = session or (None if isinstance(msg, (P.Hello, P.Handshake)) else self.session)
        if session is None:
            frames = P.seal(msg, self.keys.control.to_decode, key_class=P.KEY_DEPLOYMENT, seq=0)
        else:
            self.seq = self.seq + 1 if seq is None else seq
            frames = P.seal(msg, session.to_decode, key_class=P.KEY_SESSION, seq=self.seq)
        self.send_raw(frames)

    def send_raw(self, frames: list[bytes]) -> None:
        self.sent.append(frames)
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 2.0) -> P.Message | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return P.decode_unverified(self.sock.recv_multipart())

    def open(self, compat: P.CompatInfo = COMPAT, peer: str = "prefill-0", incarnation: str = "pre-1") -> P.Message:
        nonce = auth.nonce()
        self.send(P.Hello(msg_id=1, peer=peer, incarnation=incarnation, nonce=nonce))
        ch = self.recv()
        assert isinstance(ch, P.Challenge) and ch.nonce == nonce, ch
        self.send(P.Handshake(msg_id=2, peer=peer, incarnation=incarnation, compat_hash=compat.digest(),
                              compat=compat, nonce=nonce, cookie=ch.cookie))
        self.session, self.seq = self.keys.session(self.identity, nonce, ch.cookie), 0
        return self.recv()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
