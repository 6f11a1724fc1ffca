"""Decode-side control server: a zmq ROUTER that answers the prefill side (L4).

One thread (``pd-control-server``) owns the socket. Each loop turn it:
  1. receives at most a batch of messages (poll with a short timeout, so ``close`` is prompt),
  2. answers each (handshake, allocate, transfer done, cancel, heartbeat; Landed is one-way),
  3. expires leases and serves queued allocations (FIFO, all-or-nothing) as pages come back.
Messages from a peer that has not completed a handshake change no state. Malformed frames are
counted and answered with an Error where the sender can be addressed; they never raise.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import zmq

from lmcache_pd import protocol as P
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.errors import PDError, PoolExhausted, ProtocolError, TransferError

log = logging.getLogger(__name__)
_POLL_MS = 20
_EXPIRE_EVERY_S = 0.1
"""Lease expiry scans every reservation and tombstone; leases are seconds long, so once per
100 ms is precise enough and keeps the scan off the per-message path."""


@dataclass
class _Session:
    peer: str
    incarnation: str
    payload: bytes


@dataclass
class _Waiting:
    identity: bytes
    msg: P.Allocate
    owner: str
    deadline: float
    skip: int | None
    """Pages the decode's cache holds; None: it was not asked (nothing to release)."""


class PrefixHolder(Protocol):
    """Decode-side reuse, seen from the control plane (the receiver implements it)."""

    def hold(self, msg: P.Allocate) -> int:
        """How many leading pages of the prompt this instance's own cache holds (whole chunks,
        fewer than ``num_pages``), held for the transfer id. Runs on the server thread, so it
        asks local tiers only."""

    def release(self, transfer_id: str) -> None:
        """The allocation was refused: end the hold now."""


@dataclass
class ServerStats:
    handshakes: int = 0
    refused_handshakes: int = 0
    allocations: int = 0
    queued_allocations: int = 0
    alloc_timeouts: int = 0
    malformed: int = 0
    rejected: int = 0


