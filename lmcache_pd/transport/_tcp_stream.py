"""The tcp transport's sending side (tcp.py has the wire format and the receiver): per peer,
``streams`` connections, each driven by a thread of its own that sends one batch at a time and
waits for its ack; and batches of prepared layers (:class:`Posts`), each layer queued to one
stream by the thread that posts it."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import queue
import socket
import struct
import threading
import time

import numpy as np

from lmcache_pd import auth
from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost
from lmcache_pd.layout import RangePlan
from lmcache_pd.threads import thread
from lmcache_pd.transport import _cma, _sealed
from lmcache_pd.transport._tcp_wire import (
    _ACK,
    _BAD_BATCH,
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
    _blocking,
    _Descriptor,
    _hello_tag,
    _pieces,
    _recv_exact,
    _recv_record,
    _send_all,
    _tune,
)
from lmcache_pd.transport.base import BatchHandle, LayerPosts, Transport

log = logging.getLogger(__name__)


class Stream:
    """One sender connection and the thread that drives it, one batch at a time."""

    def __init__(self, transport: Transport, desc: _Descriptor, name: str, session: bytes, stop: threading.Event):
        self.transport = transport
        self.desc = desc
        self.name = name
        self.session = session
        self.stop = stop  # the transport's: set by close()
        self.sock: socket.socket | None = None
        self.channel: _sealed.Channel | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.busy: BatchHandle | None = None
        self.reads = False  # the receiver copies each batch out of our memory (tcp.py, same-host reads)
        self._proof: ctypes.Array | None = None  # the hello's nonce, kept where the receiver may check it
        self.thread = thread(self._loop, name)

    def open(self, timeout_s: float) -> None:
        sock = socket.create_connection((self.desc.host, self.desc.port), timeout=timeout_s)
        where = f"tcp peer {self.desc.host}:{self.desc.port}"
        try:
            _tune(sock, self.transport.options.socket_buffer_bytes)
            challenge = bytearray(_CHALLENGE.size)
            _recv_exact(sock, memoryview(challenge))
            magic, theirs = _CHALLENGE.unpack(challenge)
            if magic != b"LPDC":
                raise PeerLost(f"{where} is not an lmcache-pd receiver of this release")
            ours = auth.nonce()
            t = self.transport
            key, flags, offer = t.keys.tcp, _ENCRYPTED if t.encrypt else 0, b""
            if t.options.same_host_reads and not t.encrypt and _cma.supported():
                self._proof = ctypes.create_string_buffer(ours, len(ours))
                flags |= _READS
                offer = _OFFER.pack(os.getpid(), _cma.host_id(), ctypes.addressof(self._proof))
            sock.sendall(_HELLO.pack(b"LPDH", self.desc.token, self.desc.region, ours, flags, self.session,
                                     _hello_tag(key, theirs, self.desc.token, self.desc.region, ours, flags,
                                                self.session, offer)) + offer)
            reply = bytearray(_HELLO_REPLY.size)
            _recv_exact(sock, memoryview(reply))
            magic, status, tag = _HELLO_REPLY.unpack(reply)
            if magic == b"LPDR" and status == _BAD_MODE:
                raise PeerLost(f"{where} refused the hello: one side encrypts its data plane and the other does "
                               "not (set auth.encrypt the same on every instance)")
            if magic != b"LPDR" or status not in (_OK, _OK_READS) or (status == _OK_READS and not offer):
                raise PeerLost(f"{where} refused the hello (status {status}): it restarted, is not this pool, "
                               "or has another auth secret")
            if not auth.check(key, tag, b"reply", ours, theirs, bytes([status])):
                raise PeerLost(f"{where} answered the hello without our auth secret")
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reads = status == _OK_READS
        if self.reads and t.stats.path != "same-host reads":
            t.stats.path = "same-host reads"
            log.info("tcp: %s reads our batches out of this process's memory (transport.options.same_host_reads)",
                     where)
        self.channel = (_sealed.channel(t.keys, sender=True, receiver_nonce=theirs, sender_nonce=ours)
                        if t.encrypt else None)

    def abort(self) -> None:
        sock = self.sock
        if sock is not None:
            try:
                # Reset, not FIN, when the stream thread closes it: what the kernel still buffers
                # for this batch is dropped instead of delivered (the decode side ended it).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _loop(self) -> None:
        # It sleeps until a batch comes: the transport queues None to each stream it drops and to
        # every one at close (it polled every 0.2 s before, a wake-up the prefill's core paid for
        # five times a second per stream).
        while not self.stop.is_set():
            item = self.queue.get()
            if item is None:
                break
            if isinstance(item, _End):
                item.run(self.transport)
                continue
            self._run(*item)
        if self.sock is not None:
            self.sock.close()

    def _run(self, handle: BatchHandle, src: memoryview, plan: RangePlan, deadline: float, ticket: bytes,
             base: int = 0, last: bool = True) -> None:
        """Send ``plan`` as one batch of the wire and wait for its ack (``last``: the handle is DONE
        after it; else it is one layer of a :class:`Posts` batch, more to come)."""
        if handle.state != BatchState.IN_FLIGHT:
            return  # canceled while queued, or an earlier layer of its batch failed
        self.busy = handle
        t = self.transport
        try:
            if self.sock is None:
                self.open(max(0.01, deadline - time.monotonic()))
            sock = self.sock
            assert sock is not None
            # The range table is padded with empty ranges to _MIN_RANGES rows: measured on loopback,
            # a batch whose header+table is under ~100 bytes moved at half speed (1.3 vs 2.9 GB/s
            # for 16 MiB, benchmarks/transfer.py); the padding costs 128 bytes per batch, and the
            # receiver reads the header and that much table in one call.
            rows = max(len(plan), _MIN_RANGES)
            table = np.zeros((rows, 3 if self.reads else 2), dtype="<i8")
            table[:len(plan), 0] = plan.dst_offsets
            table[:len(plan), 1] = plan.lengths
            head = _BATCH.pack(b"LPDB", handle.id, rows, len(ticket))
            _blocking(sock, deadline - time.monotonic())  # each call below: at most this long
            ch = self.channel
            if ch is None:
                if self.reads:  # the receiver copies the ranges from here: it gets their addresses, no payload
                    table[:len(plan), 2] = plan.src_offsets + base
                    payload = []
                else:
                    payload = _pieces(src, plan.src_offsets.tolist(), plan.lengths.tolist(), t.options.piece_bytes)
                _send_all(sock, [memoryview(head), memoryview(table.view(np.uint8).reshape(-1)), memoryview(ticket),
                                 *payload])
                ack = bytearray(_ACK.size)
                _recv_exact(sock, memoryview(ack))
            else:  # encrypted: header in clear (authenticated), then one record for the table and per piece
                pieces = _pieces(src, plan.src_offsets.tolist(), plan.lengths.tolist(), t.options.piece_bytes)
                sock.sendall(head + ch.seal(table.tobytes() + ticket, aad=head))
                for piece in pieces:
                    sock.sendall(ch.seal(piece))
                ack = _recv_record(sock, ch, _ACK.size)
            magic, batch, status = _ACK.unpack(ack)
            if magic == b"LPDA" and batch == handle.id and status == _BAD_BATCH:
                raise ConnectionError("the receiver refused the batch: not into a live reservation of this "
                                      "session (the decode side ended the hand-off), outside its pool"
                                      + (", or it could not read our memory" if self.reads else ""))
            if magic != b"LPDA" or batch != handle.id or status != _OK:
                raise ConnectionError(f"bad ack (magic {magic!r}, batch {batch}, status {status})")
            if last:
                t._finish(handle, BatchState.DONE, time.monotonic())
        except (TimeoutError, BlockingIOError):  # EAGAIN: the kernel timeout fired
            self._drop()
            t._finish(handle, BatchState.TIMEOUT, time.monotonic(), "tcp transfer passed its deadline")
        except (OSError, ConnectionError, PeerLost) as e:
            self._drop()
            state = BatchState.CANCELED if handle.state == BatchState.CANCELED else BatchState.FAILED
            t._finish(handle, state, time.monotonic(), f"tcp transfer failed: {e}")
        except Exception as e:  # noqa: BLE001 - a bug must end the handle, never leave it in flight
            log.exception("tcp stream %s crashed on batch %d", self.name, handle.id)
            self._drop()
            t._finish(handle, BatchState.FAILED, time.monotonic(), f"tcp transfer crashed: {e!r}")
        finally:
            self.busy = None

    def _drop(self) -> None:
        # The stream is out of step with the receiver: reconnect for the next batch.
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.channel = None
            self.reads = False


class _End:
    """Queued behind a sealed batch's posted layers: it ends there, CANCELED, once they were sent."""

    def __init__(self, handle: BatchHandle, why: str):
        self.handle, self.why = handle, why

    def run(self, transport: Transport) -> None:
        if self.handle.state == BatchState.IN_FLIGHT:  # (not if a layer before it failed)
            transport._finish(self.handle, BatchState.CANCELED, time.monotonic(), self.why)


