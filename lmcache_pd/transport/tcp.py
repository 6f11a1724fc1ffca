"""TCP data plane: our own fallback transport, for hosts with no RDMA and no shared GPU.

The receiver (decode) listens on its data port and writes each incoming range straight into
the registered pool with ``recv_into`` on a memoryview; the sender (prefill) hands the kernel
memoryviews of its registered buffer (vLLM's paged KV cache) with ``sendmsg``. So the only
copies are the kernel's own: no staging buffer, no per-page Python bytes objects.

Wire format (all integers network order except the range table, which is little-endian int64):
  challenge D->P "LPDC" nonce[16]                              (as soon as D accepts)
  hello     P->D "LPDH" token[16] region:u64 nonce[16] flags:u8 session[16] tag[32]  (flags bit 0: encrypted,
            bit 1: reads offered, followed by pid:u32 host[16] proof:u64, which the tag covers too)
  reply     D->P "LPDR" status:u8 tag[32]                    (status 4: accepted, and D reads the payloads)
  batch     P->D "LPDB" batch:u64 n:u64 t:u16, n x (dst_off:i64, len:i64), ticket[t], then the payload
            (D reads: n x (dst_off:i64, len:i64, src_address:i64), ticket[t], and no payload)
  ack       D->P "LPDA" batch:u64 status:u8                    (sent once every byte is in the pool)
A batch of posted layers (``prepare_layers``, _tcp_stream.Posts) goes on one connection as one
batch of the wire per layer, each under the batch's id and acked on its own: the receiver sees,
and its pool scatters, each layer as it lands.
The hello is a challenge-response under the deployment's tcp key (auth.py): its tag covers D's
fresh nonce, so a recorded hello opens no connection; the reply's tag covers P's nonce, so P
knows it reached the pool it was told about. ``token`` is new per receiver process: a hello
meant for a restarted receiver is refused. A refused hello changes nothing and is counted.
``session`` is the data token of the prefill's control session (zeros: none). Before a batch's
payload is read, the receiver's gate admits it (the pool, ``listen(gate)``): the ticket names
the hand-off, and only the pages of a live reservation of that session, still being written,
are accepted; the pages stay out of use until the batch's last byte landed or failed. A batch
that is not admitted, or does not fit the region, is refused (status 1) and the connection
closed, before any of its bytes lands.
Same-host reads (``same_host_reads``, ``_cma.py``): a sender on Linux offers them in its hello, with
its pid, its host id (boot and pid namespace) and the address where it keeps the hello's nonce. A
receiver on the same host that can read that nonce there accepts (status 4), and from then on copies
each batch out of the sender's memory with ``process_vm_readv``: the socket carries the range table
and the ack, and the sender's core does no copying at all. Otherwise the payload goes in the socket.
With ``auth.encrypt`` both ends say so in the hello (a mismatch is refused, status 3), and every
batch and ack travels as AES-256-GCM records under keys of that connection (``_sealed.py``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import socket
import threading
import time

import msgspec
import numpy as np
import torch

from lmcache_pd import auth
from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost, TransferError, TransportUnavailable
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import check_ranges
from lmcache_pd.threads import thread
from lmcache_pd.transport import _cma, _sealed
from lmcache_pd.transport._tcp_stream import Peer, Posts, Stream
from lmcache_pd.transport._tcp_wire import (
    _ACK,
    _BAD_BATCH,
    _BAD_HELLO,
    _BAD_MODE,
    _BATCH,
    _CHALLENGE,
    _ENCRYPTED,
    _HELLO,
    _HELLO_REPLY,
    _MIN_RANGES,
    _OFFER,
    _OK,
    _OK_READS,
    _READS,
    MAX_RANGES,
    MAX_TICKET,
    _as_view,
    _blocking,
    _Descriptor,
    _hello_parts,
    _pieces,
    _recv_exact,
    _recv_exact_by,
    _recv_record,
    _recv_scatter,
    _tune,
)
from lmcache_pd.transport.base import BatchHandle, Capabilities, LayerPosts, PeerId, RegionId, Transport, WriteGate

log = logging.getLogger(__name__)

class TcpOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    streams: int = 1
    """Connections per peer; concurrent batches are spread over them. One saturates loopback on
    our 2-core machines (docs/benchmarks.md); more help on links with a large bandwidth-delay product."""
    io_timeout_s: float = 10.0
    """A connection that stalls mid-batch for this long is dropped (both sides)."""
    piece_bytes: int = 64 << 10
    """Ranges go to the kernel in pieces of at most this size (see docs/benchmarks.md)."""
    socket_buffer_bytes: int = 0
    """SO_SNDBUF/SO_RCVBUF; 0 leaves them to the kernel's autotuning (fastest on loopback)."""
    max_connections: int = 256
    """Connections a receiver serves at once (a thread each); beyond it a new one is closed at
    once (counted in ``refused``). Each prefill worker opens ``streams`` per decode worker."""
    same_host_reads: bool = True
    """Where both ends run on one host (Linux, one user, not ``auth.encrypt``), the receiver copies
    each batch straight out of the sender's buffer (``process_vm_readv``) and the socket carries only
    the range table: the sender's core does none of the copying, which on loopback is most of a
    send's cost, taken from a prefill's forward (docs/benchmarks.md). Either end can turn it off."""


