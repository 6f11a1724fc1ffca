"""Prefill-side control client: one zmq DEALER per decode peer, on an asyncio loop (L4).

Life of a client:
  1. ``start()`` connects (zmq retries until the peer listens) and watches the socket and its
     connection (zmq's socket monitor) with the loop's own reader callbacks;
  2. ``open_session`` runs Hello -> Challenge -> Handshake -> HandshakeReply: from then on every
     frame is tagged with the session's keys and a sequence number (auth.py, protocol.py);
  3. ``request`` / ``post`` as often as needed: requests carry a message id, and the reader
     routes each reply to its waiting future, so many hand-offs to one peer are in flight at
     once (no per-peer lock, no head-of-line blocking);
  4. ``close()``.
Every ``request`` has a deadline; its timeout error names the config field that sets it.
The sockets are plain (blocking-API) zmq sockets used without blocking: a send that zmq can
queue goes at once, and a reply is read by a callback on the socket's file descriptor, which
drains every queued frame (zmq's descriptor only signals a change). A round trip turns the
loop twice, where zmq.asyncio's futures took three; on the CPU machine a heartbeat's round trip
took 0.45 ms instead of 0.53, and 0.27 ms of the client thread's CPU instead of 0.34
(docs/benchmarks.md): every turn of the loop is a wake-up on the prefill's core.
A reply that is garbled, unauthenticated or replayed is dropped and counted. When the
connection drops (the decode process died or restarted), every waiting request fails at once
with PeerLost and ``lost`` is set: the sender then opens a new session instead of waiting for
deadlines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd.errors import (
    IncompatiblePeer,
    PeerLost,
    PoolExhausted,
    ProtocolError,
    TransferError,
    TransferTimeout,
)

log = logging.getLogger(__name__)


class ControlClient:
    """Talks to one decode peer. Create, ``start()`` and use on one asyncio loop."""

    def __init__(self, ctx: zmq.Context, *, endpoint: str, identity: str, peer: str,
                 keys: auth.Keyring | None = None, curve_server_key: bytes | None = None):
        """``curve_server_key``: the decode side's CurveZMQ public key (z85), to encrypt the
        control plane (``auth.encrypt``); None sends in the clear (still authenticated)."""
        self.endpoint = endpoint
        self.identity = identity
        self.peer = peer
        self.keys = keys if keys is not None else auth.Keyring(None)
        if isinstance(ctx, zmq.asyncio.Context):  # (its sockets answer with futures: not these)
            raise TypeError("ControlClient drives plain zmq sockets from its loop: give it a zmq.Context")
        self._sock: zmq.Socket = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_BODY_BYTES + 4096)
        if curve_server_key is not None:
            public, secret = zmq.curve_keypair()
            self._sock.curve_serverkey = curve_server_key
            self._sock.curve_publickey = public
            self._sock.curve_secretkey = secret
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[P.Message]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: auth.DirectionKeys | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self.malformed = 0
        """Replies dropped: garbled, unauthenticated, replayed or of an unexpected kind."""
        self.last_refusal = ""
        """Why the last dropped reply was dropped (named in timeout errors: a peer of another
        release, or with another secret, looks silent otherwise)."""
        self.lost: str | None = None
        self.on_ended: Callable[[P.Ended], None] | None = None
        """Called (on the loop) when the decode side says it ended a hand-off we write."""

    def start(self) -> None:
        self._sock.connect(self.endpoint)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.FD, self._read)
        self._loop.add_reader(self._monitor.FD, self._watch)
        # zmq signals a descriptor only once a read found its socket empty: read both once now.
        self._read()
        self._watch()

    def next_id(self) -> int:
        return next(self._ids)

    async def open_session(self, handshake: P.Handshake, *, timeout_s: float) -> P.HandshakeReply:
        """Hello, then the Handshake (``nonce`` and ``cookie`` are filled in here); both round
        trips share the ``timeouts.handshake_s`` deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        hello = P.Hello(msg_id=self.next_id(), peer=handshake.peer, incarnation=handshake.incarnation,
                        nonce=auth.nonce())
        challenge = await self.request(hello, timeout_s=timeout_s, config_field="timeouts.handshake_s",
                                       what="handshake (hello)")
        if not isinstance(challenge, P.Challenge) or challenge.nonce != hello.nonce:
            raise TransferError(f"{self.peer} answered the hello with {type(challenge).__name__}", peer=self.peer)
        self._session = self.keys.session(self.identity.encode(), hello.nonce, challenge.cookie)
        self._send_seq = self._recv_seq = 0
        msg = P.Handshake(msg_id=self.next_id(), peer=handshake.peer, incarnation=handshake.incarnation,
                          compat_hash=handshake.compat_hash, compat=handshake.compat,
                          nonce=hello.nonce, cookie=challenge.cookie)
        reply = await self.request(msg, timeout_s=max(0.001, deadline - loop.time()),
                                   config_field="timeouts.handshake_s", what="handshake")
        if not isinstance(reply, P.HandshakeReply):
            raise TransferError(f"{self.peer} answered the handshake with {type(reply).__name__}", peer=self.peer)
        return reply

    def _seal(self, msg: P.Message) -> list[bytes]:
        if isinstance(msg, (P.Hello, P.Handshake)):
            return P.seal(msg, self.keys.control.to_decode, key_class=P.KEY_DEPLOYMENT, seq=0)
        if self._session is None:
            raise PeerLost(f"no session with {self.peer} yet", peer=self.peer)
        self._send_seq += 1
        return P.seal(msg, self._session.to_decode, key_class=P.KEY_SESSION, seq=self._send_seq)

    async def request(self, msg: P.Message, *, timeout_s: float, config_field: str, what: str,
                      transfer_id: str | None = None) -> P.Message:
        """Send ``msg`` and await its reply; Error replies are raised as exceptions."""
        if self.lost is not None:
            raise PeerLost(f"{what} to {self.peer}: {self.lost}", transfer_id=transfer_id, peer=self.peer)
        fut: asyncio.Future[P.Message] = asyncio.get_running_loop().create_future()
        self._pending[msg.msg_id] = fut
        try:
            # The send is inside the deadline too: a DEALER with no live connection (a peer whose
            # Curve handshake failed, one not reachable yet) blocks in send_multipart.
            async with asyncio.timeout(timeout_s):
                await self._send(self._seal(msg))
                reply = await fut
        except TimeoutError:
            why = f" (its last reply was dropped: {self.last_refusal})" if self.last_refusal else ""
            raise TransferTimeout(f"{what} to {self.peer}{why}", config_field=config_field, seconds=timeout_s,
                                  transfer_id=transfer_id, peer=self.peer) from None
        finally:
            self._pending.pop(msg.msg_id, None)
        if isinstance(reply, P.Error):
            raise _error_from(reply, self.peer, transfer_id)
        return reply

    async def post(self, msg: P.Message) -> bool:
        """Send a one-way message (Landed) if zmq can queue it now; no reply comes. Best effort:
        False when the socket cannot take it (peer gone, queue full); never waits."""
        if self.lost is not None or self._session is None:
            return False
        try:
            self._sock.send_multipart(self._seal(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self._read()
        return True

    async def _send(self, frames: list[bytes]) -> None:
        """Queue ``frames`` in zmq; while it cannot take them (no live connection yet, or a full
        queue) try again every millisecond: the caller's deadline bounds the wait."""
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
                break
            except zmq.Again:
                await asyncio.sleep(0.001)
        # A send lets zmq take in what arrived meanwhile without signalling the descriptor
        # again: look now, or a reply already queued would wait for the next one.
        self._read()

    def _refuse(self, why: str) -> None:
        self.malformed += 1
        if why != self.last_refusal:
            log.warning("control: dropped a reply from %s: %s", self.peer, why)
        self.last_refusal = why

    def on_frames(self, frames: list[bytes]) -> P.Message | None:
        """Authenticate and decode one reply; None (counted) if it must be dropped."""
        try:
            frame = P.split(frames)
        except ProtocolError as e:
            self._refuse(f"not an lmcache-pd reply of protocol version {P.PROTOCOL_VERSION}: {e}")
            return None
        why = P.refusal(frame, deployment_key=self.keys.control.to_prefill,
                        session_key=self._session.to_prefill if self._session is not None else None,
                        last_seq=self._recv_seq)
        if why is not None:
            self._refuse("a replayed reply" if why == "stale"
                         else "its tag does not verify: the decode instance has another auth secret")
            return None
        if frame.key_class == P.KEY_SESSION:
            self._recv_seq = frame.seq
        try:
            return P.decode_body(frame, P.TO_PREFILL)
        except ProtocolError as e:
            self._refuse(str(e))
            return None

    def _read(self) -> None:
        """The loop's callback on the socket's descriptor (and after each send): every reply
        queued now, each routed to its waiting request."""
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # (zmq.Again: none left; else the socket is closed)
                return
            msg = self.on_frames(frames)
            if msg is None:
                continue
            if isinstance(msg, P.Ended):  # one-way, never a reply
                if self.on_ended is not None:
                    self.on_ended(msg)
                continue
            fut = self._pending.get(msg.msg_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif isinstance(msg, P.Error) and msg.msg_id == 0:
                log.warning("control: %s says: %s", self.peer, msg.message)

    def _watch(self) -> None:
        """The connection dropped: the peer died or restarted (its sessions are gone with it)."""
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self._session is not None:
                self._lose("the connection to the decode instance dropped")

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.warning("control: %s: %s", self.peer, why)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerLost(f"{self.peer}: {why}", peer=self.peer))

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.FD)
            self._loop.remove_reader(self._monitor.FD)
            self._loop = None
        self._lose("control client closed")
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)


def _error_from(reply: P.Error, peer: str, transfer_id: str | None) -> Exception:
    if reply.code == P.ErrorCode.INCOMPATIBLE:
        return IncompatiblePeer(f"{peer} refused the handshake: {reply.message}", tuple(reply.fields))
    if reply.code in (P.ErrorCode.NOT_HANDSHAKEN, P.ErrorCode.STALE_INCARNATION):
        return PeerLost(reply.message, transfer_id=transfer_id, peer=peer)
    if reply.code == P.ErrorCode.VERSION:
        return ProtocolError(f"{peer}: {reply.message}")
    if reply.code == P.ErrorCode.POOL_TOO_SMALL:
        return PoolExhausted(reply.message, too_large=True, transfer_id=transfer_id, peer=peer)
    if reply.code == P.ErrorCode.POOL_TIMEOUT:
        return PoolExhausted(reply.message, transfer_id=transfer_id, peer=peer)
    return TransferError(f"{peer} refused: {reply.message} ({reply.code.name})", transfer_id=transfer_id, peer=peer)
