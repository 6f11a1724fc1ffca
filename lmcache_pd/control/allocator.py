"""Decode-side page allocator: reservations, page states and leases (L4; no sockets).

Life of a reservation (one per hand-off, named by its transfer id):
  1. ``reserve`` takes all its pages at once, or none (no partial holds, so concurrent large
     requests cannot deadlock); a request larger than the whole pool is refused at once.
  2. ALLOCATED: the prefill side is writing. Its lease is renewed by heartbeats.
  3. ``mark_ready`` when the prefill side reports the write complete: READY. Before this only
     *landed* pages may be read (``mark_landed``: the first pages of a streamed hand-off), and
     only inside ``begin_read``/``end_read``; ``claim`` refuses.
  4. ``claim`` by the consumer (the decode worker): CONSUMING; never expires while claimed.
     ``claim_signaled`` claims it before READY when its landing signal, written by the
     writer after its bytes (transport/landing.py), proved them in (its TransferDone then finds the
     reservation consumed, and is answered as done).
  5. ``release`` returns the pages. ``abort`` and lease expiry also return them.
A reader guard (``begin_read``) defers the return of pages that the consumer is copying from:
an abort or expiry meanwhile ends the reservation at once, but its pages go back to the free
list only at the last ``end_read``, so a new hand-off never overwrites them mid-copy.
Writers are guarded the same way, so that no byte of an ended hand-off lands in pages that went
to another: a transport that sees each batch (tcp) admits it only with ``begin_write``, which
names the transfer id, its generation (new per reservation) and the owner, and accepts only
the pages of that live reservation in ALLOCATED; its pages come back at the last
``end_write``. A transport that writes without the receiver's help (cuda_ipc, nixl) cannot be
gated: the pages of a reservation ended while ALLOCATED stay out of use (quarantine) until the
owner confirms that it stopped (its Cancel, ``confirm_end``) or ``quarantine_s`` passes.
The owner is told of every such end (``take_notices``: the control server sends Ended).
Ended reservations leave a tombstone for ``tombstone_s`` so that late messages and late
consumers get a definite answer (ABORTED/EXPIRED) instead of waiting for their deadline.
A decode rank whose KV heads come from several prefill ranks (a prefill of a wider TP,
heads.py) has one reservation per hand-off with several writers: the first writer's Allocate
reserves (``senders``: how many will write), each other one joins it (``join``) and writes its own
heads into the same pages; the reservation is READY when every writer has marked it done, and
any writer's Cancel, or its session's end, ends it for all (the others are told: Ended).
Time is passed in (``now``) so that tests control it; the lock makes the pool safe to share
between the control-plane thread and the decode loader thread.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable

from lmcache_pd._types import PageIdx, ReservationState, TransferId
from lmcache_pd.control.reservation import PoolStats, Reservation
from lmcache_pd.errors import PoolExhausted, TransferError
from lmcache_pd.handoff import Handoff


class PagePool:
    def __init__(self, num_pages: int, *, lease_s: float, tombstone_s: float | None = None,
                 quarantine_s: float = 0.0):
        """``quarantine_s``: how long the pages of a reservation ended while being written stay
        out of use without the owner's confirmation; 0 when the transport admits every batch
        (tcp: ``begin_write``), else ``timeouts.data_s`` (a sender's transfers end by then)."""
        if num_pages <= 0:
            raise ValueError("the pool needs at least one page (raise pool.size_mib)")
        self.num_pages = num_pages
        self.lease_s = lease_s
        self.quarantine_s = quarantine_s
        self.max_tombstones = max(1024, 16 * num_pages)
        self._generations = itertools.count(1)
        self._notices: list[tuple[str, TransferId, int, str]] = []
        self._held: dict[TransferId, Reservation] = {}  # ended, pages still out of use
        self._now = 0.0  # the latest time passed in (end_read is given none)
        self.tombstone_s = tombstone_s if tombstone_s is not None else 4 * lease_s
        self._free: list[PageIdx] = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2 ...
        self._live: dict[TransferId, Reservation] = {}
        self._ended: dict[TransferId, tuple[Reservation, float]] = {}
        self._expired_total = 0
        self._aborted_total = 0
        self._lock = threading.RLock()  # (a Condition before: reentrant, as it was)
        self._watchers: list[Callable[[], None]] = []

    def watch(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every change of a reservation (the decode loader's wake-up). It runs
        under the pool's lock: it must only signal (set an event), never call back into the pool."""
        self._watchers.append(fn)

    def _changed(self) -> None:
        for fn in self._watchers:
            fn()

    # --- prefill-driven transitions (control plane) ---------------------------------------
    def reserve(self, claim: Handoff, num_pages: int, *, owner: str, now: float,
                skip_pages: int = 0, signals: bool = False, direct: tuple[int, ...] = (),
                senders: int = 1, summed: bool = False,
                sections: tuple[tuple[int, int], ...] = ()) -> list[PageIdx] | None:
        """All ``num_pages`` pages for hand-off ``claim``, or None if they are not free now.
        Raises if it can never fit. ``signals``: its writer ends with the landing signal;
        ``direct``: the consumer's blocks its writer fills instead of the last pages
        (Reservation.direct); ``senders``: writers expected, ``owner`` the first (the others
        :meth:`join`); ``summed``, ``sections``: see Reservation."""
        transfer_id = claim.transfer_id
        with self._lock:
            # First: a known id is refused as such, never as "too large" (whose tombstone would
            # end the reservation of whoever owns that id).
            if transfer_id in self._live or transfer_id in self._ended:
                raise TransferError("transfer id is already known", transfer_id=transfer_id)
            if num_pages > self.num_pages:
                raise PoolExhausted(f"request needs {num_pages} pages but the whole pool has {self.num_pages} "
                                    "(raise pool.size_mib)", too_large=True, transfer_id=transfer_id)
            if num_pages <= 0:
                raise TransferError("a reservation needs at least one page", transfer_id=transfer_id)
            if direct:  # its writer fills the consumer's blocks: no pool page is written, none is
                # taken; its pages are places past the pool's (num_pages + i), one per block, that
                # only name where each block stands (the digest's places), never memory.
                pages = [self.num_pages + i for i in range(num_pages)]
            elif len(self._free) < num_pages:
                return None
            else:
                pages = self._take(num_pages)
            self._live[transfer_id] = Reservation(claim, pages, owner, ReservationState.ALLOCATED, now + self.lease_s,
                                                  skip_pages=skip_pages, signals=signals,
                                                  generation=next(self._generations),
                                                  direct=direct[-num_pages:] if direct else (), senders=senders,
                                                  summed=summed, sections=sections)
            self._changed()
            return pages

    def join(self, claim: Handoff, num_pages: int, *, owner: str, now: float) -> Reservation:
        """Add ``owner`` as a writer of the live reservation of ``claim``'s transfer id, which
        expects more writers than it has: the same instance's Allocate for the same prompt
        (``num_pages``: its blocks, skipped ones included). Raises TransferError otherwise, as
        for any known id."""
        with self._lock:
            r = self._live.get(claim.transfer_id)
            if (r is None or r.state != ReservationState.ALLOCATED or r.writes(owner)
                    or len(r.cowriters) + 1 >= r.senders or num_pages != r.skip_pages + len(r.pages)
                    or (r.claim.peer, r.claim.num_tokens, r.claim.prompt_digest)
                    != (claim.peer, claim.num_tokens, claim.prompt_digest)):
                raise TransferError("transfer id is already known", transfer_id=claim.transfer_id)
            r.cowriters += (owner,)
            r.lease_deadline = now + self.lease_s
            self._changed()
            return r

    def _take(self, n: int) -> list[PageIdx]:
        # Prefer a run of consecutive pages (fewer transfer ranges), else the lowest free ones.
        self._free.sort(reverse=True)
        asc = self._free[::-1]
        for i in range(len(asc) - n + 1):
            if asc[i + n - 1] - asc[i] == n - 1:
                run = asc[i:i + n]
                taken = set(run)
                self._free = [p for p in self._free if p not in taken]
                return run
        return [self._free.pop() for _ in range(n)]

    def mark_ready(self, transfer_id: TransferId, *, owner: str, num_bytes: int, seconds: float,
                   now: float, digest: int | None = None) -> None:
        with self._lock:
            r = self._live.get(transfer_id) or self._ended.get(transfer_id, (None, 0.0))[0]
            if r is not None and r.signaled and r.owner == owner:  # consumed already, on its signal
                r.num_bytes, r.seconds = num_bytes, seconds
                return
            r = self._owned(transfer_id, owner)
            if r.state != ReservationState.ALLOCATED or owner in r.done_by:
                raise TransferError(f"cannot mark ready in state {r.state.name}", transfer_id=transfer_id)
            r.done_by = r.done_by | {owner}
            r.num_bytes, r.seconds = r.num_bytes + num_bytes, max(r.seconds, seconds)
            if not r.summed or len(r.done_by) == 1:
                r.digest = digest
            elif r.digest is not None:  # (one writer without a digest: none to check)
                r.digest = None if digest is None else (r.digest + digest + 2**63) % 2**64 - 2**63
            if len(r.done_by) < r.senders:  # the other writers' heads are still to come
                r.lease_deadline = now + self.lease_s
                return
            r.state = ReservationState.READY
            r.landed = len(r.pages)
            r.lease_deadline = now + self.lease_s  # now the consumer has lease_s to claim it
            self._changed()

    def mark_landed(self, transfer_id: TransferId, *, owner: str, pages: int = 0, layers: Iterable[int] = (),
                    num_layers: int = 0, now: float) -> None:
        """The first ``pages`` pages hold their bytes, every layer (a streamed hand-off), or
        ``layers`` (each in ``[0, num_layers)``) hold theirs in every page (a layered hand-off
        written one-sided: the writer says so); also renews the lease."""
        layers = frozenset(layers)
        with self._lock:
            r = self._owned(transfer_id, owner)
            if r.state != ReservationState.ALLOCATED:
                raise TransferError(f"cannot mark pages landed in state {r.state.name}", transfer_id=transfer_id)
            if r.senders > 1:  # one writer's heads landed: the page is not whole until all did
                r.lease_deadline = now + self.lease_s
                return
            if layers:
                if pages or r.landed:
                    raise TransferError("landed layers and landed pages in one hand-off", transfer_id=transfer_id)
                if min(layers) < 0 or max(layers) >= num_layers:
                    raise TransferError(f"landed layers outside [0, {num_layers})", transfer_id=transfer_id)
                r.layers_landed = r.layers_landed.union(layers)
            elif not r.landed <= pages <= len(r.pages) or (pages and r.layers_landed):
                raise TransferError(f"landed pages {pages} outside [{r.landed}, {len(r.pages)}]",
                                    transfer_id=transfer_id)
            else:
                r.landed = pages
            r.lease_deadline = now + self.lease_s
            self._changed()

    def renew(self, transfer_ids: Iterable[TransferId], *, owner: str, now: float) -> int:
        n = 0
        with self._lock:
            for tid in transfer_ids:
                r = self._live.get(tid)
                if r is not None and r.writes(owner) and r.state in (ReservationState.ALLOCATED, ReservationState.READY):
                    r.lease_deadline = now + self.lease_s
                    n += 1
        return n

    def _owned(self, transfer_id: TransferId, owner: str | None) -> Reservation:
        r = self._live.get(transfer_id)
        if r is None:
            ended = self._ended.get(transfer_id)
            why = f"it ended ({ended[0].state.name})" if ended else "unknown transfer id"
            raise TransferError(why, transfer_id=transfer_id)
        if owner is not None and not r.writes(owner):
            raise TransferError("transfer belongs to another peer", transfer_id=transfer_id)
        return r

    # --- either side ----------------------------------------------------------------------
    def abort(self, transfer_id: TransferId, *, reason: str, now: float, owner: str | None = None) -> bool:
        """End a reservation (prefill cancel, consumer give-up). A tombstone is left even for an
        unknown id: a late ``reserve`` for a hand-off nobody waits for is refused, and a load
        waiting for a hand-off its prefill gave up before allocating ends at once."""
        with self._lock:
            r = self._live.get(transfer_id)
            if r is None:
                if transfer_id not in self._ended:
                    self._ended[transfer_id] = (Reservation(Handoff(transfer_id, "", 0, ""), [], owner or "",
                                                            ReservationState.ABORTED, now, reason=reason), now)
                    self._bound_tombstones()
                return False
            if owner is not None and not r.writes(owner):
                raise TransferError("transfer belongs to another peer", transfer_id=transfer_id)
            # A writer's own Cancel comes after it stopped writing: nothing to hold for it, nothing
            # to tell it (the other writers of a shared reservation are told).
            self._end(r, ReservationState.ABORTED, reason, now, stopped=owner)
            self._aborted_total += 1
            return True

    def confirm_end(self, transfer_id: TransferId, *, owner: str, now: float) -> bool:
        """The owner says it stopped writing an ended reservation (its Cancel after our Ended):
        its held pages may be reused now (once nobody reads or writes them)."""
        with self._lock:
            r = self._held.get(transfer_id)
            if r is None or owner not in r.unconfirmed:
                return False
            r.unconfirmed = r.unconfirmed - {owner}
            if not r.unconfirmed:
                r.held_until = 0.0
            self._free_if_unused(r, now)
            return True

    def abort_writing(self, owner: str, *, reason: str, now: float) -> list[TransferId]:
        """End every reservation ``owner`` is still writing (ALLOCATED): the peer is gone.
        Those it finished (READY, or its part of a shared one) stay for their consumer, until
        their lease."""
        with self._lock:
            gone = [r for r in self._live.values() if r.writes(owner) and owner not in r.done_by
                    and r.state == ReservationState.ALLOCATED]
            for r in gone:
                self._end(r, ReservationState.ABORTED, reason, now, silent=owner)  # its session is gone
                self._aborted_total += 1
            return [r.transfer_id for r in gone]

    def _end(self, r: Reservation, state: ReservationState, reason: str, now: float, *, stopped: str | None = None,
             silent: str | None = None) -> None:
        """``stopped``: a writer known to write no more (its Cancel); ``silent``: one that cannot
        be told (its session is gone) but may still write."""
        del self._live[r.transfer_id]
        r.ended = True
        if r.state == ReservationState.ALLOCATED:  # writers that did not finish may still be writing
            still = frozenset(w for w in (r.owner, *r.cowriters) if w != stopped and w not in r.done_by)
            if still and self.quarantine_s > 0:
                r.held_until, r.unconfirmed = now + self.quarantine_s, still
            for w in sorted(still - {silent}):
                self._notices.append((w, r.transfer_id, r.generation, reason))
            del self._notices[:-4096]  # the server drains them every turn; never unbounded
        r.state, r.reason = state, reason
        self._ended[r.transfer_id] = (r, now)
        self._bound_tombstones()
        self._free_if_unused(r, now)
        self._changed()

    def _bound_tombstones(self) -> None:
        """At most ``max_tombstones``: a flood of Cancels for ids nobody uses must not grow them
        without bound (the oldest go first; held reservations stay until their pages return)."""
        excess = len(self._ended) - self.max_tombstones
        if excess <= 0:  # (the usual case: no pass over every tombstone at each end)
            return
        for tid in [t for t in self._ended if t not in self._held][:excess]:
            del self._ended[tid]

    def _free_if_unused(self, r: Reservation, now: float) -> None:
        """Return an ended reservation's pages once nobody reads or writes them and no write we
        cannot see may still come (else the last end_read/end_write, or expire, returns them)."""
        self._now = max(self._now, now)
        if r.freed or r.readers or r.writers or r.held_until > now:
            if not r.freed:
                self._held[r.transfer_id] = r
            return
        if not r.direct:  # (a direct reservation took no page)
            self._free.extend(r.pages)
        r.freed = True
        self._held.pop(r.transfer_id, None)
        self._changed()

    def take_notices(self) -> list[tuple[str, TransferId, int, str]]:
        """(owner, transfer id, generation, reason) of reservations ended while their owner was
        writing them, since the last call: the control server tells each owner (Ended)."""
        with self._lock:
            out, self._notices = self._notices, []
            return out

    # --- data plane (a transport that sees each batch) --------------------------------------
    def begin_write(self, transfer_id: TransferId, generation: int, *, owner: str,
                    pages: Iterable[PageIdx]) -> Reservation:
        """Admit one data batch into ``pages``: only those of the live reservation the batch
        names, of this owner and generation, while ALLOCATED. Pair with :meth:`end_write`."""
        with self._lock:
            r = self._owned(transfer_id, owner)
            if r.generation != generation:
                raise TransferError(f"generation {generation} is not this reservation's", transfer_id=transfer_id)
            if r.state != ReservationState.ALLOCATED:
                raise TransferError(f"cannot write in state {r.state.name}", transfer_id=transfer_id)
            stray = set(pages).difference(r.pages)
            if stray:
                raise TransferError(f"{len(stray)} page(s) outside the reservation (e.g. {min(stray)})",
                                    transfer_id=transfer_id)
            r.writers += 1
            return r

    def end_write(self, r: Reservation, *, now: float, landed: dict[int, set[PageIdx]] | None = None,
                  broke: str = "") -> None:
        """A batch stopped landing; ``landed``: the pages it landed, by layer (None: it did not
        land). A layer whose every page of ``r`` has landed, in this batch or earlier ones,
        joins ``r.layers_landed``. ``broke``: why the batch stopped part-way (its connection
        broke): a sender never resends a batch, so the hand-off cannot complete, and it ends
        now instead of when the writer's session is found silent (``timeouts.peer_s``)."""
        with self._lock:
            r.writers -= 1
            if broke and not r.ended and r.state == ReservationState.ALLOCATED:
                self._end(r, ReservationState.ABORTED, broke, now)
                self._aborted_total += 1
            if r.ended:
                self._free_if_unused(r, now)
                return
            if r.senders > 1:  # one writer's heads: a page is whole only when every writer's landed
                return
            whole: set[int] = set()
            for layer, pages in (landed or {}).items():
                if layer in r.layers_landed:
                    continue
                have = r.pages_landed.setdefault(layer, set())
                have.update(pages)
                if len(have) == len(r.pages):  # (begin_write admitted only r's pages)
                    whole.add(layer)
                    del r.pages_landed[layer]
            if whole:
                r.layers_landed = r.layers_landed.union(whole)
                self._changed()

    def expire(self, now: float) -> list[TransferId]:
        """Reclaim reservations whose lease passed; drop old tombstones."""
        gone: list[TransferId] = []
        with self._lock:
            for r in list(self._live.values()):
                if r.state != ReservationState.CONSUMING and r.lease_deadline <= now:
                    self._end(r, ReservationState.EXPIRED, f"lease of {self.lease_s:g} s passed (timeouts.lease_s)", now)
                    self._expired_total += 1
                    gone.append(r.transfer_id)
            for r in list(self._held.values()):
                self._free_if_unused(r, now)
            for tid, (_, when) in list(self._ended.items()):
                if now - when > self.tombstone_s and tid not in self._held:
                    del self._ended[tid]
        return gone

    def next_due(self) -> float:
        """The earliest time :meth:`expire` has something to do (inf: nothing until a change):
        a lease that runs out, a quarantine that ends, the oldest tombstone's end. The control
        server sleeps until then (or a change wakes it) instead of looking every 100 ms."""
        with self._lock:
            due = min((r.lease_deadline for r in self._live.values() if r.state != ReservationState.CONSUMING),
                      default=math.inf)
            due = min(due, min((r.held_until for r in self._held.values() if r.held_until > 0), default=math.inf))
            oldest = next(iter(self._ended.values()), None)  # (in the order they ended)
            return min(due, oldest[1] + self.tombstone_s) if oldest is not None else due

    # --- consumer (decode worker) ---------------------------------------------------------
    def lookup(self, transfer_id: TransferId) -> Reservation | None:
        """The live or ended reservation (a snapshot's state may change right after)."""
        with self._lock:
            r = self._live.get(transfer_id)
            if r is None and transfer_id in self._ended:
                r = self._ended[transfer_id][0]
            return r

    def held(self, transfer_id: TransferId) -> bool:
        """An ended reservation whose pages are still out of use: its writer may still write
        (not confirmed stopped, quarantine not over), or someone still reads them."""
        with self._lock:
            return transfer_id in self._held

    def begin_read(self, transfer_id: TransferId) -> Reservation | None:
        """Guard a read of landed pages while the reservation is still being written (or READY).

        Returns the live reservation (read ``landed`` from it), or None if it is not live or
        already claimed. Every non-None result must be paired with :meth:`end_read`.
        """
        with self._lock:
            r = self._live.get(transfer_id)
            if r is None or r.state not in (ReservationState.ALLOCATED, ReservationState.READY):
                return None
            r.readers += 1
            return r

    def end_read(self, r: Reservation) -> None:
        with self._lock:
            r.readers -= 1
            if r.ended:
                self._free_if_unused(r, self._now)

    def claim(self, transfer_id: TransferId) -> Reservation:
        with self._lock:
            r = self._owned(transfer_id, None)
            if r.state != ReservationState.READY:
                raise TransferError(f"pages are not ready ({r.state.name})", transfer_id=transfer_id)
            r.state = ReservationState.CONSUMING
            return r

    def claim_signaled(self, transfer_id: TransferId, generation: int) -> Reservation | None:
        """Claim a reservation whose bytes its landing signal proved in (its writer wrote
        ``generation`` after them), READY or not yet: CONSUMING. None if it is no longer
        live as that generation: it ended meanwhile, so its pages may have gone to another
        hand-off, and what was read from them is not to be trusted."""
        with self._lock:
            r = self._live.get(transfer_id)
            if r is None or r.generation != generation or r.state not in (ReservationState.ALLOCATED,
                                                                           ReservationState.READY):
                return None
            # No watcher is told: only the loader claims (it needs no wake-up of its own), and the
            # control server has nothing to do for a claim (a free returns the pages, and tells).
            r.state, r.signaled, r.landed = ReservationState.CONSUMING, True, len(r.pages)
            return r

    def consuming(self, transfer_id: TransferId) -> bool:
        """Still claimed (live, CONSUMING): nothing ended it since the claim, so no page of it went
        to another hand-off."""
        with self._lock:
            r = self._live.get(transfer_id)
            return r is not None and r.state == ReservationState.CONSUMING

    def free(self, transfer_id: TransferId, *, now: float) -> None:
        """Return a claimed reservation's pages (consumed)."""
        with self._lock:
            r = self._owned(transfer_id, None)
            if r.state != ReservationState.CONSUMING:
                raise TransferError(f"release of an unclaimed reservation ({r.state.name})", transfer_id=transfer_id)
            self._end(r, ReservationState.CONSUMING, "consumed", now)

    def stats(self) -> PoolStats:
        with self._lock:
            states = [r.state for r in self._live.values()]
            return PoolStats(self.num_pages, len(self._free), states.count(ReservationState.ALLOCATED),
                             states.count(ReservationState.READY), states.count(ReservationState.CONSUMING),
                             self._expired_total, self._aborted_total)

    @property
    def free_pages(self) -> int:
        with self._lock:
            return len(self._free)