class Peer:
    def __init__(self, streams: list[Stream]):
        self.streams = streams
        self.next = itertools.cycle(range(len(streams)))


class Posts(LayerPosts):
    """tcp's prepared layers (``TcpTransport.prepare_layers``): a post queues its layer to the
    batch's one stream (a queue put, microseconds, on the posting thread: vLLM's as its forward
    passes the layer), whose thread sends it as a batch of the wire of its own, acked once its
    bytes are in the pool, so the receiver scatters each layer as it lands. Layers go in the order
    posted; the batch is DONE with the last one's ack. A layer that fails fails the batch, and
    those queued behind it are dropped unsent (``Stream._run``)."""

    def __init__(self, handle: BatchHandle, stream: Stream, src: memoryview, plans: dict[int, RangePlan],
                 timeout_s: float, ticket: bytes, base: int):
        self.handle = handle
        self._stream, self._src, self._plans, self._timeout_s, self._ticket, self._base = (
            stream, src, plans, timeout_s, ticket, base)
        self._left = set(plans)
        self._lock = threading.Lock()  # (posts from two threads: exactly one of them queues the last layer)
        if not plans and handle.state == BatchState.IN_FLIGHT:
            stream.transport._finish(handle, BatchState.DONE, time.monotonic())

    def post(self, layer: int, after: object = None) -> None:
        # ``after`` is always None: tcp sends host memory, written once its layer is marked.
        with self._lock:
            if self.handle.state != BatchState.IN_FLIGHT or layer not in self._left:
                return
            self._left.discard(layer)
            # Each layer's deadline runs from its post: the forward computes the layers one after
            # the other, for longer than one layer's transfer may take.
            self._stream.queue.put((self.handle, self._src, self._plans[layer], time.monotonic() + self._timeout_s,
                                    self._ticket, self._base, not self._left))

    def seal(self, why: str) -> None:
        with self._lock:
            if self.handle.state != BatchState.IN_FLIGHT or not self._left:
                return
            self._left.clear()
            self._stream.queue.put(_End(self.handle, why))