class TcpTransport(Transport):
    name = "tcp"
    capabilities = Capabilities(remote=True, mem_kinds=frozenset({"cpu"}), listens=True, encrypts=True,
                                admits_writes=True, posts_layers=True)
    Options = TcpOptions

    def __init__(self, options: TcpOptions, **kwargs: object):
        super().__init__(options, **kwargs)  # type: ignore[arg-type]
        self._gate: WriteGate | None = None
        self._last_refusal_log = -1e9
        self._token = secrets.token_bytes(16)  # new per process: a restarted receiver refuses old peers
        self._regions: dict[RegionId, memoryview] = {}
        self._bases: dict[RegionId, int] = {}  # each region's address, for same-host reads
        self._region_ids = itertools.count(1)
        self._peer_ids = itertools.count(1)
        self._peers: dict[PeerId, Peer] = {}
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return hasattr(socket.socket, "sendmsg"), "socket.sendmsg is missing on this platform"

    # --- receiver -----------------------------------------------------------------------
    def register(self, buffer: torch.Tensor, extents: tuple[tuple[int, int], ...] = ()) -> RegionId:
        rid = next(self._region_ids)
        self._regions[rid] = _as_view(buffer)
        self._bases[rid] = buffer.data_ptr()
        return rid

    def listen(self, gate: WriteGate | None = None) -> None:
        self._gate = gate
        if self.port is None:
            raise TransportUnavailable("tcp receiver needs a data port (decode instance data_port)")
        self.keys.refuse_exposure(self.host, "tcp data plane")
        # Blocking: the accept loop sleeps until a connection comes, and close() wakes it by
        # shutting the listener down (accept then fails with EINVAL on Linux).
        srv = socket.create_server((self.host, self.port), reuse_port=False, backlog=64)
        self._listener = srv
        self._spawn(self._accept_loop, "pd-tcp-accept")

    def export_descriptor(self, region: RegionId) -> bytes:
        if self._listener is None:
            raise TransportUnavailable("call listen() before exporting a tcp descriptor")
        host, port = self.advertise or self._listener.getsockname()[:2]
        return msgspec.msgpack.encode(_Descriptor(host, port, self._token, region, len(self._regions[region])))

    def _spawn(self, target, name: str, *args: object) -> None:
        th = thread(target, name, *args)
        self._threads.append(th)
        th.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        n = itertools.count(1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # (closed: shut down by close())
                break
            with self._lock:
                full = len(self._conns) >= self.options.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                self._refuse_conn(conn, f"{self.options.max_connections} connections are served already "
                                        "(transport.options.max_connections)")
                continue
            try:
                self._spawn(self._serve, f"pd-tcp-recv-{next(n)}", conn)
            except RuntimeError as e:  # can't start new thread: refuse this one, keep accepting
                with self._lock:
                    self._conns.discard(conn)
                self._refuse_conn(conn, str(e))

    def _refuse_conn(self, conn: socket.socket, why: str) -> None:
        with self._stats_lock:
            self.stats.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log > 10.0:  # a flood must not flood the log
            self._last_refusal_log = now
            log.warning("tcp: refused a connection: %s", why)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _tune(conn, self.options.socket_buffer_bytes)
            ours = auth.nonce()
            # The whole hello within io_timeout_s: a peer sending a byte now and then must not
            # hold this thread for minutes (each receive would restart a per-call timeout).
            deadline = time.monotonic() + self.options.io_timeout_s
            _blocking(conn, self.options.io_timeout_s)
            conn.sendall(_CHALLENGE.pack(b"LPDC", ours))
            hello = bytearray(_HELLO.size)
            _recv_exact_by(conn, memoryview(hello), deadline)
            _blocking(conn, self.options.io_timeout_s)
            magic, token, region, theirs, flags, session, tag = _HELLO.unpack(hello)
            offer = bytearray(_OFFER.size if flags & _READS else 0)
            _recv_exact_by(conn, memoryview(offer), deadline)
            key = self.keys.tcp
            ok = (magic == b"LPDH" and secrets.compare_digest(token, self._token) and region in self._regions
                  and not flags & ~(_ENCRYPTED | _READS) and (not flags & _READS or not flags & _ENCRYPTED)
                  and auth.check(key, tag, *_hello_parts(ours, token, region, theirs, flags, session, bytes(offer))))
            status = _OK if ok else _BAD_HELLO
            if ok and flags & _ENCRYPTED != (_ENCRYPTED if self.encrypt else 0):
                ok, status = False, _BAD_MODE
            reads_from = self._reader(bytes(offer), theirs) if ok and offer else 0
            if reads_from:
                status = _OK_READS
            reply_tag = auth.tag(key, b"reply", theirs, ours, bytes([status])) if ok else bytes(auth.TAG_BYTES)
            if not ok:
                with self._stats_lock:
                    self.stats.refused += 1
                log.warning("tcp: refused a connection: %s", "one side encrypts (auth.encrypt) and the other does not"
                            if status == _BAD_MODE else "a bad hello (a stale peer, another auth secret, or not ours)")
            conn.sendall(_HELLO_REPLY.pack(b"LPDR", status, reply_tag))
            if not ok:
                return
            view = self._regions[region]
            ch = (_sealed.channel(self.keys, sender=False, receiver_nonce=ours, sender_nonce=theirs)
                  if self.encrypt else None)
            while not self._stop.is_set():
                if not self._serve_batch(conn, view, ch, session, reads_from, self._bases[region]):
                    return
        except (OSError, ConnectionError) as e:
            log.debug("tcp receiver connection ended: %s", e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _reader(self, offer: bytes, nonce: bytes) -> int:
        """The sender's pid where this receiver will read its batches out of its memory, else 0."""
        pid, host, proof = _OFFER.unpack(offer)
        why = ("off here (transport.options.same_host_reads)" if not self.options.same_host_reads
               else "another host or pid namespace" if host != _cma.host_id()
               else _cma.read_proof(pid, proof, nonce))
        if why:
            log.info("tcp: a sender's batches come through the socket, not read from its memory: %s", why)
            return 0
        self.stats.path = "same-host reads"
        return pid

    def _serve_batch(self, conn: socket.socket, view: memoryview, ch: _sealed.Channel | None = None,
                     session: bytes = bytes(16), reads_from: int = 0, base: int = 0) -> bool:
        # The socket stays blocking with a kernel receive timeout of io_timeout_s (set once in
        # _serve): no per-batch mode switches, and Python polls nothing before each call. An idle
        # connection just times out and waits again; close() shuts it down to end the wait.
        # Every table has at least _MIN_RANGES rows, so the header and that much of the table
        # come in one call. (1 MiB batches: 0.53-0.61 ms instead of 0.66-0.76, docs/benchmarks.md.)
        row = 24 if reads_from else 16  # (dst, len), and the source's address where this side reads
        head = bytearray(_BATCH.size + (row * _MIN_RANGES if ch is None else 0))
        try:
            first = conn.recv_into(head)
        except (TimeoutError, BlockingIOError):
            return not self._stop.is_set()
        if first == 0:
            return False
        _recv_exact(conn, memoryview(head)[first:])
        magic, batch, n, t = _BATCH.unpack_from(head)
        if magic != b"LPDB" or not _MIN_RANGES <= n <= MAX_RANGES or t > MAX_TICKET:
            self._ack(conn, ch, batch, _BAD_BATCH)
            return False
        if ch is None:
            table = np.empty((n, row // 8), dtype="<i8")
            raw = memoryview(table.view(np.uint8).reshape(-1))
            raw[:row * _MIN_RANGES] = memoryview(head)[_BATCH.size:]
            _recv_exact(conn, raw[row * _MIN_RANGES:])
            ticket = bytearray(t)
            _recv_exact(conn, memoryview(ticket))
        else:
            record = _recv_record(conn, ch, 16 * n + t, aad=bytes(head))
            table, ticket = np.frombuffer(record[:16 * n], dtype="<i8").reshape(n, 2), record[16 * n:]
        # Python integers: int64 sums could wrap past the checks.
        dst, lengths = table[:, 0].tolist(), table[:, 1].tolist()
        if any(d < 0 or n < 0 or d + n > len(view) for d, n in zip(dst, lengths)):
            return self._refuse_batch(conn, ch, batch, "writing outside the pool")
        done = None
        if self._gate is not None:
            try:
                done = self._gate.admit(session, bytes(ticket), dst, lengths)
            except TransferError as e:
                return self._refuse_batch(conn, ch, batch, str(e))
        t0 = time.monotonic()
        landed, unread = False, ""
        try:
            if reads_from:  # no payload follows: copy it out of the sender's memory
                try:
                    _cma.read(reads_from, table[:, 0].astype(np.uint64) + base, table[:, 2].astype(np.uint64),
                              table[:, 1].astype(np.uint64))
                except _cma.ReadError as e:
                    unread = f"cannot read the sender's memory: {e}"
            else:
                pieces = _pieces(view, dst, lengths, self.options.piece_bytes)
                if ch is None:
                    _recv_scatter(conn, pieces)
                else:
                    for piece in pieces:  # each lands in the pool only once its tag verified
                        piece[:] = _recv_record(conn, ch, len(piece))
            landed = not unread
        finally:  # done or failed: no more of its bytes can land (and before the ack: then the sender may say so)
            if done is not None:
                done(landed)
        if unread:
            return self._refuse_batch(conn, ch, batch, unread)
        self._ack(conn, ch, batch, _OK)
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.bytes += sum(lengths)
            self.stats.seconds += time.monotonic() - t0
        return True

    def _refuse_batch(self, conn: socket.socket, ch: _sealed.Channel | None, batch: int, why: str) -> bool:
        with self._stats_lock:
            self.stats.refused_batches += 1
        log.warning("tcp: refused batch %d: %s", batch, why)
        self._ack(conn, ch, batch, _BAD_BATCH)
        return False

    @staticmethod
    def _ack(conn: socket.socket, ch: _sealed.Channel | None, batch: int, status: int) -> None:
        ack = _ACK.pack(b"LPDA", batch, status)
        conn.sendall(ack if ch is None else ch.seal(ack))

    # --- sender -------------------------------------------------------------------------
    def connect(self, descriptor: bytes, timeout_s: float, session: bytes = b"") -> PeerId:
        try:
            desc = msgspec.msgpack.decode(descriptor, type=_Descriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise PeerLost(f"not a tcp descriptor: {e}") from None
        pid = next(self._peer_ids)
        session = session[:16].ljust(16, b"\0")
        streams = [Stream(self, desc, f"pd-tcp-send-{pid}.{i}", session, self._stop) for i in range(self.options.streams)]
        deadline = time.monotonic() + timeout_s
        try:
            for s in streams:
                s.open(max(0.01, deadline - time.monotonic()))
        except (OSError, TimeoutError) as e:
            for s in streams:
                s._drop()
            raise PeerLost(f"cannot reach tcp peer {desc.host}:{desc.port}: {e}") from None
        except PeerLost:
            for s in streams:
                s._drop()
            raise
        for s in streams:
            s.thread.start()
        self._peers[pid] = Peer(streams)
        if self._stop.is_set():  # closed meanwhile: its disconnect did not see these streams
            self.disconnect(pid)
            raise PeerLost("the tcp transport was closed while connecting")
        return pid

    def submit(self, peer: PeerId, region: RegionId, plan: RangePlan, timeout_s: float,
               after: torch.cuda.Event | None = None, *, ticket: bytes = b"") -> BatchHandle:
        if len(ticket) > MAX_TICKET:
            raise ValueError(f"a ticket of {len(ticket)} B (at most {MAX_TICKET})")
        p = self._peers[peer]
        handle = BatchHandle(self, plan.nbytes, time.monotonic(), timeout_s)
        src = self._regions[region]
        try:  # (a memoryview's slices wrap below 0 and stop at its end: a wild range would send other bytes, or fewer)
            check_ranges(plan, src.nbytes, None)
        except ValueError as e:
            self._finish(handle, BatchState.FAILED, handle.t_submit, str(e))
            return handle
        handle.state = BatchState.IN_FLIGHT
        stream = p.streams[next(p.next)]
        stream.queue.put((handle, src, plan, handle.t_submit + timeout_s, ticket, self._bases[region]))
        return handle

    def prepare_layers(self, peer: PeerId, region: RegionId, plans: list[tuple[int, RangePlan]], timeout_s: float, *,
                       ticket: bytes = b"", signal: tuple[int, int] | None = None) -> LayerPosts:
        if len(ticket) > MAX_TICKET:
            raise ValueError(f"a ticket of {len(ticket)} B (at most {MAX_TICKET})")
        p = self._peers[peer]
        stream = p.streams[next(p.next)]  # every layer on one connection: they land in the order posted
        handle = BatchHandle(self, sum(plan.nbytes for _, plan in plans), time.monotonic(), timeout_s)
        src = self._regions[region]
        try:  # every layer checked now, against both regions (the descriptor says the pool's size)
            for _, plan in plans:
                check_ranges(plan, src.nbytes, stream.desc.nbytes)
        except ValueError as e:
            self._finish(handle, BatchState.FAILED, handle.t_submit, str(e))  # (its posts are ignored)
        else:
            handle.state = BatchState.IN_FLIGHT
        return Posts(handle, stream, src, dict(plans), timeout_s, ticket, self._bases[region])

    def close_batch(self, handle: BatchHandle) -> None:
        if handle.state.terminal:
            return
        handle.state = BatchState.CANCELED
        for p in self._peers.values():
            for s in p.streams:
                if s.busy is handle:
                    s.abort()

    def disconnect(self, peer: PeerId) -> None:
        p = self._peers.pop(peer, None)
        if p is not None:
            for s in p.streams:
                s.queue.put(None)
                s.abort()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for pid in list(self._peers):
            self.disconnect(pid)
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for th in self._threads:
            th.join(timeout=2.0)
