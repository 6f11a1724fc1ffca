"""In-process transport for tests of the layers above (and a contract-suite citizen).

Both ends live in one process: a descriptor names a registered buffer in a process-wide
table. Behaviour is scripted by options, not by patching: ``delay_s`` delays each batch,
``fail_every`` fails every N-th batch, ``refuse_connect`` makes ``connect`` fail,
``corrupt_every`` flips one bit in every N-th batch it reports done (bytes damaged on the way),
``shares_device`` says every peer is on our GPU (``Transport.shares_device``),
``posts_layers`` takes ``prepare_layers`` (each layer copied once posted), ``signals`` keeps
landing words (landing.py) and writes them after a batch's last copy, as cuda_ipc's copy stream
does.
It writes one-sided (the receiver never sees a batch), like cuda_ipc and nixl: a batch closed
before its copy began never copies, and ``close_batch`` waits for a copy that began.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import torch

from lmcache_pd._types import BatchState
from lmcache_pd.errors import PeerLost
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import check_ranges, copy_ranges
from lmcache_pd.transport.base import BatchHandle, Capabilities, LayerPosts, PeerId, RegionId, Transport
from lmcache_pd.transport.landing import LandingMap, LandingWords

log = logging.getLogger(__name__)
_regions: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
_regions_lock = threading.Lock()


class LoopbackOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    delay_s: float = 0.0
    fail_every: int = 0
    refuse_connect: bool = False
    corrupt_every: int = 0
    shares_device: bool = False
    posts_layers: bool = False
    signals: bool = False
    copy_s: float = 0.0
    """Each copy, once begun, takes this long more: a device wedged mid-copy (close_batch waits for
    a copy that began, but not past the batch's deadline)."""
    spin_us: int = 0
    """As cuda_ipc's: the decode's loader watches a launched hand-off's landing word this long (the
    submit marks it; the copy thread writes it after its delay)."""


class _Descriptor(msgspec.Struct, frozen=True):
    key: str
    nbytes: int
    words: str = ""  # landing words (landing.py; empty: none)
    word_slots: int = 0


class LoopbackTransport(Transport):
    name = "loopback"
    capabilities = Capabilities(remote=False, mem_kinds=frozenset({"cpu"}), listens=False, encrypts=True,
                                direct=True, prepares=True)
    Options = LoopbackOptions

    def __init__(self, options: LoopbackOptions, **kwargs: object):
        super().__init__(options, **kwargs)  # type: ignore[arg-type]
        self._local: dict[RegionId, tuple[str, torch.Tensor]] = {}
        self._peers: dict[PeerId, str] = {}
        self._rings: dict[PeerId, LandingMap] = {}  # peers' landing words, mapped here
        self._words: LandingWords | None = None
        self._ids = itertools.count(1)
        self._batches = itertools.count(1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pd-loopback")
        self._closed = False
        self._lock = threading.Lock()
        self._copying: set[int] = set()  # handle ids whose copy runs now
        self.prepared_submits = 0  # batches started from prepare_submit's (tests)
        if options.posts_layers or options.signals:  # (options of the tests': the class declares a plain one)
            self.capabilities = dataclasses.replace(type(self).capabilities, posts_layers=options.posts_layers,
                                                    signals=options.signals)

    def register(self, buffer: torch.Tensor, extents: tuple[tuple[int, int], ...] = ()) -> RegionId:
        key = uuid.uuid4().hex
        with _regions_lock:
            _regions[key] = buffer
        rid = next(self._ids)
        self._local[rid] = (key, buffer)
        return rid

    def export_descriptor(self, region: RegionId) -> bytes:
        key, buf = self._local[region]
        w = self._words
        return msgspec.msgpack.encode(_Descriptor(key, buf.numel(), w.name if w else "", w.slots if w else 0))

    def landing_words(self, slots: int) -> LandingWords | None:
        if self.options.signals and slots > 0 and self._words is None:
            self._words = LandingWords(slots, spin_s=self.options.spin_us / 1e6)
        return self._words

    def signals_to(self, peer: PeerId) -> bool:
        return peer in self._rings

    def connect(self, descriptor: bytes, timeout_s: float, session: bytes = b"") -> PeerId:
        if self.options.refuse_connect:
            raise PeerLost("loopback peer refused (refuse_connect option)")
        try:
            desc = msgspec.msgpack.decode(descriptor, type=_Descriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise PeerLost(f"not a loopback descriptor: {e}") from None
        with _regions_lock:
            if desc.key not in _regions:
                raise PeerLost("loopback region is gone")
        pid = next(self._ids)
        self._peers[pid] = desc.key
        if desc.words and self.options.signals:
            try:
                self._rings[pid] = LandingMap(desc.words, desc.word_slots)
            except (OSError, ValueError) as e:  # as cuda_ipc: its loads then end on TransferDone
                log.warning("loopback: cannot map the peer's landing words (%s)", e)
        return pid

    def shares_device(self, peer: PeerId, region: RegionId) -> bool:
        return self.options.shares_device and peer in self._peers

    def prepare_submit(self, peer: PeerId, region: RegionId, plan: RangePlan, *,
                       signal: tuple[int, int] | None = None) -> object | None:
        # (as cuda_ipc's: the sender's prepared path runs in CI; a copy thread has nothing to lay out)
        return (peer, self._peers[peer], region, plan, signal)

    def submit_prepared(self, prepared: object, timeout_s: float, after: torch.cuda.Event | None = None, *,
                        ticket: bytes = b"") -> BatchHandle:
        peer, key, region, plan, signal = prepared  # type: ignore[misc]
        if self._peers.get(peer) != key:
            raise PeerLost(f"loopback peer {peer} was disconnected since its hand-off was prepared")
        self.prepared_submits += 1
        return self.submit(peer, region, plan, timeout_s, after, ticket=ticket, signal=signal)

    def submit(self, peer: PeerId, region: RegionId, plan: RangePlan, timeout_s: float,
               after: torch.cuda.Event | None = None, *, ticket: bytes = b"",
               signal: tuple[int, int] | None = None) -> BatchHandle:
        handle = BatchHandle(self, plan.nbytes, time.monotonic(), timeout_s)
        src = self._local[region][1]
        key = self._peers[peer]
        n = next(self._batches)
        fail = self.options.fail_every > 0 and n % self.options.fail_every == 0
        corrupt = self.options.corrupt_every > 0 and n % self.options.corrupt_every == 0
        handle.state = BatchState.IN_FLIGHT
        ring = self._ring(peer, signal)
        if ring is not None:
            self._rings[peer].mark(*signal)  # (as cuda_ipc's queueing thread: the copy's write comes later)
        self._pool.submit(self._run, handle, src, key, plan, fail, timeout_s, corrupt, ring=ring)
        return handle

    def _ring(self, peer: PeerId, signal: tuple[int, int] | None) -> Callable[[], None] | None:
        words = self._rings.get(peer)
        return None if words is None or signal is None else functools.partial(words.write, *signal)

    def prepare_layers(self, peer: PeerId, region: RegionId, plans: list[tuple[int, RangePlan]], timeout_s: float, *,
                       ticket: bytes = b"", signal: tuple[int, int] | None = None) -> LayerPosts:
        if not self.capabilities.posts_layers:
            return super().prepare_layers(peer, region, plans, timeout_s, ticket=ticket, signal=signal)
        handle = BatchHandle(self, sum(p.nbytes for _, p in plans), time.monotonic(), timeout_s)
        n = next(self._batches)
        scripted = {"fail": self.options.fail_every > 0 and n % self.options.fail_every == 0,
                    "corrupt": self.options.corrupt_every > 0 and n % self.options.corrupt_every == 0}
        handle.state = BatchState.IN_FLIGHT
        src, key = self._local[region][1], self._peers[peer]
        dst = _regions.get(key)
        try:  # every layer checked now, as cuda_ipc does: nothing of a batch that cannot land is copied
            if dst is None:
                raise ValueError("peer region is gone")  # (as a submitted batch says it)
            for _, plan in plans:
                check_ranges(plan, src.numel(), dst.numel())
        except ValueError as e:
            self._finish(handle, BatchState.FAILED, time.monotonic(), str(e))  # (its posts are ignored)
        return _Posts(self, handle, src, key, dict(plans), timeout_s, scripted, self._ring(peer, signal))

    def _run(self, handle: BatchHandle, src: torch.Tensor, key: str, plan: RangePlan, fail: bool,
             timeout_s: float, corrupt: bool = False, last: bool = True, ring: Callable[[], None] | None = None) -> None:
        """Copy ``plan`` (``last``: the batch's last part: it is DONE after it, its landing word
        written first by ``ring``)."""
        if handle.state != BatchState.IN_FLIGHT:
            return  # released (canceled) before it ran
        if self.options.delay_s:
            time.sleep(self.options.delay_s)
        if self.options.delay_s > timeout_s:
            self._finish(handle, BatchState.TIMEOUT, time.monotonic(), "loopback delay exceeded the deadline")
            return
        dst = _regions.get(key)
        if fail or dst is None:
            self._finish(handle, BatchState.FAILED, time.monotonic(),
                         "scripted failure" if fail else "peer region is gone")
            return
        with self._lock:
            released = handle.state != BatchState.IN_FLIGHT
            if not released:
                self._copying.add(handle.id)
        if released:  # while it waited: not a byte is written
            self._finish(handle, BatchState.CANCELED, time.monotonic(), "closed before its copy")
            return
        try:
            copy_ranges(src, dst, plan)
            if self.options.copy_s:
                time.sleep(self.options.copy_s)
            if corrupt and len(plan):  # one bit, in the middle of the last range
                at = int(plan.dst_offsets[-1] + plan.lengths[-1] // 2)
                dst[at] ^= 1
        except ValueError as e:
            self._finish(handle, BatchState.FAILED, time.monotonic(), str(e))
            return
        finally:
            with self._lock:
                self._copying.discard(handle.id)
        if last:
            if ring is not None:
                ring()
            self._finish(handle, BatchState.DONE, time.monotonic())

    def close_batch(self, handle: BatchHandle) -> None:
        with self._lock:
            if not handle.state.terminal:
                handle.state = BatchState.CANCELED
        self._await_stopped(handle, lambda: handle.id in self._copying)  # a copy that began cannot be recalled

    def disconnect(self, peer: PeerId) -> None:
        self._peers.pop(peer, None)
        words = self._rings.pop(peer, None)
        if words is not None:
            words.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)
            with _regions_lock:
                for key, _ in self._local.values():
                    _regions.pop(key, None)
            for words in self._rings.values():
                words.close()
            if self._words is not None:
                self._words.close()


class _Posts(LayerPosts):
    """Loopback's prepared layers: each posted layer's copy runs on the transport's one thread, in
    the order posted; the batch is DONE after the last (closed before: CANCELED, nothing more copied)."""

    def __init__(self, owner: LoopbackTransport, handle: BatchHandle, src: torch.Tensor, key: str,
                 plans: dict[int, RangePlan], timeout_s: float, scripted: dict[str, bool],
                 ring: Callable[[], None] | None = None):
        self.handle = handle
        self._owner, self._src, self._key, self._plans, self._timeout_s = owner, src, key, plans, timeout_s
        self._scripted = scripted
        self._ring_fn = ring
        self._left = set(plans)
        self._lock = threading.Lock()
        if not plans:
            owner._finish(handle, BatchState.DONE, time.monotonic())

    def post(self, layer: int, after: torch.cuda.Event | None = None) -> None:
        with self._lock:
            if self.handle.state != BatchState.IN_FLIGHT or layer not in self._left:
                return
            self._left.discard(layer)
            last = not self._left
            try:
                self._owner._pool.submit(self._owner._run, self.handle, self._src, self._key, self._plans[layer],
                                         self._scripted["fail"], self._timeout_s, self._scripted["corrupt"] and last, last,
                                         self._ring_fn if last else None)
            except RuntimeError as e:  # (the transport closed)
                self._owner._finish(self.handle, BatchState.FAILED, time.monotonic(), f"posting layer {layer}: {e}")

    def seal(self, why: str) -> None:
        with self._lock:
            if self.handle.state != BatchState.IN_FLIGHT or not self._left:
                return
            self._left.clear()
            try:  # after the copies posted so far (one thread, in order)
                self._owner._pool.submit(self._end, why)
            except RuntimeError:  # (the transport closed)
                self._end(why)

    def _end(self, why: str) -> None:
        with self._owner._lock:
            if self.handle.state != BatchState.IN_FLIGHT:
                return
        self._owner._finish(self.handle, BatchState.CANCELED, time.monotonic(), why)
