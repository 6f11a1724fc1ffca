"""cuda_ipc's completion thread (``pd-cuda-ipc-done``): it ends each batch, in launch order (one
copy stream per device: FIFO), once the batch's last stamp has passed on the GPU, so that DONE
means the bytes are in the peer's memory.

How it waits (``transport.options.completion_wait``):
- ``nap`` (the default): while the work the batch copies is still being produced on the GPU
  (vLLM's forward: the copy stream waits for its event), the thread looks every ``_NAP_S`` and
  sleeps between looks; once the copy itself has started (the batch's ``gate`` stamp passed) it
  waits for its end with ``synchronize``, which spins, as the copy's end is on the hand-off's
  path. A whole hand-off submitted as vLLM's forward is launched, or a batch of posted layers
  (posted as fast as vLLM launches them), used to spin a CPU core for the forward's whole time on
  the GPU: 42 ms of CPU a request at 8192 tokens inside vLLM's engine (docs/benchmarks.md).
- ``spin``: ``synchronize`` from the start (the earlier behaviour).
A blocking-sync event (the driver wakes the thread) was tried instead and not kept: a whole
hand-off's transfer phase measured 0.15-0.73 ms longer with it; napping costs the sender 0.02-0.07
ms of its hand-off's end and saves 94% of the thread's CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import NamedTuple

from lmcache_pd._types import BatchState
from lmcache_pd.device_clock import Stamp
from lmcache_pd.transport.base import BatchHandle

log = logging.getLogger(__name__)
_NAP_S = 50e-6
"""Between two looks at a batch whose copy has not started: Linux sleeps about 100 us for it (the
timer slack), a few microseconds of CPU a look."""


class Pending(NamedTuple):
    """A batch queued on the copy stream, for the completion thread."""

    handle: BatchHandle
    began: Stamp
    """The copy's start on the GPU (the timeline's first byte)."""
    landed: Stamp
    """After the copy (and its signal): the batch's end."""
    tables: object
    """What the launched kernels read (range tables), kept alive until they ran."""
    outcome: tuple[BatchState, str] | None = None
    """How the batch ends once ``landed`` passed (None: DONE); a posted batch may end otherwise."""
    gate: Stamp | None = None
    """Passes once the last copy can start (what it copies was produced): napping until then."""
    nap_all: bool = False
    """Nap until ``landed`` passed, the copy too: nothing waits on this batch's DONE (its peer
    ends the load on its landing signal), and a spinning wait beside the copy stream's host
    function (the signal's post) could only delay that post."""


def run(pending: queue.SimpleQueue, finish: Callable[[BatchHandle, BatchState, float, str | None], None],
        nap: bool) -> None:
    """The thread's body: until a None is queued (close: everything before it was finished)."""
    while True:
        item: Pending | None = pending.get()
        if item is None:
            break
        handle = item.handle
        try:
            if item.nap_all:
                while not item.landed.done():
                    time.sleep(_NAP_S)
            elif nap and item.gate is not None:
                while not item.gate.done():  # (a CUDA error raises here as in synchronize)
                    time.sleep(_NAP_S)
            item.landed.event.synchronize()  # releases the GIL while it waits
            state, error = item.outcome if item.outcome is not None else (BatchState.DONE, None)
        except RuntimeError as e:
            state, error = BatchState.FAILED, f"CUDA error: {e}"
        if state == BatchState.DONE:
            try:  # (the timeline's marks: never a reason to fail a batch that landed)
                handle.began_at, handle.landed_at = item.began.wall(), item.landed.wall()
            except RuntimeError as e:
                log.debug("reading a batch's GPU stamps: %s", e)
        if handle.state == BatchState.CANCELED:
            state = BatchState.CANCELED
        finish(handle, state, time.monotonic(), error)
