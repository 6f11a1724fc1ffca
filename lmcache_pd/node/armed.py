"""Scatters queued on the decode's GPU behind a device-side signal (the loader's helper; L5).

Without it a GPU hand-off ends in a chain of host hops: the prefill's completion thread sees
the copy end, its loop sends TransferDone, the decode's control server marks the pages READY,
the loader wakes, launches the scatter and waits for it (docs/benchmarks.md: about 1 ms in
all, at 16 MiB ten times the copy). With a transport that has ``capabilities.signals``
(cuda_ipc), the loader *arms* a load as soon as its pages are granted: on a stream of the load's
own it queues a GPU-side wait for the reservation's signal, then the scatter, then a host
notification. The prefill's copy stream writes the signal right after the bytes
(:func:`signal_of` names the slot and the value on both sides), so the scatter starts on the GPU
the moment the bytes are in, and the watcher thread here wakes once it is done.
TransferDone still comes, later, and finds the reservation consumed.

Each armed load has a stream of its own (non-blocking: vLLM's default-stream work never waits
for it): a load whose bytes are late must not hold up the scatter of another. A load that ends
otherwise (its hand-off failed, its deadline passed, the request was aborted, shutdown) is
*released*: the receiver writes the value itself, the scatter runs over whatever the pages
hold, and the load is reported failed only after that (vLLM then recomputes into its blocks).

What an armed wait costs, and why arming is experimental and off (``transport.options.signals``,
cuda_ipc):
- a device-wide synchronization in the decode process (cudaFree, ``torch.cuda.synchronize()``)
  waits for it, that is, for the bytes or the release. vLLM 0.32's GPU model runner makes one
  in every step that returns prompt logprobs (and in pooling models' steps);
- the driver multiplexes a process's streams onto a few hardware queues
  (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default), and a stream blocked in ``cuStreamWaitValue32``
  blocks the queue: any other stream of the decode put on it waits too, the release's write
  included. On the H200 a test with both ends in one process hung this way (test_armed.py).
Both grow with how long a load stays armed. Making it safe needs loads armed only once their
bytes are on their way (a wait of a copy's length), or no decode-side wait at all (the prefill
writing into the decode's blocks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmcache_pd.ops import PreparedCopy, run_copy
from lmcache_pd.threads import thread
from lmcache_pd.transport import Transport
from lmcache_pd.transport.device_signals import Notifier

log = logging.getLogger(__name__)


def signal_of(pages: Sequence[int], generation: int) -> tuple[int, int]:
    """The signal slot and value of a reservation: its first page (no two live reservations
    share one) and its generation, never 0 (a fresh slot holds 0). A late write by the writer
    of an ended reservation carries another value, so it never satisfies a later wait."""
    return int(pages[0]), (generation - 1) % 0xFFFFFFFF + 1


@dataclass
class Armed:
    """One load's scatter, queued behind its signal."""

    slot: int
    value: int
    generation: int
    stream: torch.cuda.Stream
    copy: PreparedCopy
    """Kept alive until the scatter ran (its uploaded range table, if any)."""
    event: torch.cuda.Event = field(default_factory=torch.cuda.Event)
    reason: str | None = None
    """Why it was released (the load then fails); None while it waits for the bytes."""


class SignalWaits:
    def __init__(self, transport: Transport, device: torch.device, on_done: Callable[[object], None]):
        """``on_done(owner)``: called on the watcher thread once an armed scatter has run
        (``owner``: what :meth:`arm` was given; its ``armed.reason`` says whether it was released)."""
        self.transport = transport
        self.device = device
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        self._on_done = on_done
        self._idle: list[torch.cuda.Stream] = []
        self._armed: dict[int, tuple[object, Armed]] = {}  # id(owner) -> (owner, armed)
        self._lock = threading.Lock()
        self._notifier = Notifier()
        self._stop = False
        self._thread = thread(self._watch, "pd-loader-signals")

    def start(self) -> None:
        self._thread.start()

    def stream(self) -> torch.cuda.Stream:
        """An idle stream of its own for the next armed load (planned and uploaded on it)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        import cupy

        with cupy.cuda.Device(self._index):
            raw = cupy.cuda.Stream(non_blocking=True)  # a new CUDA stream, not one of torch's shared pool
        stream = torch.cuda.ExternalStream(raw.ptr, device=torch.device("cuda", self._index))
        stream._pd_raw = raw  # type: ignore[attr-defined]  # keeps the CUDA stream alive
        return stream

    def arm(self, owner: object, a: Armed) -> None:
        """Queue ``a``'s wait and scatter on its stream (made by :meth:`stream`); ``on_done(owner)``
        follows once it has run."""
        with self._lock:
            self._armed[id(owner)] = (owner, a)
        try:
            self.transport.wait_signal(a.slot, a.value, a.stream)
            run_copy(a.copy, a.stream)
            a.event.record(a.stream)
            self._notifier.after(self._index, a.stream.cuda_stream)
        except BaseException:
            with self._lock:
                self._armed.pop(id(owner), None)
            self.transport.raise_signal(a.slot, a.value)  # whatever was queued must not wait forever
            raise

    def release(self, a: Armed) -> None:
        """Let a waiting scatter run now (the caller has set ``a.reason``)."""
        self.transport.raise_signal(a.slot, a.value)

    def close(self, timeout_s: float = 5.0) -> None:
        """Release every armed scatter, let the watcher report them, then stop it."""
        with self._lock:
            armed = [a for _, a in self._armed.values()]
        for a in armed:
            if a.reason is None:
                a.reason = "decode worker shutting down"
            self.release(a)
        self._stop = True
        self._notifier.post()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _watch(self) -> None:
        while True:
            self._notifier.wait()
            with self._lock:
                ended = [(key, owner, a) for key, (owner, a) in self._armed.items() if a.event.query()]
                for key, _owner, a in ended:
                    del self._armed[key]
                    self._idle.append(a.stream)
                stop = self._stop and not self._armed
            for _key, owner, _a in ended:
                try:
                    self._on_done(owner)
                except Exception:  # noqa: BLE001 - the watcher must outlive a bug, or every armed load would hang
                    log.exception("ending an armed load failed")
            if stop:
                return
