"""A hand-off's transfer, lane by lane (L5): a prefill rank that hands off to a wider decode
sends its KV heads to each decode rank that holds some of them (links.Lane), each with its own
pages, transfer and TransferDone; the hand-off is ok only when every lane is
(docs/tensor_parallel.md). Between equal TP sizes, or to a narrower decode, it has one lane.

:func:`send_lane` is one lane's transfer (whole, in groups of pages: groups.py; or layer by
layer: layered.py, the same pieces feeding every lane). :func:`each` runs one step on every
lane at once, and a lane that fails stops the others (their transfers are released before the
failure is raised, so the Cancel that follows comes after their last byte); with one lane the
step runs inline: no task, no cost on the hand-off's path. :class:`LaneSent` is what one lane's
transfer leaves for TransferDone and the hand-off's result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from lmcache_pd import protocol as P
from lmcache_pd._types import BlockId
from lmcache_pd.digests import cache_digest, plan_sum
from lmcache_pd.handoff import SendSpec
from lmcache_pd.layout import KVLayout, RangePlan
from lmcache_pd.node.groups import send_groups
from lmcache_pd.node.layered import PiecePlans, Pieces, send_layers
from lmcache_pd.node.peer import DecodePeer, Grant
from lmcache_pd.transport import Transport

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaneSent:
    """One lane's bytes are in its decode rank's pool: what TransferDone and the result need."""

    grant: Grant
    plans: list[RangePlan]
    digest: asyncio.Future[int] | None
    span: tuple[float, float]
    """Wall clock of its first and last byte."""
    seconds: float
    """Data-plane time: its first submit until its bytes were in the pool."""
    posted: bool = False
    """Layered: its last chunk went as one batch whose layers the forward's thread posted."""
    layers_at: tuple[float, ...] = ()
    """Layered: when each layer of its last chunk was handed to the transport (layered.send_layers)."""

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.plans)


async def each(steps: Sequence[Awaitable[T]], undo: Callable[[T], Awaitable[None]] | None = None) -> list[T]:
    """Await every step at once, results in order. The first failure cancels the others and
    waits until they stopped, then ``undo`` is awaited for each that had succeeded (e.g. give
    back its pages), and the failure is raised."""
    if len(steps) == 1:
        return [await steps[0]]
    tasks = [asyncio.ensure_future(s) for s in steps]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        if undo is not None:
            for t, out in zip(tasks, outcomes):
                if not t.cancelled() and not isinstance(out, BaseException):
                    await undo(out)
        raise


