"""The transport contract (L3): how bytes get from a prefill buffer into the decode pool.

Call sequence, decode side (receiver):
  1. ``allocate(nbytes, device)`` then ``register(pool)`` once -> RegionId;
  2. ``listen(gate)`` once (transports with ``capabilities.listens``); transports with
     ``capabilities.admits_writes`` ask the gate before each batch touches the region;
  3. ``export_descriptor(region)`` -> bytes, sent to each prefill peer in the handshake reply;
  4. ``close()`` at shutdown.
Prefill side (sender):
  1. ``register(kv_cache_buffer, extents)`` once -> RegionId;
  2. ``connect(descriptor, timeout_s, session)`` once per control session -> PeerId (re-done if the
     peer restarts); ``session``: the token the decode side gave that session (its batches are
     admitted only into that session's reservations);
  3. per transfer: ``submit(peer, region, plan, timeout_s[, after], ticket=...)`` -> BatchHandle
     (``ticket``: the hand-off the batch belongs to, opaque here), then ``poll`` until
     a terminal state, then ``close_batch`` (``handle.close()``; always, also on failure: it frees
     per-batch state);
     A transport may also lay a submit out ahead (``prepare_submit``, at a reservation's grant)
     and start it later (``submit_prepared``, on the caller's thread);
  4. ``disconnect(peer)``; ``close()``.
``poll`` never blocks. DONE means the bytes are in the peer's memory (not merely sent): the
sender may then tell the decode side so over the control plane.
Descriptors are opaque bytes to every other layer; each transport decodes only its own.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import msgspec
import torch

from lmcache_pd._types import BatchState
from lmcache_pd.auth import Keyring
from lmcache_pd.errors import TransportUnavailable
from lmcache_pd.layout import RangePlan
from lmcache_pd.transport.landing import LandingWords

log = logging.getLogger(__name__)

RegionId = int
PeerId = int


@dataclass(frozen=True)
class Capabilities:
    remote: bool
    """Can write into another process or host."""
    mem_kinds: frozenset[str]
    """Device types of registrable memory: {"cpu"}, {"cpu", "cuda"}."""
    listens: bool
    """The receiver listens on a data port (``data_port`` of the decode instance)."""
    stream_ordered: bool = False
    """``submit(after=event)`` orders the copy after a CUDA event on the GPU itself. Others are
    handed the source, and the event, only once it has completed (the sender waits, off vLLM's
    thread)."""
    encrypts: bool = False
    """With ``auth.encrypt``, no byte crosses a network in clear: encrypted (tcp), or it never
    leaves the node (cuda_ipc, loopback). Transports without it refuse ``encrypt=True``."""
    admits_writes: bool = False
    """The receiver sees every batch before its bytes land and asks the ``WriteGate`` (tcp).
    Without it the peer writes on its own (one-sided: cuda_ipc, nixl, loopback), and the pool
    holds the pages of a hand-off ended mid-write until the writer confirms it stopped."""
    direct: bool = False
    """It can register and export memory that is not its own allocation (vLLM's KV cache), for
    the peer to write a direct hand-off straight into (``transport.direct``): nixl, loopback."""
    signals: bool = False
    """A batch can end with a landing signal (``submit(..., signal=(slot, value))``): after its
    bytes, the writer puts ``value`` into the peer's landing word ``slot`` and posts its
    semaphore (landing.py), so the decode's loader ends the load without waiting for TransferDone
    (cuda_ipc from its copy stream; loopback, with its ``signals`` option, from its copy thread)."""
    posts_layers: bool = False
    """``prepare_layers`` prepares a hand-off's layers at once (plans checked and laid out for the
    copy), and :meth:`LayerPosts.post` starts one in a few microseconds, on any thread: the
    forward's own thread starts each layer as it passes it, and the sender's thread does nothing
    per layer (cuda_ipc; loopback with its ``posts_layers`` option)."""
    prepares: bool = False
    """``prepare_submit`` lays a submit out ahead and ``submit_prepared`` starts it (cuda_ipc,
    loopback); without it the sender plans nothing at the grant."""


class WriteGate(Protocol):
    """The receiver's admission of data batches (implemented above this layer, by the pool)."""

    def admit(self, session: bytes, ticket: bytes, dst_offsets: list[int],
              lengths: list[int]) -> Callable[[bool], None]:
        """Admit a batch of ``session`` (the token its connection presented) for the hand-off
        ``ticket`` names into those ranges of the region, or raise ``TransferError`` saying why.
        Returns the function to call once the batch's bytes stopped landing: with True when all
        of them landed, False when it failed (the receiver may read what landed at once)."""


class NoOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


@functools.lru_cache(maxsize=64)
def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID ("" for CPU memory, or where it cannot be read): the one name of a GPU
    that two processes share, whatever their ``CUDA_VISIBLE_DEVICES`` made of its index."""
    if device.type != "cuda":
        return ""
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except (RuntimeError, AttributeError, AssertionError):  # (no driver; an older torch)
        return ""


@dataclass
class TransportStats:
    batches: int = 0
    bytes: int = 0
    seconds: float = 0.0
    """Wall time from submit to completion, summed over batches."""
    failures: int = 0
    path: str = ""
    """What carried the data, where the transport can tell (nixl: the UCX transport)."""
    refused: int = 0
    """Connections refused by a listening receiver: a hello that did not authenticate."""
    refused_batches: int = 0
    """Batches refused unread: not into a live reservation of their session, or outside the pool."""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


class BatchHandle:
    """One submitted batch. ``close()`` it when done; usable as a context manager."""

    __slots__ = ("id", "nbytes", "_owner", "_closed", "state", "error", "t_submit", "t_done", "_callbacks",
                 "_cb_lock", "began_at", "landed_at", "deadline")
    _ids = itertools.count(1)

    def __init__(self, owner: Transport, nbytes: int, t_submit: float, timeout_s: float = 0.0):
        self.id = next(BatchHandle._ids)
        self.deadline = t_submit + timeout_s if timeout_s else 0.0
        """Monotonic time its ``timeout_s`` ends (0: none given)."""
        self.nbytes = nbytes
        self._owner = owner
        self._closed = False
        self.state = BatchState.PENDING
        self.error: str | None = None
        self.t_submit = t_submit
        self.t_done: float | None = None
        self.began_at = 0.0
        self.landed_at = 0.0
        """Wall clock when its first byte moved and its last landed, stamped where the copy ran
        (cuda_ipc: on the GPU), set before it is DONE; 0: the transport does not stamp."""
        self._callbacks: list[Callable[[BatchHandle], None]] = []
        self._cb_lock = threading.Lock()

    def add_done_callback(self, fn: Callable[[BatchHandle], None]) -> None:
        """Call ``fn(handle)`` once the transport finishes it (at once if it already has).

        Transports that complete in their own threads call it from there, so a waiter can sleep
        instead of polling; callers must still ``poll`` transports that need polling to progress.
        """
        with self._cb_lock:
            if not self.state.terminal:
                self._callbacks.append(fn)
                return
        fn(self)

    def _run_callbacks(self) -> None:
        with self._cb_lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def close(self) -> None:
        """Free the batch's state; cancels it if it is still in flight (``Transport.close_batch``)."""
        if not self._closed:
            self._closed = True
            self._owner.close_batch(self)

    def __enter__(self) -> BatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BatchHandle #{self.id} {self.state.name} {self.nbytes} B>"


class LayerPosts(ABC):
    """A batch of per-layer plans prepared at once, each started by :meth:`post` (thread-safe)
    once its layer is computed (``Transport.prepare_layers``). ``handle`` is the batch's: DONE
    once every layer was posted and landed. Closing the handle before then posts no more: it
    ends, CANCELED, once the layers already posted stopped moving."""

    handle: BatchHandle

    @abstractmethod
    def post(self, layer: int, after: torch.cuda.Event | None = None) -> None:
        """Start ``layer``'s copy, ordered after ``after`` (as ``submit``'s); a layer the batch
        does not hold, or one posted before, is ignored. Never raises: a failure ends the batch."""

    @abstractmethod
    def seal(self, why: str) -> None:
        """Post no more layers (later posts are ignored): where some were still to come, the batch
        ends CANCELED, with ``why`` as its error, once the layers posted so far stopped moving
        (not before: a preempted hand-off's blocks are reused only then). Any thread; never raises."""


