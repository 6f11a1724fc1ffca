"""Prefill-side control client: one zmq DEALER per decode peer, on an asyncio loop (L4).

Requests carry a message id; a reader task routes each reply to the waiting future, so many
hand-offs to one peer are in flight at once (no per-peer lock, no head-of-line blocking).
Every ``request`` has a deadline; its timeout error names the config field that sets it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import zmq
import zmq.asyncio

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

    def __init__(self, ctx: zmq.asyncio.Context, *, endpoint: str, identity: str, peer: str):
        self.endpoint = endpoint
        self.identity = identity
        self.peer = peer
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[P.Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.malformed = 0

    def start(self) -> None:
        self._sock.connect(self.endpoint)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"pd-control-read-{self.peer}")

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, msg: P.Message, *, timeout_s: float, config_field: str, what: str,
                      transfer_id: str | None = None) -> P.Message:
        """Send ``msg`` and await its reply; Error replies are raised as exceptions."""
        fut: asyncio.Future[P.Message] = asyncio.get_running_loop().create_future()
        self._pending[msg.msg_id] = fut
        try:
            await self._sock.send_multipart(P.encode(msg))
            reply = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise TransferTimeout(f"{what} to {self.peer}", config_field=config_field, seconds=timeout_s,
                                  transfer_id=transfer_id, peer=self.peer) from None
        finally:
            self._pending.pop(msg.msg_id, None)
        if isinstance(reply, P.Error):
            raise _error_from(reply, self.peer, transfer_id)
        return reply

    async def post(self, msg: P.Message) -> bool:
        """Send a one-way message (Landed) if zmq can queue it now; no reply comes. Best effort:
        False when the socket cannot take it (peer gone, queue full); never waits."""
        try:
            await self._sock.send_multipart(P.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                msg = P.decode(frames)
            except ProtocolError as e:
                self.malformed += 1
                log.warning("control: malformed reply from %s dropped: %s", self.peer, e)
                continue
            fut = self._pending.get(msg.msg_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif isinstance(msg, P.Error) and msg.msg_id == 0:
                log.warning("control: %s says: %s", self.peer, msg.message)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerLost("control client closed", peer=self.peer))
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