class ControlServer:
    def __init__(self, pool: PagePool, *, bind: str, compat: P.CompatInfo, incarnation: str,
                 page_bytes: int, descriptor: bytes, max_alloc_wait_s: float,
                 clock: Callable[[], float] = time.monotonic, prefix: PrefixHolder | None = None):
        self.pool = pool
        self.bind = bind
        self.compat = compat
        self.compat_hash = compat.digest()
        self.incarnation = incarnation
        self.page_bytes = page_bytes
        self.descriptor = descriptor
        self.max_alloc_wait_s = max_alloc_wait_s
        self.clock = clock
        self.prefix = prefix
        self.stats = ServerStats()
        self._sessions: dict[bytes, _Session] = {}
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._stop = threading.Event()
        self._next_expiry = 0.0
        self._thread = threading.Thread(target=self._run, name="pd-control-server", daemon=True)
        self._ctx: zmq.Context | None = None
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self.endpoint: str | None = None

    def start(self, timeout_s: float = 5.0) -> None:
        self._thread.start()
        if not self._bound.wait(timeout_s):
            raise TimeoutError(f"control server did not bind {self.bind} within {timeout_s} s")
        if self._bind_error is not None:
            raise self._bind_error

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    # --- loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        self._ctx = zmq.Context()  # our own context: closing it never touches anyone else's sockets
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer with the same id takes over
        try:
            sock.bind(self.bind)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            self._bind_error = OSError(f"control plane cannot bind {self.bind}: {e}")
            self._bound.set()
            sock.close()
            self._ctx.term()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                if sock.poll(_POLL_MS, zmq.POLLIN):
                    for _ in range(64):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(sock, frames)
                self._housekeeping(sock)
        finally:
            sock.close()
            self._ctx.term()

    def _on_frames(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        # ROUTER: [identity, header, body] (DEALER peers send no empty delimiter).
        if len(frames) < 2:
            self.stats.malformed += 1
            return
        identity, rest = frames[0], frames[1:]
        try:
            msg = P.decode(rest)
        except ProtocolError as e:
            self.stats.malformed += 1
            version = P.peek_version(rest[0]) if rest else None
            code = P.ErrorCode.VERSION if version not in (None, P.PROTOCOL_VERSION) else P.ErrorCode.MALFORMED
            log.warning("control: dropped a bad message: %s", e)
            if version is not None:
                self._send(sock, identity, P.Error(msg_id=0, code=code, message=str(e)))
            return
        try:
            reply = self._handle(identity, msg)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the control plane of this instance
            log.exception("control: handler crashed on %s", type(msg).__name__)
            reply = P.Error(msg_id=msg.msg_id, code=P.ErrorCode.INTERNAL, message=f"internal error: {e!r}")
        if reply is not None:
            self._send(sock, identity, reply)

    def _send(self, sock: zmq.Socket, identity: bytes, msg: P.Message) -> None:
        try:
            sock.send_multipart([identity, *P.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: it will time out and recover
            log.debug("control: reply to %r dropped: %s", identity, e)

    # --- handlers -------------------------------------------------------------------------
    def _handle(self, identity: bytes, msg: P.Message) -> P.Message | None:
        if isinstance(msg, P.Handshake):
            return self._handshake(identity, msg)
        session = self._sessions.get(identity)
        if session is None:
            self.stats.rejected += 1
            return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.NOT_HANDSHAKEN,
                           message="no handshake from this peer (or this decode instance restarted)")
        now = self.clock()
        owner = identity.decode(errors="replace")
        try:
            if isinstance(msg, P.Allocate):
                return self._allocate(identity, owner, msg, now)
            if isinstance(msg, P.TransferDone):
                self.pool.mark_ready(msg.transfer_id, owner=owner, num_bytes=msg.num_bytes,
                                     seconds=msg.seconds, now=now)
                return P.Ack(msg_id=msg.msg_id, incarnation=self.incarnation)
            if isinstance(msg, P.Landed):  # one-way: no reply, even to a refusal
                try:
                    self.pool.mark_landed(msg.transfer_id, owner=owner, pages=msg.pages, now=now)
                except TransferError as e:
                    self.stats.rejected += 1
                    log.debug("control: Landed refused: %s", e)
                return None
            if isinstance(msg, P.Cancel):
                dropped = self._drop_waiting(msg.transfer_id, owner)
                r = self.pool.lookup(msg.transfer_id)
                if dropped or (r is not None and r.owner == owner):  # not another peer's Cancel
                    self._release(msg.transfer_id)
                self.pool.abort(msg.transfer_id, reason=f"canceled by prefill: {msg.reason}", now=now, owner=owner)
                return P.Ack(msg_id=msg.msg_id, incarnation=self.incarnation)
            if isinstance(msg, P.Heartbeat):
                self.pool.renew(msg.transfer_ids, owner=owner, now=now)
                return P.Ack(msg_id=msg.msg_id, incarnation=self.incarnation)
        except PoolExhausted as e:
            # Leave a tombstone: the decode request for this hand-off recomputes at once.
            self.pool.abort(msg.transfer_id, reason=str(e), now=now)
            return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.POOL_TOO_SMALL, message=str(e))
        except TransferError as e:
            return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.BAD_STATE, message=str(e))
        self.stats.rejected += 1
        return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.MALFORMED,
                       message=f"{type(msg).__name__} is not a request")

    def _handshake(self, identity: bytes, msg: P.Handshake) -> P.Message:
        if msg.compat_hash != self.compat_hash or msg.compat.digest() != self.compat_hash:
            fields = list(self.compat.differing(msg.compat)) or ["compat_hash"]
            detail = ", ".join(f"{f}: prefill {getattr(msg.compat, f, '?')!r} != decode "
                               f"{getattr(self.compat, f, '?')!r}" for f in fields if f != "compat_hash")
            self.stats.refused_handshakes += 1
            log.warning("control: refused incompatible peer %s: %s", msg.peer, detail or "hash differs")
            return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.INCOMPATIBLE,
                           message=f"incompatible peer: {detail or 'compatibility hash differs'}", fields=fields)
        self._sessions[identity] = _Session(msg.peer, msg.incarnation, msg.payload)
        self.stats.handshakes += 1
        return P.HandshakeReply(msg_id=msg.msg_id, incarnation=self.incarnation, page_bytes=self.page_bytes,
                                num_pages=self.pool.num_pages, payload=self.descriptor)

    def _skip(self, msg: P.Allocate) -> int | None:
        """Leading pages the decode's cache holds (held for the transfer id), or None when it
        was not asked (nothing to release)."""
        if self.prefix is None or not msg.chains or msg.num_pages <= 1 or self.pool.lookup(msg.transfer_id):
            return None  # (a known transfer id is refused below; its hold must stay the first one's)
        try:
            skip = self.prefix.hold(msg)
        except Exception:  # noqa: BLE001 - the cache is an optimisation: without it, send everything
            log.exception("control: cache lookup for %s failed; the whole prompt is sent", msg.transfer_id)
            return 0
        return skip if 0 <= skip < msg.num_pages else 0

    def _reserve(self, msg: P.Allocate, owner: str, skip: int, now: float) -> list[int] | None:
        return self.pool.reserve(msg.transfer_id, msg.num_pages - skip, num_tokens=msg.num_tokens,
                                 prompt_digest=msg.prompt_digest, owner=owner, now=now, skip_pages=skip)

    def _allocated(self, msg: P.Allocate, pages: list[int], skip: int) -> P.Allocated:
        self.stats.allocations += 1
        return P.Allocated(msg_id=msg.msg_id, transfer_id=msg.transfer_id, pages=pages, lease_s=self.pool.lease_s,
                           skip_pages=skip)

    def _release(self, transfer_id: str, asked: bool = True) -> None:
        if self.prefix is not None and asked:
            self.prefix.release(transfer_id)

    def _allocate(self, identity: bytes, owner: str, msg: P.Allocate, now: float) -> P.Message | None:
        asked = self._skip(msg)
        skip = asked or 0
        pages = None
        try:
            if not self._waiting:  # FIFO: nobody may overtake a queued request
                pages = self._reserve(msg, owner, skip, now)
            elif msg.num_pages - skip > self.pool.num_pages:
                self._reserve(msg, owner, skip, now)  # raises too_large
        except PDError:
            self._release(msg.transfer_id, asked is not None)
            raise
        if pages is not None:
            return self._allocated(msg, pages, skip)
        wait = min(max(msg.wait_s, 0.0), self.max_alloc_wait_s)
        self._waiting.append(_Waiting(identity, msg, owner, now + wait, asked))
        self.stats.queued_allocations += 1
        return None  # answered later by _housekeeping

    def _drop_waiting(self, transfer_id: str, owner: str) -> bool:
        n = len(self._waiting)
        self._waiting = collections.deque(w for w in self._waiting
                                          if not (w.msg.transfer_id == transfer_id and w.owner == owner))
        return len(self._waiting) < n

    def _housekeeping(self, sock: zmq.Socket) -> None:
        now = self.clock()
        if now >= self._next_expiry:
            self._next_expiry = now + _EXPIRE_EVERY_S
            for tid in self.pool.expire(now):
                log.warning("control: reclaimed pages of transfer %s (lease expired)", tid)
        while self._waiting:
            w = self._waiting[0]
            if w.deadline <= now:
                self._waiting.popleft()
                self.stats.alloc_timeouts += 1
                self._release(w.msg.transfer_id, w.skip is not None)
                self.pool.abort(w.msg.transfer_id, reason="decode pool stayed full (timeouts.alloc_s)", now=now)
                self._send(sock, w.identity, P.Error(
                    msg_id=w.msg.msg_id, code=P.ErrorCode.POOL_TIMEOUT,
                    message=f"decode pool stayed full for {w.msg.wait_s:g} s (timeouts.alloc_s; or raise pool.size_mib)"))
                continue
            try:
                pages = self._reserve(w.msg, w.owner, w.skip or 0, now)
            except TransferError as e:
                self._waiting.popleft()
                self._release(w.msg.transfer_id, w.skip is not None)
                self._send(sock, w.identity, P.Error(msg_id=w.msg.msg_id, code=P.ErrorCode.BAD_STATE, message=str(e)))
                continue
            if pages is None:
                break
            self._waiting.popleft()
            self._send(sock, w.identity, self._allocated(w.msg, pages, w.skip or 0))
