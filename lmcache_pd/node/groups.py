"""A whole hand-off's transfer: its groups of pages submitted at once, each announced as it lands (L5).

A hand-off that does not go layer by layer (layered.py) is one plan, or, above
``transport.group_mib``, several groups of pages in prompt order. :func:`send_groups` submits
them all, and as each group (in order) is in the decode pool it tells the decode side with a
one-way Landed, so that the decode side scatters it while the rest is in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lmcache_pd._types import BatchState
from lmcache_pd.errors import TransferTimeout
from lmcache_pd.handoff import Handoff
from lmcache_pd.layout import RangePlan
from lmcache_pd.node.loop import waker, woken

if TYPE_CHECKING:
    from lmcache_pd.node.peer import DecodePeer


def byte_span(handles: list, first_submit_at: float) -> tuple[float, float]:
    """A transfer's first and last byte (wall clock): where the transport stamped every batch
    where its copy ran (cuda_ipc: on the GPU), those stamps; else the first submit, and now (the
    sender learning that the last batch landed)."""
    if handles and all(h.landed_at for h in handles):
        return min(h.began_at for h in handles), max(h.landed_at for h in handles)
    return first_submit_at, time.time()


async def send_groups(transport, region: int, peer: DecodePeer, plans: list[RangePlan], ends: tuple[int, ...],
                      handoff: Handoff, *, ticket: bytes, data_s: float, check: Callable[[], None],
                      failed: Callable[[BatchState, object], None], ready: torch.cuda.Event | None = None,
                      signal: tuple[int, int] | None = None, submitted: list | None = None,
                      dest: int | None = None) -> tuple[float, float]:
    """Submit every group's plan (``ends``: where each group's pages end) and return once all
    are in the peer's pool: the transfer's first and last byte (:func:`byte_span`).

    ``ready``: the forward that wrote the blocks (a stream-ordered transport orders the copy
    after it on the device; else this waits for it). ``submitted``: the groups' handles,
    submitted already (on the caller's thread). ``check`` raises when the hand-off must stop,
    ``failed`` for a batch that ended otherwise than DONE; the bytes must land within
    ``timeouts.data_s`` (named in the error). ``signal``: the landing signal the last batch
    ends with (transport/landing.py). ``dest``: the transport's peer to write to (a direct hand-off's:
    the peer's vLLM blocks); default the peer's pool."""
    loop = asyncio.get_running_loop()
    dest = peer.peer_id if dest is None else dest
    wake = asyncio.Event()
    deadline = time.monotonic() + data_s
    if ready is not None and not transport.capabilities.stream_ordered:
        while not ready.query():  # the forward that wrote the blocks is still running
            check()
            if time.monotonic() > deadline:
                raise TransferTimeout("waiting for the prefill forward", config_field="timeouts.data_s",
                                      seconds=data_s, transfer_id=handoff.transfer_id, peer=handoff.peer)
            await asyncio.sleep(0.0002)
    handles = list(submitted or [])
    first_byte_at = time.time()
    try:
        for handle in handles:
            handle.add_done_callback(waker(loop, wake))
        for i, plan in enumerate(plans if submitted is None else []):
            last = {"signal": signal} if signal is not None and i == len(plans) - 1 else {}
            handle = transport.submit(dest, region, plan, timeout_s=data_s, after=ready, ticket=ticket, **last)
            handle.add_done_callback(waker(loop, wake))
            handles.append(handle)
        landed = 0
        while True:
            wake.clear()
            while landed < len(handles) and (state := transport.poll(handles[landed])).terminal:
                if state != BatchState.DONE:
                    failed(state, handles[landed])
                landed += 1
                if landed < len(handles):
                    await peer.landed(handoff.transfer_id, ends[landed - 1])
            if landed == len(handles):
                return byte_span(handles, first_byte_at)
            check()  # raising releases (so stops) what is still in flight
            if time.monotonic() > deadline:
                raise TransferTimeout("data transfer", config_field="timeouts.data_s", seconds=data_s,
                                      transfer_id=handoff.transfer_id, peer=handoff.peer)
            # Woken by the transport's callback; the short timeout keeps polling transports
            # that make progress only inside poll().
            await woken(wake, 0.005)
    finally:
        for handle in handles:
            handle.close()  # cancels groups still in flight after a failure
