"""When the GPU reached a point of a stream, in the host's wall clock (L2).

A hand-off's timeline (node/timeline.py) compares the end of the prefill's forward with the
transfer's first and last byte. On a GPU the host learns of both late, and not by the same
amount: the forward's end is the host's return from vLLM's forward call (the kernels may still
run), the last byte is when a completion thread woke after the copy's event. So the fraction of
the transfer "hidden under the prefill" measured from host times is off by the GPU's lag on
each side. A :class:`DeviceClock` turns timing events into wall-clock seconds instead: each
stamp is measured against an *anchor*, an event recorded on an idle stream of our own and
synchronized at once, whose wall-clock time is known within a few microseconds (the bracket is
kept under ``ANCHOR_BRACKET_S``, or the best of a few tries). The anchor is taken again every
``REANCHOR_S``: the GPU's and the host's clocks may drift apart by tens of parts per million.
Spans between two stamps (``Stamp.seconds_to``) need no anchor at all.
"""

from __future__ import annotations

import threading
import time

import torch

REANCHOR_S = 1.0
ANCHOR_BRACKET_S = 20e-6
_ANCHOR_TRIES = 5


class Stamp:
    """A timing event recorded on a stream (``DeviceClock.stamp``)."""

    __slots__ = ("event", "_clock")

    def __init__(self, event: torch.cuda.Event, clock: DeviceClock):
        self.event = event
        self._clock = clock

    def done(self) -> bool:
        """Whether the GPU has passed the stamp."""
        return self.event.query()

    def wall(self) -> float:
        """Wall-clock seconds when the GPU passed the stamp (call once :meth:`done`)."""
        return self._clock.wall(self.event)

    def seconds_to(self, later: Stamp) -> float:
        """Seconds from this stamp to ``later`` on the GPU (both done), no anchor involved."""
        return self.event.elapsed_time(later.event) / 1e3


class DeviceClock:
    """Stamps on one CUDA device (thread-safe); :func:`clock_for` keeps one per device.

    Recording a stamp costs one event record (vLLM's thread records the forward's end); the
    anchor is taken by whoever reads a stamp's wall clock, at most every ``REANCHOR_S``, and a
    stamp may lie before or after it (an event's elapsed time is signed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device=device)  # idle but for the anchors
        self._lock = threading.Lock()
        self._anchor: tuple[torch.cuda.Event, float] | None = None
        self._anchored = 0.0
        self.bracket_s = 0.0
        """How far the last anchor's wall clock may be off (half its bracket)."""

    def _take_anchor(self) -> tuple[torch.cuda.Event, float]:
        best: tuple[float, torch.cuda.Event, float] | None = None
        for _ in range(_ANCHOR_TRIES):
            event = torch.cuda.Event(enable_timing=True)
            before = time.time()
            event.record(self._stream)
            event.synchronize()
            after = time.time()
            if best is None or after - before < best[0]:
                best = (after - before, event, (before + after) / 2)
            if after - before <= ANCHOR_BRACKET_S:
                break
        assert best is not None
        self.bracket_s = best[0] / 2
        return best[1], best[2]

    def stamp(self, stream: torch.cuda.Stream | None = None) -> Stamp:
        """A stamp after the work queued so far on ``stream`` (default: the current one)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return Stamp(event, self)

    def wall(self, event: torch.cuda.Event) -> float:
        """Wall-clock seconds of a completed timing event of this device."""
        with self._lock:
            now = time.monotonic()
            if self._anchor is None or now - self._anchored > REANCHOR_S:
                self._anchor, self._anchored = self._take_anchor(), now
            anchor, at = self._anchor
        return at + anchor.elapsed_time(event) / 1e3


_clocks: dict[int, DeviceClock] = {}
_clocks_lock = threading.Lock()


def clock_for(device: torch.device) -> DeviceClock:
    """The clock of a CUDA device, made at its first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _clocks_lock:
        clock = _clocks.get(index)
        if clock is None:
            clock = _clocks[index] = DeviceClock(torch.device("cuda", index))
        return clock
