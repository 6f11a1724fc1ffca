"""A hand-off sent layer by layer while the prefill's forward computes it (``transport.layerwise``; L5).

Without it a hand-off starts once the request finished, so its whole transfer runs after the
prefill's forward (docs/benchmarks.md: on CPU, 28 ms of a 4000-token prompt's KV, all of it on
the second token's path). With it the connector's scheduler half starts the hand-off in the
engine step that computes the prompt's last chunk, its worker half marks each layer computed as
vLLM's forward passes it (``save_kv_layer``; on a GPU with an event recorded on vLLM's stream),
and the sender submits that layer's pages to the transport at once, while the next layers
compute. Still one control round trip per hand-off: the pages are allocated (reserved) as the
forward starts, and TransferDone follows the last layer.

:class:`LayerMarks` is the one object both threads touch: vLLM's thread marks layers and the
forward's end, the sender's loop waits on it. :func:`send_layers` is the sender's loop over it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import torch

from lmcache_pd._types import BatchState
from lmcache_pd.errors import TransferTimeout
from lmcache_pd.layout import RangePlan


class LayerMarks:
    """Which layers of one layered hand-off vLLM's forward has computed (thread-safe)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self._computed: dict[int, torch.cuda.Event | None] = {}
        self._order: list[int] = []  # layers in the order they were computed
        self.computed_at = 0.0
        """Wall clock when the forward over the last prompt chunk ended (0: not yet)."""
        self._wake: Callable[[], None] | None = None

    def layer(self, index: int, ready: torch.cuda.Event | None = None) -> None:
        """vLLM's thread: layer ``index`` is written (on a GPU: once ``ready`` completes)."""
        with self._lock:
            if index in self._computed:  # layers sharing one KV tensor mark it twice
                return
            self._computed[index] = ready
            self._order.append(index)
            wake = self._wake
        if wake is not None:
            wake()

    def forward_done(self, at: float | None = None) -> None:
        """vLLM's thread: the forward ended (every layer was marked by now)."""
        with self._lock:
            self.computed_at = at if at is not None else time.time()
            wake = self._wake
        if wake is not None:
            wake()

    def bind(self, wake: Callable[[], None]) -> None:
        """The sender's loop: call ``wake`` (thread-safe) on every mark from now on."""
        with self._lock:
            self._wake = wake

    def since(self, seen: int) -> list[tuple[int, torch.cuda.Event | None]]:
        """Layers computed after the first ``seen`` ones, in the order they were computed."""
        with self._lock:
            return [(i, self._computed[i]) for i in self._order[seen:]]


async def send_layers(transport, peer_id: str, region: int, plans: list[RangePlan], marks: LayerMarks, *,
                      data_s: float, ticket: bytes, check: Callable[[], None],
                      failed: Callable[[BatchState, object], None],
                      signal: tuple[int, int] | None = None) -> float:
    """Submit each layer's plan (``plans[layer]``) as soon as ``marks`` says it is computed, and
    return when every layer is in the peer's pool (the wall clock of the first submit).

    Deadlines (``timeouts.data_s``, named in the error): each next layer must be marked within
    ``data_s`` of the last progress (a forward that stops fails the hand-off), and the bytes
    must have landed within ``data_s`` of the last submit. ``check`` raises when the hand-off
    must stop (the decode side ended it); ``failed`` raises for a batch that ended otherwise than
    DONE. On a GPU a layer goes after its event: ordered on the device by a stream-ordered
    transport, else once the event completed. ``signal``: the device-side signal the last
    layer's batch ends with (node/armed.py)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    marks.bind(lambda: loop.call_soon_threadsafe(wake.set))
    ordered = transport.capabilities.stream_ordered
    handles: list = []
    waiting: list[tuple[int, torch.cuda.Event | None]] = []  # computed, its event not yet complete
    seen = 0
    first_byte_at = 0.0
    progress = time.monotonic()
    try:
        while True:
            wake.clear()
            new = marks.since(seen)
            seen += len(new)
            waiting += new
            for item in list(waiting):
                index, ready = item
                if ready is not None and not ordered and not ready.query():
                    continue
                waiting.remove(item)
                last = {"signal": signal} if signal is not None and len(handles) == len(plans) - 1 else {}
                handle = transport.submit(peer_id, region, plans[index], timeout_s=data_s,
                                          after=ready if ordered else None, ticket=ticket, **last)
                handle.add_done_callback(lambda _h: loop.call_soon_threadsafe(wake.set))
                handles.append(handle)
                first_byte_at = first_byte_at or time.time()
                progress = time.monotonic()
            states = [transport.poll(h) for h in handles]
            for h, state in zip(handles, states):
                if state.terminal and state != BatchState.DONE:
                    failed(state, h)
            in_flight = not all(s == BatchState.DONE for s in states)
            if len(handles) == len(plans) and not in_flight:
                return first_byte_at
            check()
            if time.monotonic() - progress > data_s:
                what = "the prefill's forward to compute the next layer" if seen < len(plans) else "data transfer"
                raise TransferTimeout(what, config_field="timeouts.data_s", seconds=data_s)
            # Woken by a mark or a transport callback; the short timeout keeps polling
            # transports that progress only inside poll(), and events without a callback. Between
            # layers, with nothing in flight, only a mark wakes it: a wake-up costs the forward
            # (vLLM's thread, on the same core on CPU) the GIL.
            try:
                await asyncio.wait_for(wake.wait(), 0.005 if in_flight or waiting else 0.25)
            except TimeoutError:
                pass
    finally:
        marks.bind(lambda: None)
        for handle in handles:
            handle.close()  # cancels layers still in flight after a failure
