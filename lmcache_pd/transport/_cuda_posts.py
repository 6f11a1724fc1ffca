"""cuda_ipc's batches of prepared layers (``Transport.prepare_layers``, ``capabilities.posts_layers``).

Each layer's copy is laid out ahead (``ops.prepare_copy``: the kernels loaded, a long plan's table
uploaded), so a post only makes the copy stream wait for the layer's event and launches the
kernel: a few microseconds on the posting thread, which is vLLM's own as its forward passes the
layer. Nothing waits on the GPU for work not yet queued (a wait for a flag that vLLM's stream
would set later could share a hardware queue with that stream and never end), and an event
recorded before the post orders each copy after the kernels that wrote its layer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from lmcache_pd._types import BatchState
from lmcache_pd.device_clock import clock_for
from lmcache_pd.ops import PreparedCopy, run_copy
from lmcache_pd.transport._cuda_done import Pending
from lmcache_pd.transport.base import BatchHandle, LayerPosts
from lmcache_pd.transport.device_signals import Bell

log = logging.getLogger(__name__)


class Posts(LayerPosts):
    """Prepared layers of one batch: a post waits, on the copy stream, for the layer's event and
    launches its copy (microseconds, on the posting thread); after the last, the batch's stamp
    goes to the completion thread, as a submitted batch's does."""

    def __init__(self, handle: BatchHandle, stream: torch.cuda.Stream, device: torch.device,
                 prepared: dict[int, PreparedCopy | None], signal: Bell | None, *,
                 done: Callable[[Pending], None], forget: Callable[[BatchHandle], None], fail: Callable[[str], None]):
        """``done(item)``: hands the batch's end to the completion thread (a ``Pending``: handle,
        first and last stamp, tables to keep alive, outcome, the last copy's start); ``forget(handle)``: it takes no
        more posts; ``fail(error)``: it ends now (nothing could be stamped)."""
        self.handle = handle
        self._stream, self._device, self._prepared, self._signal = stream, device, prepared, signal
        self._clock = clock_for(device)
        self._done, self._forget, self._fail = done, forget, fail
        self._left = set(prepared)
        self._began = None
        self._gate = None
        self._ended = handle.state.terminal
        self._lock = threading.Lock()  # (posts from two threads: the last one's stamp must follow every copy)

    def post(self, layer: int, after: torch.cuda.Event | None = None) -> None:
        with self._lock:
            if self._ended or layer not in self._left:
                return
            self._left.discard(layer)
            try:
                if after is not None:
                    self._stream.wait_event(after)
                else:
                    self._stream.wait_stream(torch.cuda.current_stream(self._device))
                self._began = self._began or self._clock.stamp(self._stream)
                if not self._left:  # the last copy's start: the completion thread naps until it
                    self._gate = self._clock.stamp(self._stream)
                    if self._signal is not None:
                        self._signal.mark()
                p = self._prepared[layer]
                if p is not None:
                    run_copy(p, self._stream)
            except Exception as e:  # noqa: BLE001 - often on vLLM's thread: never raise into its forward
                log.warning("cuda_ipc: posting layer %d failed: %s", layer, e)
                self._end_locked((BatchState.FAILED, f"posting layer {layer} failed: {e}"))
                return
            if not self._left:
                self._end_locked(None)

    def seal(self, why: str) -> None:
        self.end((BatchState.CANCELED, why))  # (after the last post it ended already: nothing changes)

    def end(self, outcome: tuple[BatchState, str] | None) -> None:
        """No more posts: the batch ends once what was posted has run (``outcome``: how)."""
        with self._lock:
            self._end_locked(outcome)

    def _end_locked(self, outcome: tuple[BatchState, str] | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._forget(self.handle)
        rings = outcome is None and self._signal is not None
        try:
            landed = self._clock.stamp(self._stream)  # the copies' end (before the post: cuda_ipc.submit)
            if rings:  # after the copies on the same stream: the peer's landing word, then its post
                self._signal.ring(self._stream.cuda_stream)
        except RuntimeError as e:
            log.warning("cuda_ipc: ending a batch of posted layers: %s", e)
            self._fail(f"CUDA error: {e}")
            return
        tables = [p.table for p in self._prepared.values() if p is not None]
        self._done(Pending(self.handle, self._began or landed, landed, tables, outcome,
                           self._gate if outcome is None and not rings else None, nap_all=rings))