@dataclass
class LaneIO:
    """What a lane's transfer uses of its sender: the transport, our blocks (``kv``,
    ``kv_buffer``, registered as ``region`` once started), the deadline, the group size,
    ``integrity.verify``, and the sender's ``watch(spec)`` (``check`` and ``failed`` for the
    transfer loops)."""

    transport: Transport
    kv: KVLayout
    kv_buffer: torch.Tensor
    data_s: float
    group_mib: int
    verify: bool
    watch: Callable[[SendSpec], dict]
    landed_on_shared_gpu: bool = False
    post_layers: bool = False
    region: int = -1
    _quiet: set[int] = field(default_factory=set)  # (peers logged by ``quiet``)

    def group_ends(self, n_pages: int) -> tuple[int, ...]:
        """Where each group of a streamed hand-off ends (exclusive page counts, increasing)."""
        per = max(1, (self.group_mib << 20) // self.kv.page_bytes) if self.group_mib else n_pages
        return tuple(min(a + per, n_pages) for a in range(0, n_pages, per))

    def quiet(self, peer: DecodePeer) -> bool:
        """The decode is not told of each layer landed: its pool is on our GPU (once per peer
        logged)."""
        if self.landed_on_shared_gpu or not self.transport.shares_device(peer.peer_id, self.region):
            return False
        if peer.peer_id not in self._quiet:
            self._quiet.add(peer.peer_id)
            log.info("decode %s (rank %d) has its pool on this GPU: its layers are not announced as they land; it "
                     "scatters each hand-off whole, after the forward (transport.landed_on_shared_gpu)",
                     peer.name, peer.rank)
        return True

    def digest(self, blocks: tuple[BlockId, ...], pages: list[int], peer: DecodePeer, ready: torch.cuda.Event | None,
               plans: list[RangePlan]) -> asyncio.Future[int] | None:
        """With ``integrity.verify``: the digest of what a lane sends, computed on a worker thread
        while the transfer runs (after the forward that wrote the blocks): of whole blocks as
        they land in ``pages``, or, between TP sizes, the additive sum over the bytes of
        ``plans`` (the sums of a page's writers add up to the page's: digests.plan_sum)."""
        if not self.verify:
            return None

        def compute() -> int:
            if ready is not None:
                ready.synchronize()
            if peer.heads is not None:
                return (sum(plan_sum(self.kv_buffer, p, peer.pool) for p in plans) + 2**63) % 2**64 - 2**63  # (int64)
            return cache_digest(self.kv, self.kv_buffer, blocks, peer.pool, pages)
        return asyncio.get_running_loop().run_in_executor(None, compute)


async def send_lane(io: LaneIO, spec: SendSpec, grant: Grant, n_pages: int, ready: torch.cuda.Event | None,
                    pieces: Pieces | None, renew: Callable[[], None]) -> LaneSent:
    """One lane's transfer: the hand-off's blocks (between TP sizes, the heads its decode rank
    holds) into the pages granted there, whole or layer by layer (``pieces``)."""
    peer: DecodePeer = grant.peer
    pages = grant.pages
    # Where the bytes go: the decode's pool pages, or (direct) its vLLM blocks for the last
    # pages, the blocks before them not sent (the decode holds them).
    dest, layout, to, first = grant.target()
    digested = pages[len(pages) - len(to):]  # the pages the bytes sent stand for
    ticket = P.ticket(spec.handoff.transfer_id, grant.generation)
    signal = grant.signal()
    t_data = time.monotonic()
    if pieces is None:
        blocks = spec.block_ids[first:n_pages]
        ends = io.group_ends(len(to)) if not grant.blocks else (len(to),)
        plans = [peer.plan(io.kv, layout, blocks=blocks[a:b], to=to[a:b], among=to)
                 for a, b in zip((0, *ends[:-1]), ends)]
        digest = io.digest(blocks, digested, peer, ready, plans)  # reads the blocks while they fly
        span = await send_groups(io.transport, io.region, peer, plans, ends, spec.handoff, ticket=ticket,
                                 data_s=io.data_s, ready=ready, signal=signal, dest=dest, **io.watch(spec))
        return LaneSent(grant, plans, digest, span, time.monotonic() - t_data)
    # Over a one-sided transport the decode learns of each layer landed from us (Landed), to
    # scatter it during the forward; a direct hand-off has nothing to scatter. Nor is it told
    # where its pool shares our GPU: its scatters would stall our forward (landed_on_shared_gpu).
    tell = not (grant.blocks or io.transport.capabilities.admits_writes or io.quiet(peer))
    *span, plans, posted, layers_at = await send_layers(
        io.transport, dest, io.region,
        PiecePlans(io.kv, layout, to, first, plan=functools.partial(peer.plan, among=to),
                   each=functools.partial(peer.plan_layers, among=to)),
        pieces, io.kv.num_layers, data_s=io.data_s, ticket=ticket, signal=signal, renew=renew, **io.watch(spec),
        landed=functools.partial(peer.landed, spec.handoff.transfer_id, 0) if tell else None, post_layers=io.post_layers)
    final = pieces.final
    assert final is not None and len(final.blocks) >= n_pages
    digest = io.digest(final.blocks[first:n_pages], digested, peer, None, plans)  # every layer is computed by now
    return LaneSent(grant, plans, digest, (span[0], span[1]), time.monotonic() - t_data, posted, layers_at)


def layers_sent(lanes: list[LaneSent]) -> tuple[float, ...]:
    """When each layer went, over every lane: the latest lane's (0.0 where none sent it)."""
    return tuple(max(at) for at in zip(*(s.layers_at for s in lanes))) if lanes else ()
