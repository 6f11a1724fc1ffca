"""Decode-side control server: a zmq ROUTER that answers the prefill side (L4).

One thread (``pd-control-server``) owns the socket. Each loop turn it:
  1. receives at most a batch of messages (it waits until the next thing due, at most
     ``_IDLE_S``; the pool's changes from other threads and ``close`` wake it at once),
  2. authenticates each (its tag under the deployment's control key or its session's key, and a
     sequence number above the last; auth.py) and only then decodes and answers it (hello,
     handshake, allocate, transfer done, cancel, heartbeat; Landed is one-way),
  3. tells owners of the hand-offs this side ended while they wrote them (Ended, one-way),
     expires leases, drops sessions of peers that stayed silent for ``timeouts.peer_s`` (their
     reservations still being written are aborted: the decode side recomputes at once), and
     serves queued allocations (FIFO, all-or-nothing, at most ``max_waiting``) as pages return
     (which Allocate gets pages when: admission.py).
A frame that is garbled, unauthenticated, replayed or not a request changes no state: it is
counted (``ServerStats``) and dropped without a reply, so the socket is no oracle for anyone
without the secret. A Handshake from a restarted prefill worker (same instance and rank, new
incarnation) ends its predecessor's sessions and aborts the reservations it was writing.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

import zmq

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd.control.admission import Admission, Waiting
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.ranks import check_ranks
from lmcache_pd.control.server_stats import NOTHING_HELD, PrefixHolder, ServerStats
from lmcache_pd.control.session import Session
from lmcache_pd.errors import PoolExhausted, ProtocolError, TransferError
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)
_IDLE_S = 1.0
"""The longest a turn waits with nothing received and nothing due. A turn otherwise waits until
the next thing due (a lease or quarantine that ends, a queued Allocate's deadline, a silent
peer's ``timeouts.peer_s``: ``_wait_s``), and what else needs a turn wakes it at once: the pool's
changes (pages returned, a hand-off ended: ``PagePool.watch``) and ``close``. It looked every
100 ms before (20 ms before that), and those idle turns cost the decode's core (on CPU, its only
one) 12-23 ms a request 2 s apart (docs/benchmarks.md)."""
_EXPIRE_EVERY_S = 0.1
"""Lease expiry scans every reservation and tombstone; leases are seconds long, so at most once
per 100 ms is precise enough and keeps the scan off the per-message path."""
_STALL_S = 1.0
"""A turn this much later than its wait asked for: this process itself stalled (_forgive_own_stall)."""
_MAX_REFUSED = 256
"""Prefill ranks whose refused handshake is remembered (ControlServer.refusal)."""
_WARN_EVERY_S = 10.0
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class ControlServer:
    def __init__(self, pool: PagePool, *, bind: str, compat: P.CompatInfo, incarnation: str,
                 page_bytes: int, descriptor: bytes, max_alloc_wait_s: float,
                 keys: auth.Keyring | None = None, peer_s: float = 10.0, max_waiting: int = 1024,
                 curve_secret: bytes | None = None, clock: Callable[[], float] = time.monotonic,
                 prefix: PrefixHolder = NOTHING_HELD, blocks: P.BlocksRegion | None = None,
                 direct: Callable[[str, int], tuple[int, ...]] = lambda transfer_id, num_pages: (),
                 direct_wait_s: float = 0.0):
        """``keys``: from the deployment's secret (None: none configured, loopback only);
        ``peer_s``: silence that ends a session; ``max_waiting``: allocations queued at most;
        ``curve_secret``: this side's CurveZMQ secret key (z85) to encrypt the control plane;
        ``blocks``: the decode's vLLM KV cache as prefills may write into it (transport.direct),
        and ``direct(transfer_id, num_pages)`` the blocks of that hand-off's load for its last
        pages (empty: none known, the pages are written and scattered as usual);
        ``direct_wait_s``: how long an Allocate whose decode request is on its way
        (``Allocate.decode_sent``) may be held for those blocks to be known."""
        self.pool = pool
        self.bind = bind
        self.compat = compat
        self.compat_hash = compat.digest()
        self.incarnation = incarnation
        self.page_bytes = page_bytes
        self.descriptor = descriptor
        self.keys = keys if keys is not None else auth.Keyring(None)
        self.peer_s = peer_s
        self.curve_secret = curve_secret
        self.clock = clock
        self.blocks = blocks
        self.cookies = auth.Cookies(max(peer_s, 1.0), clock=clock)
        self.stats = ServerStats()
        self._sessions: dict[bytes, Session] = {}
        self._refused: dict[tuple[str, int], str] = {}
        """(prefill, rank) -> why its last handshake was refused; gone once one is accepted."""
        self._owners: dict[bytes, str] = {}  # data token -> owner; read by the data plane's threads
        self.admission = Admission(pool, self.stats, session_of=self._sessions.get, prefix=prefix, blocks=blocks,
                                   direct=direct, direct_wait_s=direct_wait_s, max_waiting=max_waiting,
                                   max_alloc_wait_s=max_alloc_wait_s)
        self._stop = threading.Event()
        # A turn's wake-up from other threads: the pool's changes (under its lock: a byte's
        # write, nothing more) and close. Socket objects, not raw fds: a write after close
        # raises instead of landing in whatever reused the number.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        pool.watch(self._wake)
        self._next_expiry = 0.0
        self._last_turn: float | None = None
        self._asked_s = 0.0  # the last turn's wait (_wait_s)
        self._warned: dict[str, float] = {}
        self._thread = thread(self._run, "pd-control-server")
        self._ctx: zmq.Context | None = None
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self.endpoint: str | None = None

    def start(self, timeout_s: float = 5.0) -> None:
        self.keys.refuse_exposure(self.bind.removeprefix("tcp://").rpartition(":")[0].strip("[]"), "control plane")
        self._thread.start()
        if not self._bound.wait(timeout_s):
            raise TimeoutError(f"control server did not bind {self.bind} within {timeout_s} s")
        if self._bind_error is not None:
            raise self._bind_error

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._wake_w.close()
            self._wake_r.close()

    def _wake(self) -> None:
        """Any thread: the loop takes a turn now (a pending wake-up is enough: a full buffer is one).
        Not from the loop itself: its own changes to the pool (an Allocate's pages) come before
        this turn's housekeeping, and a wake-up would only cost an empty turn per message."""
        if threading.current_thread() is self._thread:
            return
        try:
            self._wake_w.send(b"\0")
        except OSError:  # (BlockingIOError: one is pending; closed: the server is gone)
            pass

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def owner_of(self, data_token: bytes) -> str | None:
        """The owner (control identity) of the live session with this data token (any thread)."""
        return self._owners.get(data_token)

    def refusal(self, peer: str) -> str | None:
        """Why the last handshake of a rank of prefill ``peer`` was refused, while no later one of
        that rank was accepted (None: none is refused). The loader ends a load waiting on that
        prefill with it at once: no KV can come from a peer this decode refuses (any thread)."""
        return next((why for (name, _), why in list(self._refused.items()) if name == peer), None)

    # --- loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        self._ctx = zmq.Context()  # our own context: closing it never touches anyone else's sockets
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer with the same id takes over
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_BODY_BYTES + 4096)  # zmq drops larger frames unread
        if self.curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.curve_secret
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
        # A stranger refused by CurveZMQ never reaches a handler: zmq reports it as an event.
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED) if self.curve_secret is not None else None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._asked_s = self._wait_s(self.clock())
                ready = dict(poller.poll(max(0, math.ceil(self._asked_s * 1000))))
                if self._wake_r.fileno() in ready:
                    self._drain_wakes()
                if sock in ready:
                    for _ in range(64):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(sock, frames)
                if monitor is not None and monitor in ready:
                    self._on_monitor(monitor)
                self._housekeeping(sock)
        finally:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close()
            self._ctx.term()

    def _wait_s(self, now: float) -> float:
        """How long the next turn may wait for a message: until the next thing due, at most _IDLE_S
        (held Allocates: 1 ms, they look for their blocks each turn)."""
        if self.admission.parked:
            return 0.001
        silent = min((s.last_seen for s in self._sessions.values()), default=math.inf) + self.peer_s
        # The expiry scan runs at most every _EXPIRE_EVERY_S: what it handles is due no earlier
        # (nor can one it leaves, such as a tombstone kept for a write still held, spin the loop).
        scan = max(min(self.pool.next_due(), silent), self._next_expiry)
        return min(max(0.0, min(scan, self.admission.next_due()) - now), _IDLE_S)

    def _drain_wakes(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = struct.unpack_from("=H", frames[0])[0] if frames and len(frames[0]) >= 2 else 0
            if event & _HANDSHAKE_FAILED:
                self.stats.unauthenticated += 1
                self._warn("curve", "control: refused a connection whose CurveZMQ handshake failed (no Curve, or "
                           "not this deployment's key)")

    def _warn(self, what: str, text: str, *args: object) -> None:
        """A warning per kind at most every 10 s: a flood of bad frames must not flood the log."""
        now = self.clock()
        if now - self._warned.get(what, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[what] = now
            log.warning(text, *args)

    def _on_frames(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        # ROUTER: [identity, header, body, auth] (DEALER peers send no empty delimiter).
        if len(frames) < 2:
            self.stats.malformed += 1
            return
        identity, rest = frames[0], frames[1:]
        try:
            frame = P.split(rest)
        except ProtocolError as e:
            self.stats.malformed += 1
            self._warn("malformed", "control: dropped a frame that is not ours: %s", e)
            return
        session = self._sessions.get(identity) if frame.key_class == P.KEY_SESSION else None
        why = P.refusal(frame, deployment_key=self.keys.control.to_decode,
                        session_key=session.keys.to_decode if session is not None else None,
                        last_seq=session.recv_seq if session is not None else 0)
        if why == "unauthenticated":
            self.stats.unauthenticated += 1
            self._warn(why, "control: dropped an unauthenticated frame from %r (another auth secret, garbled, "
                       "or a session this process never opened)", identity[:64])
            return
        if why == "stale":
            self.stats.stale += 1
            self._warn(why, "control: dropped a replayed frame from %r", identity[:64])
            return
        if session is not None:
            session.recv_seq = frame.seq
            session.last_seen = self.clock()
        try:
            msg = P.decode_body(frame, P.TO_DECODE)
        except ProtocolError as e:
            self.stats.malformed += 1
            self._warn("body", "control: dropped an authentic but unreadable frame from %r: %s", identity[:64], e)
            if frame.version != P.PROTOCOL_VERSION:  # authentic: tell the operator on both ends
                self._send(sock, identity, P.Error(msg_id=0, code=P.ErrorCode.VERSION, message=str(e)), None)
            return
        try:
            reply = self._handle(identity, msg, session)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the control plane of this instance
            self.stats.crashes += 1
            log.exception("control: handler crashed on %s", type(msg).__name__)
            reply = P.Error(msg_id=msg.msg_id, code=P.ErrorCode.INTERNAL, message=f"internal error: {e!r}")
        if reply is not None:
            if isinstance(reply, P.HandshakeReply):  # the first frame of the new session
                session = self._sessions[identity]
            self._send(sock, identity, reply, session)

    def _send(self, sock: zmq.Socket, identity: bytes, msg: P.Message, session: Session | None) -> None:
        """Seal with the session's key, or with the deployment's when there is none (the answers
        to Hello and Handshake)."""
        if session is not None:
            session.send_seq += 1
            frames = P.seal(msg, session.keys.to_prefill, key_class=P.KEY_SESSION, seq=session.send_seq)
        else:
            frames = P.seal(msg, self.keys.control.to_prefill, key_class=P.KEY_DEPLOYMENT, seq=0)
        try:
            sock.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: it will time out and recover
            log.debug("control: reply to %r dropped: %s", identity, e)

    # --- handlers -------------------------------------------------------------------------
    def _handle(self, identity: bytes, msg: P.Message, session: Session | None) -> P.Message | None:
        if isinstance(msg, P.Hello):
            return P.Challenge(msg_id=msg.msg_id, nonce=msg.nonce, cookie=self.cookies.issue(identity, msg.nonce))
        if isinstance(msg, P.Handshake):
            return self._handshake(identity, msg)
        assert session is not None  # P.TO_DECODE admits the rest only under a session's key
        now = self.clock()
        owner = identity.decode(errors="replace")
        try:
            if isinstance(msg, P.Allocate):
                return self.admission.admit(identity, owner, msg, now)  # None: answered by _housekeeping
            if isinstance(msg, P.TransferDone):
                self.pool.mark_ready(msg.transfer_id, owner=owner, num_bytes=msg.num_bytes,
                                     seconds=msg.seconds, now=now, digest=msg.digest)
                return P.Ack(msg_id=msg.msg_id, incarnation=self.incarnation)
            if isinstance(msg, P.Landed):  # one-way: no reply, even to a refusal
                try:
                    self.pool.mark_landed(msg.transfer_id, owner=owner, pages=msg.pages, layers=msg.layers,
                                          num_layers=self.compat.num_layers, now=now)
                except TransferError as e:
                    self.stats.rejected += 1
                    log.debug("control: Landed refused: %s", e)
                return None
            if isinstance(msg, P.Cancel):
                dropped = self.admission.withdraw(msg.transfer_id, owner)
                r = self.pool.lookup(msg.transfer_id)
                # A rank of the same prefill that was to write its heads too, and will not: it
                # ends the hand-off for its co-writers (they are told, as by any other end).
                mate = (r is not None and session.senders > 1 and r.claim.peer == session.peer
                        and not r.writes(owner))
                if dropped or mate or (r is not None and r.writes(owner)):  # not another peer's Cancel
                    self.admission.release(msg.transfer_id)
                self.pool.abort(msg.transfer_id, reason=f"canceled by prefill: {msg.reason}", now=now,
                                owner=None if mate else owner)
                self.pool.confirm_end(msg.transfer_id, owner=owner, now=now)  # it stopped writing
                return P.Ack(msg_id=msg.msg_id, incarnation=self.incarnation)
            if isinstance(msg, P.Heartbeat):
                self.pool.renew(msg.transfer_ids, owner=owner, now=now)
                return P.Ack(msg_id=msg.msg_id, incarnation=self.incarnation)
        except (PoolExhausted, TransferError) as e:
            return self.admission.refused(msg, owner, now, e)
        raise AssertionError(f"unhandled {type(msg).__name__}")  # P.TO_DECODE lists only the above

    def _handshake(self, identity: bytes, msg: P.Handshake) -> P.Message | None:
        if not self.cookies.redeem(identity, msg.nonce, msg.cookie):
            self.stats.stale += 1  # a recorded Handshake, or one too late: no reply, no session
            self._warn("cookie", "control: dropped a Handshake from %s with a spent or expired cookie", msg.peer)
            return None
        if msg.compat_hash != self.compat_hash or msg.compat.digest() != self.compat_hash:
            fields = list(self.compat.differing(msg.compat)) or ["compat_hash"]
            detail = ", ".join(f"{f}: prefill {getattr(msg.compat, f, '?')!r} != decode "
                               f"{getattr(self.compat, f, '?')!r}" for f in fields if f != "compat_hash")
            log.warning("control: refused incompatible peer %s: %s", msg.peer, detail or "hash differs")
            return self._refuse(msg, f"incompatible peer: {detail or 'compatibility hash differs'}", fields)
        ranks = check_ranks(self.compat, msg.compat)
        if not ranks.ok:
            log.warning("control: refused peer %s: %s", msg.peer, ranks.why)
            return self._refuse(msg, f"incompatible peer: {ranks.why}", [ranks.field])
        self._refused.pop((msg.peer, msg.compat.tp_rank), None)
        for other, s in list(self._sessions.items()):  # its predecessor, if this worker restarted
            if other != identity and (s.peer, s.rank) == (msg.peer, msg.compat.tp_rank) \
                    and s.incarnation != msg.incarnation:
                self._drop_session(other, f"prefill worker {s.peer}/{s.rank} restarted")
        old = self._sessions.get(identity)
        if old is not None:
            self._owners.pop(old.data_token, None)
        session = Session(msg.peer, msg.compat.tp_rank, msg.incarnation,
                          self.keys.session(identity, msg.nonce, msg.cookie), self.clock(),
                          data_token=secrets.token_bytes(16), senders=ranks.senders,
                          sections=ranks.sections, same_tp=msg.compat.tp_size == self.compat.tp_size)
        self._sessions[identity] = session
        self._owners[session.data_token] = identity.decode(errors="replace")
        self.stats.handshakes += 1
        return P.HandshakeReply(msg_id=msg.msg_id, incarnation=self.incarnation, page_bytes=self.page_bytes,
                                num_pages=self.pool.num_pages, descriptor=self.descriptor, data_token=session.data_token,
                                blocks=self.blocks if session.same_tp else None)

    def _refuse(self, msg: P.Handshake, why: str, fields: list[str]) -> P.Error:
        self.stats.refused_handshakes += 1
        self._refused.pop((msg.peer, msg.compat.tp_rank), None)  # (re-inserted last: the oldest go first)
        self._refused[(msg.peer, msg.compat.tp_rank)] = why
        while len(self._refused) > _MAX_REFUSED:  # peers name themselves: a bounded record
            self._refused.pop(next(iter(self._refused)))
        return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.INCOMPATIBLE, message=why, fields=fields)

    def _drop_session(self, identity: bytes, why: str) -> None:
        """Forget a peer; abort what it was still writing (the decode side recomputes those at
        once). Reservations it finished writing (READY) stay: their decode request may still come."""
        session = self._sessions.pop(identity, None)
        if session is None:
            return
        self._owners.pop(session.data_token, None)
        self.stats.peers_lost += 1
        owner = identity.decode(errors="replace")
        now = self.clock()
        self.admission.drop_owner(owner, why, now)
        aborted = self.pool.abort_writing(owner, reason=why, now=now)
        for tid in aborted:
            self.admission.release(tid)
        log.warning("control: %s; dropped its session, aborted %d reservation(s) it was writing", why, len(aborted))

    def _housekeeping(self, sock: zmq.Socket) -> None:
        now = self.clock()
        self._forgive_own_stall(now)
        for w, reply in self.admission.answer_parked(now) if self.admission.parked else ():
            self._reply(sock, w, reply)
        if now >= self._next_expiry:
            self._next_expiry = now + _EXPIRE_EVERY_S
            for tid in self.pool.expire(now):
                log.warning("control: reclaimed pages of transfer %s (lease expired)", tid)
            for identity, s in list(self._sessions.items()):
                if now - s.last_seen > self.peer_s:
                    self._drop_session(identity, f"prefill worker {s.peer}/{s.rank} silent for "
                                                 f"{self.peer_s:g} s (timeouts.peer_s)")
        self._tell_ended(sock)  # after the expiry: the hand-offs it ended are told in this turn too
        for w, reply in self.admission.serve_queue(now):
            self._reply(sock, w, reply)

    def _tell_ended(self, sock: zmq.Socket) -> None:
        """Tell each owner of a hand-off this side ended while it was writing: it stops, and its
        Cancel confirms it (the pages of a one-sided transport are held until then)."""
        for owner, tid, generation, reason in self.pool.take_notices():
            identity = owner.encode()
            session = self._sessions.get(identity)
            if session is not None:
                self.stats.ended_sent += 1
                self._send(sock, identity, P.Ended(msg_id=0, transfer_id=tid, generation=generation,
                                                   reason=reason[:200]), session)

    def _forgive_own_stall(self, now: float) -> None:
        """A peer is silent only while this loop listens: if the loop itself did not run for a
        while (this process was stopped, swapped out), that gap is not the peers' silence, and
        the heartbeats they sent meanwhile are still queued, unread."""
        last, self._last_turn = self._last_turn, now
        if last is not None and now - last > self._asked_s + _STALL_S:
            for s in self._sessions.values():
                s.last_seen += now - last  # the silence before the stall still counts

    def _reply(self, sock: zmq.Socket, w: Waiting, msg: P.Message) -> None:
        """Answer a queued allocation in its session (none: the peer's session was dropped, and
        its waiting allocations with it)."""
        session = self._sessions.get(w.identity)
        if session is not None:
            self._send(sock, w.identity, msg, session)
