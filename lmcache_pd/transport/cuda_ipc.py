"""CUDA IPC transport: prefill and decode processes on one node (NVLink or the same GPU).

The decode pool is one plain ``cudaMalloc`` allocation (``allocate``), not a caching-allocator
block or an expandable segment, so that its IPC handle names exactly the pool. The handle
travels once, in the handshake reply; the prefill side opens it once per peer (with lazy peer
access enabled) and caches the mapping. A transfer is one launch of the range-copy kernel
(csrc/copy_ranges.cu) on a dedicated stream, reading vLLM's paged cache and writing straight
into the peer's pool pages: no staging copy. An event after the launch marks completion; a
completion thread (_cuda_done.py) waits on it and finishes the handle, so DONE means the bytes
are in the peer's memory. Timing events before and after the copy give the handle the GPU's own times of
its first and last byte (``BatchHandle.began_at``/``landed_at``, device_clock.py): the hand-off's
timeline uses them instead of when the host learned.

With ``signals``, the receiver also keeps landing words (landing.py: host memory both processes
map, named in the descriptor): a batch submitted with ``signal=(slot, value)`` ends with the
copy stream writing ``value`` into the peer's word, right after its copy, and posting the
decode loader's semaphore from CUDA's own thread (device_signals.py), so the decode ends the
load without waiting for our completion thread, TransferDone and its control server.

A region that is not ours (vLLM's KV cache, for direct hand-offs: ``transport.direct``) is
exported piece by piece: each of its buffers (``extents``; one when vLLM keeps every layer in
one) lies inside some allocation of PyTorch's, whose IPC handle names the whole allocation, so
the descriptor carries the handle and the buffer's offset in it. The peer opens each
allocation once and writes at absolute addresses, translated from the region's offsets.

Both ends in one process (tests): the descriptor carries the pid and the raw address, and the
address is used directly (a process cannot open its own IPC handle).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
import time
from typing import Literal

import msgspec
import numpy as np
import torch

from lmcache_pd._types import BatchState
from lmcache_pd.device_clock import clock_for
from lmcache_pd.errors import PeerLost, TransportUnavailable
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import PreparedCopy, check_ranges, cuda_kernels_available, prepare_copy, prepare_rows, run_copy
from lmcache_pd.threads import thread
from lmcache_pd.transport import _cuda_done as _done
from lmcache_pd.transport._cuda_posts import Posts
from lmcache_pd.transport._cuda_regions import Peer, Prepared, Region, absolute_plan, allocation_of
from lmcache_pd.transport.base import BatchHandle, Capabilities, LayerPosts, PeerId, RegionId, Transport, gpu_uuid
from lmcache_pd.transport.device_signals import Ring
from lmcache_pd.transport.landing import LandingMap, LandingWords

log = logging.getLogger(__name__)
_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_exported_here: set[tuple[bytes, int]] = set()  # (token, address) still alive in this process


class CudaIpcOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    completion_wait: Literal["nap", "spin"] = "nap"
    """How the completion thread waits for a batch (_cuda_done.py): ``nap``, sleeping between looks
    until the copy can start, then spinning through the copy; ``spin``, spinning throughout."""
    signals: bool = True
    """Landing signals (landing.py): after a hand-off's bytes the copy stream writes its landing
    word in host memory both processes map and posts the decode loader's semaphore, and the
    decode ends the load (direct: nothing to scatter; pool: its scatter) without waiting for
    TransferDone. On by default (the GPU suite, vLLM's GPU engine included, ran with it on); off on
    either side turns it off (a decode exports words only with it; a prefill writes them only
    with it)."""
    spin_us: int = 1000
    """The decode's side, with ``signals``: the longest its loader watches a launched hand-off's
    landing word, per load, from a C loop without the GIL (landing.py, *launched marks*): it
    sees the copy stream's write microseconds after the last byte instead of the post from
    CUDA's host-function thread (50-150 us later). Costs up to this much of one CPU core per
    hand-off; past it the loader sleeps on the semaphore as with 0 (never watch)."""

    def __post_init__(self) -> None:
        if not 0 <= self.spin_us <= 1_000_000:
            raise ValueError("spin_us must be between 0 and 1000000 (1 s)")


class _Descriptor(msgspec.Struct, frozen=True):
    handle: bytes
    nbytes: int
    pid: int
    address: int
    token: bytes
    words: str = ""
    """The receiver's landing words (landing.py: a file name in /dev/shm; empty: none)."""
    word_slots: int = 0
    pieces: list[tuple[bytes, int, int, int]] = []
    """A region not ours: per buffer, (IPC handle of its allocation, its offset in that
    allocation, its offset in the region, its bytes); ``handle`` is then empty."""
    device_uuid: str = ""
    """The region's GPU (base.gpu_uuid; empty: not known)."""


class CudaIpcTransport(Transport):
    name = "cuda_ipc"
    capabilities = Capabilities(remote=True, mem_kinds=frozenset({"cuda"}), listens=False, stream_ordered=True,
                                encrypts=True,  # GPU to GPU on one node: nothing crosses a network
                                signals=True, direct=True, posts_layers=True, prepares=True)
    Options = CudaIpcOptions

    def __init__(self, options: CudaIpcOptions, **kwargs: object):
        super().__init__(options, **kwargs)  # type: ignore[arg-type]
        self._regions: dict[RegionId, Region] = {}
        self._peers: dict[PeerId, Peer] = {}
        self._owned: list[tuple[int, int]] = []  # (device index, address) of our cudaMallocs
        self._ids = itertools.count(1)
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._token = secrets.token_bytes(16)
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        # Started by the first register (threads never start in constructors).
        self._waiter = thread(_done.run, "pd-cuda-ipc-done", self._pending, self._finish,
                              options.completion_wait == "nap")
        self._words: LandingWords | None = None  # receiver: its landing words
        self._rings: dict[str, Ring] = {}  # sender: peers' landing words, by name
        self._open_posts: dict[int, Posts] = {}  # batches of prepared layers, by handle id, until closed
        self._posts_lock = threading.Lock()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return cuda_kernels_available()

    # --- decode side ----------------------------------------------------------------------
    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        import cupy

        if device.type != "cuda":
            raise TransportUnavailable(f"cuda_ipc needs the pool on a CUDA device, not {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        address = self._malloc(index, nbytes)
        mem = cupy.cuda.UnownedMemory(address, nbytes, owner=self, device_id=index)
        array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        return torch.as_tensor(array, device=torch.device("cuda", index))

    def _malloc(self, index: int, nbytes: int) -> int:
        import cupy

        with cupy.cuda.Device(index):
            address = cupy.cuda.runtime.malloc(nbytes)  # plain cudaMalloc: exportable as a whole
            cupy.cuda.runtime.memset(address, 0, nbytes)
        self._owned.append((index, address))
        return address

    def landing_words(self, slots: int) -> LandingWords | None:
        if not self.options.signals or slots <= 0:
            return None
        if self._words is None:
            try:
                self._words = LandingWords(slots, spin_s=self.options.spin_us / 1e6)
            except OSError as e:  # e.g. no /dev/shm in this container: TransferDone ends each load
                log.warning("cuda_ipc: no landing words (%s): loads end on TransferDone", e)
                return None
        return self._words

    def signals_to(self, peer: PeerId) -> bool:
        p = self._peers.get(peer)
        return p is not None and p.ring is not None

    def register(self, buffer: torch.Tensor, extents: tuple[tuple[int, int], ...] = ()) -> RegionId:
        if not buffer.is_cuda or buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("cuda_ipc registers flat uint8 CUDA tensors only")
        rid = next(self._ids)
        self._regions[rid] = Region(buffer, extents)
        with self._start_lock:
            if self._waiter.ident is None and not self._stop.is_set():
                self._waiter.start()
        return rid

    def export_descriptor(self, region: RegionId) -> bytes:
        import cupy

        r = self._regions[region]
        if not any(addr == r.address for _, addr in self._owned):
            return self._export_foreign(r)
        with cupy.cuda.Device(r.device.index):
            handle = cupy.cuda.runtime.ipcGetMemHandle(r.address)
        _exported_here.add((self._token, r.address))
        w = self._words
        return msgspec.msgpack.encode(_Descriptor(bytes(handle), r.nbytes, os.getpid(), r.address, self._token,
                                                  w.name if w else "", w.slots if w else 0,
                                                  device_uuid=gpu_uuid(r.device)))

    def _export_foreign(self, r: Region) -> bytes:
        """A region in memory that is not ours (vLLM's KV cache): each buffer as its
        allocation's handle and its offset in it."""
        import cupy

        index = r.device.index if r.device.index is not None else torch.cuda.current_device()
        pieces = []
        try:
            for offset, nbytes in r.extents:
                base, _ = allocation_of(index, r.address + offset)
                with cupy.cuda.Device(index):
                    handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
                pieces.append((handle, r.address + offset - base, offset, nbytes))
        except cupy.cuda.runtime.CUDARuntimeError as e:  # e.g. expandable segments (no IPC handle)
            raise TransportUnavailable(f"cuda_ipc cannot export this memory: {e}") from None
        _exported_here.add((self._token, r.address))
        w = self._words  # (a direct hand-off into these blocks signals into the same words)
        return msgspec.msgpack.encode(_Descriptor(b"", r.nbytes, os.getpid(), r.address, self._token,
                                                  w.name if w else "", w.slots if w else 0, pieces=pieces,
                                                  device_uuid=gpu_uuid(r.device)))

    def _open_pieces(self, d: _Descriptor, index: int) -> Peer:
        """The peer's region not its own allocation: each allocation opened once (two buffers
        may share one), each buffer at its address here."""
        import cupy

        peer = Peer(0, d.nbytes, opened=False)
        opened: dict[bytes, int] = {}
        try:
            with cupy.cuda.Device(index):
                for handle, in_alloc, offset, nbytes in sorted(d.pieces, key=lambda p: p[2]):
                    if handle not in opened:
                        opened[handle] = cupy.cuda.runtime.ipcOpenMemHandle(handle, _LAZY_ENABLE_PEER_ACCESS)
                        peer.mappings.append(opened[handle])
                    peer.pieces.append((offset, nbytes, opened[handle] + in_alloc))
        except cupy.cuda.runtime.CUDARuntimeError as e:
            for address in peer.mappings:
                self._close_mapping(address)
            raise PeerLost(f"cannot open the peer's CUDA IPC handles (another node, or it restarted): {e}") from None
        return peer

    def shares_device(self, peer: PeerId, region: RegionId) -> bool:
        p, r = self._peers.get(peer), self._regions.get(region)
        return p is not None and r is not None and bool(p.device_uuid) and p.device_uuid == gpu_uuid(r.device)

    # --- prefill side ---------------------------------------------------------------------
    def connect(self, descriptor: bytes, timeout_s: float, session: bytes = b"") -> PeerId:
        import cupy

        try:
            d = msgspec.msgpack.decode(descriptor, type=_Descriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise PeerLost(f"not a cuda_ipc descriptor: {e}") from None
        local = self._local_device()
        if d.pid == os.getpid():
            if (d.token, d.address) not in _exported_here:
                raise PeerLost("the cuda_ipc region was closed")
            peer = Peer(d.address, d.nbytes, opened=False)
        elif d.pieces:
            peer = self._open_pieces(d, local.index if local.index is not None else torch.cuda.current_device())
        else:
            try:
                with cupy.cuda.Device(local.index):
                    address = cupy.cuda.runtime.ipcOpenMemHandle(d.handle, _LAZY_ENABLE_PEER_ACCESS)
            except cupy.cuda.runtime.CUDARuntimeError as e:
                raise PeerLost(f"cannot open the peer's CUDA IPC handle (another node, or it restarted): {e}") from None
            peer = Peer(address, d.nbytes, opened=True)
        if d.pid != os.getpid():  # (one process: one context, nothing to pass between)
            peer.device_uuid = d.device_uuid
        if d.words and d.word_slots > 0 and self.options.signals:
            peer.ring = self._ring(d, local.index if local.index is not None else torch.cuda.current_device())
            if peer.ring is not None:
                peer.ring.users += 1
        pid = next(self._ids)
        self._peers[pid] = peer
        return pid

    def _ring(self, d: _Descriptor, index: int) -> Ring | None:
        """The peer's landing words, mapped and registered once (its pool's and its blocks'
        descriptors name the same words); None (logged) where that fails: its loads then end on
        TransferDone, as without signals."""
        ring = self._rings.get(d.words)
        if ring is not None and ring.words.slots == d.word_slots:
            return ring
        try:
            words = LandingMap(d.words, d.word_slots)
        except (OSError, ValueError) as e:
            log.warning("cuda_ipc: cannot map the peer's landing words (%s): its loads end on TransferDone", e)
            return None
        try:
            ring = self._rings[d.words] = Ring(words, index)
            return ring
        except RuntimeError as e:
            words.close()
            log.warning("cuda_ipc: cannot register the peer's landing words with CUDA (%s): its loads end on "
                        "TransferDone", e)
            return None

    def _local_device(self) -> torch.device:
        for r in self._regions.values():
            return r.device
        return torch.device("cuda", torch.cuda.current_device())

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=torch.device("cuda", index))
        return stream

    def submit(self, peer: PeerId, region: RegionId, plan: RangePlan, timeout_s: float,
               after: torch.cuda.Event | None = None, *, ticket: bytes = b"",
               signal: tuple[int, int] | None = None) -> BatchHandle:
        prepared = self.prepare_submit(peer, region, plan, signal=signal)
        if prepared is None:
            handle = BatchHandle(self, plan.nbytes, time.monotonic(), timeout_s)
            self._finish(handle, BatchState.FAILED, time.monotonic(), "range plan outside a registered region")
            return handle
        return self.submit_prepared(prepared, timeout_s, after, ticket=ticket)

    def prepare_submit(self, peer: PeerId, region: RegionId, plan: RangePlan, *,
                       signal: tuple[int, int] | None = None) -> Prepared | None:
        src = self._regions[region]
        p = self._peers[peer]
        placed = self._placed(p, src, plan)
        if placed is None:
            return None
        stream = self._stream(src.device)
        copy = prepare_copy(src.address, placed[1], placed[0], device=src.device, stream=stream)
        ring = p.ring_for(signal)
        return Prepared(peer, p, src, stream, copy, ring, plan.nbytes)

    def submit_prepared(self, prepared: object, timeout_s: float, after: torch.cuda.Event | None = None, *,
                        ticket: bytes = b"") -> BatchHandle:
        assert isinstance(prepared, Prepared)
        if self._peers.get(prepared.peer) is not prepared.p:  # (its mapping, and its ring, are closed)
            raise PeerLost(f"cuda_ipc peer {prepared.peer} was disconnected since its hand-off was prepared")
        src, stream, ring = prepared.src, prepared.stream, prepared.ring
        if ring is not None:  # first: the peer's loader wakes while we queue (transport/landing.py)
            ring.mark()
        handle = BatchHandle(self, prepared.nbytes, time.monotonic(), timeout_s)
        # Everything the host prepares came before the stream's first command: the copy's start
        # stamp, its kernel and its ring follow each other on the GPU with no host gap between
        # them (a stamp taken before the preparation timed the host's work as the copy's).
        clock = clock_for(src.device)
        # Our own stream keeps copies off vLLM's; it waits, on the GPU, for the producer: the
        # event recorded after vLLM's forward, or (no event) work queued on this thread's stream.
        if after is not None:
            stream.wait_event(after)
        else:
            stream.wait_stream(torch.cuda.current_stream(src.device))
        handle.state = BatchState.IN_FLIGHT
        began = clock.stamp(stream)  # passed once the producer's event has: the copy's start
        if prepared.copy is not None:
            run_copy(prepared.copy, stream)
        landed = clock.stamp(stream)  # the copy's end (not the post's: CUDA's host-function thread is late)
        if ring is not None:  # after the copy on the same stream: the word, then the post
            ring.ring(stream.cuda_stream)
        # With a ring nobody waits for our DONE (the decode ends the load on its word): the
        # completion thread naps through the copy too instead of spinning beside the post.
        table = prepared.copy.table if prepared.copy is not None else None
        self._pending.put(_done.Pending(handle, began, landed, table, gate=None if ring is not None else began,
                                        nap_all=ring is not None))
        return handle

    def prepare_layers(self, peer: PeerId, region: RegionId, plans: list[tuple[int, RangePlan]], timeout_s: float, *,
                       ticket: bytes = b"", signal: tuple[int, int] | None = None) -> LayerPosts:
        src = self._regions[region]
        p = self._peers[peer]
        handle = BatchHandle(self, sum(plan.nbytes for _, plan in plans), time.monotonic(), timeout_s)
        stream = self._stream(src.device)
        # Laid out (and the kernels loaded) now, on the sender's thread: a post only launches.
        prepared = self._prepare_rows(p, src, plans)
        if prepared is None:
            placed = {layer: self._placed(p, src, plan) for layer, plan in plans}
            if all(q is not None for q in placed.values()):
                prepared = {layer: prepare_copy(src.address, q[1], q[0], device=src.device, stream=stream)
                            for layer, q in placed.items() if q is not None}
        if not isinstance(prepared, dict):
            self._finish(handle, BatchState.FAILED, time.monotonic(), "range plan outside a registered region")
            return Posts(handle, stream, src.device, {}, None, done=self._pending.put, forget=self._forget_posts,
                         fail=lambda error: None)
        at = p.ring_for(signal)
        handle.state = BatchState.IN_FLIGHT
        posts = Posts(handle, stream, src.device, prepared, at, done=self._pending.put, forget=self._forget_posts,
                      fail=lambda error: self._finish(handle, BatchState.FAILED, time.monotonic(), error))
        with self._posts_lock:
            self._open_posts[handle.id] = posts
        if not prepared:
            posts.end(None)
        return posts

    def _prepare_rows(self, p: Peer, src: Region, plans: list[tuple[int, RangePlan]]
                      ) -> dict[int, PreparedCopy] | bool | None:
        """Every layer's copy laid out in one pass (``ops.prepare_rows``) where the plans share
        their lengths (``layout.plan_layers`` makes them so); False: a range outside the source
        region or the peer's; None: lay them out one by one."""
        lengths = plans[0][1].lengths if plans else None
        if lengths is None or any(plan.lengths is not lengths for _, plan in plans) or not len(lengths):
            return None
        srcs = np.stack([plan.src_offsets for _, plan in plans])
        dsts = np.stack([plan.dst_offsets for _, plan in plans])
        # ops.check_ranges of every plan, broadcast over the one lengths row (no np.tile of it)
        if (int((dsts + lengths).max()) > p.nbytes or int(dsts.min()) < 0
                or int((srcs + lengths).max()) > src.nbytes or int(srcs.min()) < 0):
            return False
        base = p.address
        if p.pieces:
            absolute = absolute_plan(p, RangePlan(srcs.ravel(), dsts.ravel(), np.tile(lengths, len(plans))))
            if absolute is None:
                return False
            dsts, base = absolute.dst_offsets.reshape(dsts.shape), 0
        rows = prepare_rows(src.address, base, srcs, dsts, lengths, device=src.device)
        return None if rows is None else {layer: r for (layer, _), r in zip(plans, rows)}

    def _forget_posts(self, handle: BatchHandle) -> None:
        with self._posts_lock:
            self._open_posts.pop(handle.id, None)

    def _placed(self, p: Peer, src: Region, plan: RangePlan) -> tuple[RangePlan, int] | None:
        """``plan`` as the kernel takes it, and the destination's base address; None: a range
        outside the source region or the peer's."""
        try:
            check_ranges(plan, src.nbytes, p.nbytes)
        except ValueError:
            return None
        if p.pieces and len(plan):
            absolute = absolute_plan(p, plan)
            return None if absolute is None else (absolute, 0)
        return plan, p.address

    def close_batch(self, handle: BatchHandle) -> None:
        with self._posts_lock:
            posts = self._open_posts.pop(handle.id, None)
        if posts is not None:  # no layer is posted from now on
            posts.end((BatchState.CANCELED, "closed before every layer was posted"))
        # A launched kernel cannot be recalled: wait for it (up to the batch's deadline), so that
        # the peer never reuses pages our kernel is still writing.
        self._await_stopped(handle, lambda: handle.state == BatchState.IN_FLIGHT)

    def disconnect(self, peer: PeerId) -> None:
        p = self._peers.pop(peer, None)
        if p is not None and (p.opened or p.ring is not None or p.mappings):
            for s in self._streams.values():  # (nothing queued may still write there)
                s.synchronize()
            self._close_mapping(p.address if p.opened else 0)
            for address in p.mappings:
                self._close_mapping(address)
            if p.ring is not None:
                p.ring.users -= 1
                if not p.ring.users and self._rings.get(p.ring.words.name) is p.ring:
                    del self._rings[p.ring.words.name]
                    p.ring.close()

    @staticmethod
    def _close_mapping(address: int) -> None:
        import cupy

        if not address:
            return
        try:
            cupy.cuda.runtime.ipcCloseMemHandle(address)
        except cupy.cuda.runtime.CUDARuntimeError as e:
            log.debug("closing an IPC mapping failed: %s", e)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._waiter.ident is not None:
            self._pending.put(None)
            self._waiter.join(5.0)
        for pid in list(self._peers):
            self.disconnect(pid)
        import cupy

        for index, address in self._owned:
            _exported_here.discard((self._token, address))
            with cupy.cuda.Device(index):
                cupy.cuda.runtime.free(address)
        self._owned.clear()
        if self._words is not None:
            self._words.close()
