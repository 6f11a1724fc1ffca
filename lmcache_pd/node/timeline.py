"""Where each hand-off's time goes: the phases of its timeline, as Prometheus histograms (L5).

Every ended hand-off carries wall-clock marks (``time.time()``, one clock per machine, so the
two ends of a hand-off on one machine compare directly): the prefill's ``SendResult`` and the
decode's ``LoadResult``. This module turns them into the phases below, observed into
``lmcache_pd_handoff_phase_seconds{role, phase}`` for the worker's ``/metrics``; the marks
themselves go to the hand-off log (``handoff_log``). On a GPU the marks of the forward's end (a
layered hand-off's, and a whole one's sent as that forward ends) and of cuda_ipc's first and
last byte are the GPU's own (timing events read in the
wall clock, ``device_clock.py``), not when the host queued or learned of them: the host returns
from vLLM's forward call while its kernels still run, so host marks make the transfer look less
hidden than it is.

Prefill phases (a mark of 0 means "never reached"; that phase is not observed):
  - ``after_compute``: the prefill's forward over the last prompt chunk done (``computed_at``,
    when vLLM's scheduler saw the request finish) -> the hand-off taken up by the sender;
  - ``pages``: taken up -> decode pages granted (0 when reserved ahead and already granted);
  - ``transfer``: first byte submitted -> last byte in the decode pool;
  - ``exposed``: forward done -> last byte in the pool: the part of the transfer *not* hidden
    under the prefill's compute (0 when all of it is);
  - ``done``: last byte in the pool -> TransferDone acknowledged;
  - ``layers`` (layered only): the last chunk's first layer handed to the transport -> its last
    one (each layer's own mark is in the hand-off log, ``layers_sent_at``).
Decode phases:
  - ``wait``: the decode asked for the KV (its request scheduled) -> every page in the pool;
  - ``scatter``: every page in the pool -> the KV in vLLM's blocks;
  - ``first_token``: the KV in vLLM's blocks -> the end of the step that computed the request's
    first token on the decode (observed separately, ``Timeline.observe_span``, once that step ran).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Histogram

if TYPE_CHECKING:  # (a type only: the benchmarks read this module without torch's import)
    from lmcache_pd.device_clock import Stamp

PREFILL_PHASES = ("after_compute", "pages", "transfer", "exposed", "done", "layers")
DECODE_PHASES = ("wait", "scatter", "first_token")
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


async def forward_end(stamp: Stamp | None, host_end: float, wait_s: float) -> float:
    """When a forward ended: on a GPU the time of ``stamp`` (recorded after its kernels) once the
    GPU passed it, waited for up to ``wait_s``; else ``host_end``, the host's return from it."""
    if stamp is not None:
        deadline = time.monotonic() + wait_s
        while not stamp.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.0002)
        if stamp.done():
            return stamp.wall()
    return host_end


def _span(start: float, end: float) -> float | None:
    return max(0.0, end - start) if start and end else None


def prefill_phases(r: Any) -> dict[str, float]:
    """A prefill ``SendResult``'s phases in seconds (only those whose marks it has)."""
    spans = {
        "after_compute": _span(r.computed_at, r.started_at),
        "pages": _span(r.started_at, r.granted_at),
        "transfer": _span(r.first_byte_at, r.last_byte_at),
        "exposed": _span(r.computed_at, r.last_byte_at),
        "done": _span(r.last_byte_at, r.done_at),
    }
    sent = [t for t in getattr(r, "layers_sent_at", ()) if t]
    if sent:
        spans["layers"] = _span(min(sent), max(sent))
    return {k: v for k, v in spans.items() if v is not None}


def hidden_fraction(r: Any) -> float | None:
    """The fraction of a hand-off's transfer (first to last byte) that ran before the prefill's
    forward finished; None without the marks."""
    if not (r.first_byte_at and r.last_byte_at and r.computed_at):
        return None
    total = r.last_byte_at - r.first_byte_at
    if total <= 0:
        return 1.0 if r.last_byte_at <= r.computed_at else 0.0
    return min(1.0, max(0.0, min(r.last_byte_at, r.computed_at) - r.first_byte_at) / total)


def decode_phases(r: Any) -> dict[str, float]:
    """A decode ``LoadResult``'s phases in seconds (only those whose marks it has)."""
    spans = {"wait": _span(r.submitted_at, r.ready_at), "scatter": _span(r.ready_at, r.done_at)}
    return {k: v for k, v in spans.items() if v is not None}


class Timeline:
    """The phase histograms of one worker: register ``collector`` in a registry. Built by
    :meth:`prefill` or :meth:`decode` (the role is chosen once, there)."""

    def __init__(self, role: str, phases: Callable[[Any], dict[str, float]], names: tuple[str, ...]):
        self.role = role
        self._phases = phases
        self.collector = Histogram("lmcache_pd_handoff_phase_seconds",
                                   "Time of each phase of the hand-offs that succeeded (node/timeline.py)",
                                   ["role", "phase"], registry=None, buckets=BUCKETS)
        for phase in names:
            self.collector.labels(role, phase)  # every phase shown from the start, count 0

    @classmethod
    def prefill(cls) -> Timeline:
        return cls("prefill", prefill_phases, PREFILL_PHASES)

    @classmethod
    def decode(cls) -> Timeline:
        return cls("decode", decode_phases, DECODE_PHASES)

    def observe_span(self, phase: str, start: float, end: float) -> None:
        """One phase whose marks come after the hand-off's result (the decode's first token)."""
        seconds = _span(start, end)
        if seconds is not None:
            self.collector.labels(self.role, phase).observe(seconds)

    def observe(self, result: Any) -> None:
        if not result.ok:
            return
        for phase, seconds in self._phases(result).items():
            self.collector.labels(self.role, phase).observe(seconds)
