"""Decode pages allocated ahead of their hand-offs (the sender's helper; L5).

The connector reserves a hand-off's pages while the forward that computes the prompt's last
chunk runs (``KVSender.reserve``), so that the Allocate round trip is off the hand-off's path.
A reservation is an asyncio task on the sender's loop that ends with its ``Grants``, one per lane
of the hand-off (node/lanes.py: several when the decode is wider than the prefill); once granted,
the grant is also listed for the caller's thread, which may take it and launch the hand-off at
once (``on_caller.Launcher``; where the reservation named the blocks it will send, with each
lane's launch prepared when the pages were granted). Whoever takes a grant owns it: the caller's thread
(:meth:`Reservations.take_granted`) or the loop (:meth:`Reservations.take`); a give-back
(abort, reservation unused for ``timeouts.transfer_s``, shutdown) returns only a grant nobody
took, so pages a hand-off is writing are never given back under it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from lmcache_pd._types import TransferId
from lmcache_pd.errors import TransferError
from lmcache_pd.handoff import Handoff
from lmcache_pd.node.peer import Grant

Grants = tuple[Grant, ...]
"""A hand-off's pages: one grant per lane (decode rank) it writes to."""


class Reservations:
    def __init__(self, allocate: Callable[[Handoff], Awaitable[Grants]],
                 prepare: Callable[[Handoff, Grants, tuple[int, ...]], object] = lambda h, g, b: None):
        """``allocate``: the pages for a hand-off (the sender's Allocate, its pages tracked);
        ``prepare``: the hand-off's launch laid out once its pages are granted, from the blocks
        it will send (None: nothing prepared)."""
        self._allocate = allocate
        self._prepare = prepare
        self._tasks: dict[TransferId, tuple[float, asyncio.Task[Grants]]] = {}  # loop thread only
        self._granted: dict[TransferId, tuple[Grants, object]] = {}  # either thread, under the lock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tasks)

    # --- the loop thread ----------------------------------------------------------------------
    async def reserve(self, h: Handoff, blocks: tuple[int, ...] | None = None) -> None:
        """Allocate ``h``'s pages (once: a preempted request reaches its last chunk twice);
        ``blocks``: the blocks the hand-off will send, when known (its launch is then prepared)."""
        entry = self._tasks.get(h.transfer_id)
        if entry is None:
            task = asyncio.get_running_loop().create_task(self._granting(h, blocks))
            entry = self._tasks[h.transfer_id] = (time.monotonic(), task)
        await asyncio.shield(entry[1])

    async def _granting(self, h: Handoff, blocks: tuple[int, ...] | None) -> Grants:
        grants = await self._allocate(h)
        ahead = self._prepare(h, grants, blocks) if blocks is not None else None
        with self._lock:
            self._granted[h.transfer_id] = (grants, ahead)
        return grants

    async def take(self, transfer_id: TransferId) -> Grants | None:
        """The hand-off's reserved pages (its allocation's error is raised), or None if it has
        no reservation."""
        entry = self._tasks.pop(transfer_id, None)
        if entry is None:
            return None
        await entry[1]  # its failure is the hand-off's failure (no second wait)
        grants = self.take_granted(transfer_id)
        if grants is None:
            raise TransferError("its reservation was taken by another hand-off of the same id",
                                transfer_id=transfer_id)
        return grants

    def forget(self, transfer_id: TransferId) -> None:
        """The hand-off took its grant on the caller's thread: drop the reservation's task."""
        self._tasks.pop(transfer_id, None)

    async def give_back(self, transfer_id: TransferId, reason: str) -> None:
        """Return a reservation's pages (a queued one stops waiting), unless a hand-off took them."""
        entry = self._tasks.pop(transfer_id, None)
        if entry is not None:
            await self._give_back(entry[1], transfer_id, reason)

    async def _give_back(self, task: asyncio.Task[Grants], transfer_id: TransferId, reason: str) -> None:
        try:
            grants = await task
        except Exception:  # noqa: BLE001 - nothing was granted, nothing to give back
            return
        if self.take_granted(transfer_id) is None:  # its hand-off took it: that one ends it
            return
        for grant in grants:
            grant.peer.untrack(transfer_id)
            await grant.peer.cancel(transfer_id, reason)

    def stale(self, older_than: float) -> list[tuple[TransferId, Awaitable[None]]]:
        """Give-backs of the reservations made before ``older_than`` (monotonic) and not taken:
        to be run in the background (one still queued for pages must not stall the caller)."""
        tids = [t for t, (since, _) in self._tasks.items() if since < older_than]
        return [(t, self._give_back(self._tasks.pop(t)[1], t, "reservation unused")) for t in tids]

    async def close(self, reason: str) -> None:
        for tid, (_since, task) in list(self._tasks.items()):
            if task.done():  # granted (or failed): give the pages back now
                await self.give_back(tid, reason)
            else:  # still queued for pages: stop waiting (the decode side's lease covers a late grant)
                task.cancel()
        self._tasks.clear()

    # --- any thread -----------------------------------------------------------------------------
    def take_granted(self, transfer_id: TransferId) -> Grants | None:
        """Take a granted reservation's pages (None: not granted yet, or taken)."""
        taken = self.take_prepared(transfer_id)
        return taken[0] if taken is not None else None

    def take_prepared(self, transfer_id: TransferId) -> tuple[Grants, object] | None:
        """:meth:`take_granted`, with the launch prepared at the grant (None if none was)."""
        with self._lock:
            return self._granted.pop(transfer_id, None)

    def put_back(self, transfer_id: TransferId, grants: Grants) -> None:
        """Undo :meth:`take_granted` (the caller's thread could not launch the hand-off; what
        was prepared for it is dropped: the loop's steps plan anew)."""
        with self._lock:
            self._granted[transfer_id] = (grants, None)