class Transport(ABC):
    """Base of every transport. Subclasses declare ``name``, ``capabilities`` and ``Options``."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: msgspec.Struct, *, host: str = "127.0.0.1", port: int | None = None,
                 keys: Keyring | None = None, encrypt: bool = False, advertise: tuple[str, int] | None = None):
        """``host``/``port``: where a listening receiver binds (the decode instance's data port);
        ``advertise``: the address its descriptor gives peers instead (``data_advertise``);
        ``keys``: the deployment's keys, for transports that authenticate their own connections
        (the others' descriptors travel only inside authenticated control sessions);
        ``encrypt``: ``auth.encrypt`` (see ``Capabilities.encrypts``)."""
        if encrypt and not self.capabilities.encrypts:
            raise TransportUnavailable(f"transport {self.name!r} cannot encrypt its data plane (auth.encrypt): "
                                       "use tcp, or keep this transport's network private and encrypt the "
                                       "control plane only by leaving auth.encrypt off")
        self.options = options
        self.host = host
        self.port = port
        self.advertise = advertise
        self.keys = keys if keys is not None else Keyring(None)
        self.encrypt = encrypt
        self.stats = TransportStats()
        self._stats_lock = threading.Lock()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this transport can run here, and why not."""
        return True, ""

    @classmethod
    def environment(cls, options: msgspec.Struct) -> dict[str, str]:
        """Variables this transport's libraries read once, when they start (UCX's), derived from its
        options. ``lmcache-pd launch`` puts them in the instance's environment, where a value the
        operator set wins; a transport never writes its process's environment itself."""
        return {}

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A zeroed flat uint8 buffer this transport can register and export (the decode pool).

        The default is a plain tensor; transports whose peers map the memory (CUDA IPC) need an
        allocation of their own and override this.
        """
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)

    @abstractmethod
    def register(self, buffer: torch.Tensor, extents: tuple[tuple[int, int], ...] = ()) -> RegionId:
        """Register a flat uint8 buffer for the life of the transport. ``extents``: (offset,
        bytes) of the separate allocations inside it, when it spans several (vLLM's per-layer
        KV buffers, ops.span_bytes); only those are memory. Empty: all of it is."""

    def listen(self, gate: WriteGate | None = None) -> None:
        """Start accepting writes into registered regions (receivers of listening transports);
        ``gate``: admits each batch (transports with ``admits_writes``; None admits all)."""

    @abstractmethod
    def export_descriptor(self, region: RegionId) -> bytes:
        """Opaque bytes a peer passes to ``connect`` to write into ``region``."""

    @abstractmethod
    def connect(self, descriptor: bytes, timeout_s: float, session: bytes = b"") -> PeerId:
        """Import a peer's descriptor; raises PeerLost (or TransferTimeout) if unreachable.
        ``session``: the control session's data token, presented by admitting transports."""

    @abstractmethod
    def submit(self, peer: PeerId, region: RegionId, plan: RangePlan, timeout_s: float,
               after: torch.cuda.Event | None = None, *, ticket: bytes = b"") -> BatchHandle:
        """Start writing ``plan`` (src offsets in ``region``, dst offsets in the peer's region).

        ``after``: the source bytes are complete once this CUDA event has completed (recorded on
        the producer's stream). A transport with ``capabilities.stream_ordered`` orders its copy
        after it on the device; any other is handed it once it has completed (the sender waits,
        off vLLM's thread), and must wait for nothing more than it.
        ``ticket``: names the hand-off (admitting transports send it with the batch).
        Transports with ``capabilities.signals`` also take ``signal=(slot, value)``: written into
        the peer's landing word once the batch's bytes are there, and its semaphore posted
        (ignored by a peer without words, and for a slot outside them).
        """

    def prepare_submit(self, peer: PeerId, region: RegionId, plan: RangePlan, *,
                       signal: tuple[int, int] | None = None) -> object | None:
        """A ``submit`` of ``plan`` laid out now (checked, placed, the copy's launch built), to be
        started later by :meth:`submit_prepared` (NIXL's pattern: descriptors prepared once, then
        posted): the sender prepares a reserved hand-off when its pages are granted, while the
        forward that computes it runs (``capabilities.prepares``). None: this transport prepares
        nothing ahead (``submit`` then), or the plan is refused (``submit`` says why)."""
        return None

    def submit_prepared(self, prepared: object, timeout_s: float, after: torch.cuda.Event | None = None, *,
                        ticket: bytes = b"") -> BatchHandle:
        """Start what :meth:`prepare_submit` laid out, as ``submit`` would have. Raises
        ``PeerLost`` when its peer was disconnected since (the caller then plans anew)."""
        raise NotImplementedError(f"transport {self.name!r} prepares no submit")

    def prepare_layers(self, peer: PeerId, region: RegionId, plans: list[tuple[int, RangePlan]], timeout_s: float, *,
                       ticket: bytes = b"", signal: tuple[int, int] | None = None) -> LayerPosts:
        """``capabilities.posts_layers``: one batch of every ``(layer, plan)``, prepared now and
        started layer by layer (:meth:`LayerPosts.post`) by whichever thread learns the layer is
        computed. ``signal`` as for ``submit``, after the last layer."""
        raise NotImplementedError(f"transport {self.name!r} cannot post prepared layers")

    def poll(self, handle: BatchHandle) -> BatchState:
        return handle.state

    def shares_device(self, peer: PeerId, region: RegionId) -> bool:
        """Sender: the peer's region is on the same GPU as our ``region`` (two processes sharing
        one GPU). There, without MPS, the GPU runs one process's work at a time, and each time
        it passes from one to the other costs 140-180 us on one H200 (docs/benchmarks.md): work
        the decode queues during the prefill's forward slows the forward. False where unknown."""
        return False

    # --- landing signals (``capabilities.signals``) ----------------------------------------
    def signals_to(self, peer: PeerId) -> bool:
        """Sender: ``submit(signal=...)`` reaches this peer's landing words (it exported some)."""
        return False

    def landing_words(self, slots: int) -> LandingWords | None:
        """Receiver, before ``export_descriptor``: keep ``slots`` landing words (landing.py),
        named in the descriptor, that this transport's writers signal into. None: this transport,
        or its options, has none (or the host could not make them: logged)."""
        return None

    def close_batch(self, handle: BatchHandle) -> None:
        """Free per-transfer state; cancels the transfer if it is still in flight."""

    def disconnect(self, peer: PeerId) -> None:
        """Forget a peer (it restarted or went away)."""

    def close(self) -> None:
        """Stop threads and close sockets. Idempotent."""

    def _await_stopped(self, handle: BatchHandle, running: Callable[[], bool]) -> None:
        """Wait while ``running()``: a copy that began cannot be recalled, and the peer must not
        reuse pages it is still writing (``close_batch``). Not past the batch's deadline, though
        (the ``timeout_s`` it was submitted with: ``timeouts.data_s`` in a node): a copy still
        running then is wedged, and waiting on would hang the caller's failure path with it."""
        while running():
            if handle.deadline and time.monotonic() > handle.deadline:
                log.error("%s: batch #%d (%d B) is still copying past its deadline (timeouts.data_s); no "
                          "longer waited for: its pages may still be written", self.name, handle.id, handle.nbytes)
                return
            time.sleep(0.0005)

    def _finish(self, handle: BatchHandle, state: BatchState, t_done: float, error: str | None = None) -> None:
        handle.error = error
        handle.t_done = t_done
        with self._stats_lock:
            self.stats.batches += 1
            if state == BatchState.DONE:
                self.stats.bytes += handle.nbytes
                self.stats.seconds += t_done - handle.t_submit
            else:
                self.stats.failures += 1
        with handle._cb_lock:
            handle.state = state  # last: pollers see a complete handle
        handle._run_callbacks()
