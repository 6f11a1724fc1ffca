"""A whole hand-off started on the caller's thread (the sender's helper; L5).

A hand-off whose pages were reserved (while the forward of its last prompt chunk ran) and are
granted is planned and submitted on the thread that calls ``KVSender.submit`` (vLLM's, as the
forward that wrote its blocks is queued): no hop to the sender's loop before its first byte.
The loop then only waits for its bytes and sends TransferDone.

Where the reservation named the blocks the hand-off will send (``KVSender.reserve(blocks=)``),
each lane's launch is laid out when its pages are granted (:meth:`Launcher.prepare`, on the
sender's loop, while the forward runs: the plan, its checks and, on cuda_ipc, the copy kernel's
parameters and the landing signal), and the caller's thread only starts it
(``Transport.submit_prepared``): NIXL's pattern, descriptors prepared once and posted later. A
hand-off that sends other blocks than those, or whose link was re-made since, is planned anew.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmcache_pd import protocol as P
from lmcache_pd.errors import PeerLost
from lmcache_pd.handoff import Handoff, SendSpec
from lmcache_pd.layout import RangePlan, blocks_for_tokens
from lmcache_pd.node.lanes import LaneIO
from lmcache_pd.node.peer import Grant
from lmcache_pd.node.reservations import Grants, Reservations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launched:
    """A hand-off planned and submitted on the caller's thread: its grants, and per lane
    submitted, the grant, its plan and the batch's handle."""

    grants: tuple[Grant, ...]
    lanes: tuple[tuple[Grant, RangePlan, object], ...]
    t0: float
    started_at: float
    """Wall clock at the launch (the first byte's mark where the transport stamps none)."""
    error: str = ""
    """A lane could not be submitted after others were: the hand-off fails (on the loop)."""
    prepared: int = 0
    """Lanes started from the launch prepared at their grant."""


@dataclass(frozen=True)
class _Ahead:
    """What :meth:`Launcher.prepare` laid out: the blocks it planned, per grant its plan and the
    transport's prepared submit."""

    blocks: tuple[int, ...]
    lanes: tuple[tuple[Grant, RangePlan, object], ...]


class Launcher:
    def __init__(self, io: LaneIO, reserved: Reservations, block_size: int):
        self.io = io
        self.reserved = reserved
        self.block_size = block_size

    def _plan(self, grant: Grant, blocks: tuple[int, ...], n_pages: int) -> tuple[int, RangePlan]:
        """The transport's peer of this lane and its plan: our blocks -> its pages (or blocks)."""
        dest, layout, to, first = grant.target()
        return dest, grant.peer.plan(self.io.kv, layout, blocks=blocks[first:n_pages], to=to)

    def _one_group(self, grants: Grants, n_blocks: int, n_pages: int) -> bool:
        """Every lane goes as one batch (not streamed in groups) and has the blocks it needs."""
        return bool(grants) and n_blocks >= n_pages and all(
            g.skip + len(g.pages) == n_pages and len(self.io.group_ends(len(g.pages))) == 1 for g in grants)

    # --- the sender's loop, once the pages are granted -------------------------------------
    def prepare(self, h: Handoff, grants: Grants, blocks: tuple[int, ...]) -> _Ahead | None:
        """Each lane's launch laid out (None: the transport prepares nothing, or it cannot go
        as one batch a lane; the caller's thread then plans it as usual)."""
        n_pages = blocks_for_tokens(h.num_tokens, self.block_size)
        if (not self.io.transport.capabilities.prepares or self.io.region < 0
                or not self._one_group(grants, len(blocks), n_pages)):  # (no plan made for nothing)
            return None
        lanes = []
        try:
            for grant in grants:
                dest, plan = self._plan(grant, blocks, n_pages)
                prepared = self.io.transport.prepare_submit(dest, self.io.region, plan, signal=grant.signal())
                if prepared is None:
                    return None
                lanes.append((grant, plan, prepared))
        except Exception:  # noqa: BLE001 - e.g. its link was dropped meanwhile: the hand-off plans anew
            log.debug("hand-off %s not prepared at its grant", h.transfer_id, exc_info=True)
            return None
        return _Ahead(tuple(blocks), tuple(lanes))

    # --- the caller's thread ------------------------------------------------------------
    def launch(self, spec: SendSpec, ready: torch.cuda.Event | None) -> Launched | None:
        """Plan (or take as prepared) and submit a one-group hand-off whose reserved pages are
        granted, now, on every lane. None when it cannot go this way (not reserved or granted
        yet, several groups, no lane, an error before any submit): the sender's loop then does
        every step."""
        transport = self.io.transport
        if ready is not None and not transport.capabilities.stream_ordered:
            return None  # the loop waits for the forward's event first
        tid = spec.handoff.transfer_id
        n_pages = blocks_for_tokens(spec.handoff.num_tokens, self.block_size)
        taken = self.reserved.take_prepared(tid)
        if taken is None:
            return None
        grants, ahead = taken
        if not self._one_group(grants, len(spec.block_ids), n_pages):
            self.reserved.put_back(tid, grants)  # the loop's steps refuse it, or stream it, as usual
            return None
        prepared = (ahead.lanes if isinstance(ahead, _Ahead) and ahead.blocks == tuple(spec.block_ids)
                    and len(ahead.lanes) == len(grants) and all(lane[0] is g for lane, g in zip(ahead.lanes, grants))
                    else ())
        t0, started_at = time.monotonic(), time.time()
        lanes: list[tuple[Grant, RangePlan, object]] = []
        from_prepared = 0
        for i, grant in enumerate(grants):
            ticket = P.ticket(tid, grant.generation)
            try:
                handle = None
                if prepared:
                    try:
                        plan = prepared[i][1]
                        handle = transport.submit_prepared(prepared[i][2], self.io.data_s, ready, ticket=ticket)
                        from_prepared += 1
                    except PeerLost:  # its link was re-made since it was prepared: plan anew
                        prepared = ()
                if handle is None:
                    dest, plan = self._plan(grant, spec.block_ids, n_pages)
                    signal = grant.signal()
                    last = {"signal": signal} if signal is not None else {}
                    handle = transport.submit(dest, self.io.region, plan, timeout_s=self.io.data_s, after=ready,
                                              ticket=ticket, **last)
            except Exception as e:  # noqa: BLE001 - e.g. the link was re-made meanwhile: the loop's steps say why
                log.debug("hand-off %s not launched on the caller's thread", tid, exc_info=True)
                if not lanes:
                    self.reserved.put_back(tid, grants)
                    return None
                return Launched(grants, tuple(lanes), t0, started_at,
                                error=f"lane to rank {grant.peer.rank} not submitted: {e!r}", prepared=from_prepared)
            lanes.append((grant, plan, handle))
        return Launched(grants, tuple(lanes), t0, started_at, prepared=from_prepared)
