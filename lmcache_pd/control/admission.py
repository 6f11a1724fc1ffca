"""Which Allocates get pages now, which wait, and which are held for a decode's blocks (L4).

The control server (server.py) owns the socket and the sessions; every Allocate it admits goes
through :class:`Admission`, on the server's thread:
  - granted at once when no earlier Allocate waits (FIFO: nobody overtakes a queued one), or when
    it takes no pool page (a direct hand-off whose decode blocks are known, ``transport.direct``);
  - else queued, at most ``backpressure.decode_queue`` of them, each until its own ``wait_s``
    (``timeouts.alloc_s`` on the prefill side, capped here) and served in order as pages return;
  - a direct hand-off whose decode request is on its way (``Allocate.decode_sent``) but not
    scheduled yet is *parked* up to ``timeouts.direct_wait_s`` for its blocks, then granted
    blocks or pages.
The leading pages the decode's own cache holds (``PrefixHolder``) are asked once per Allocate
and released whenever it is refused, so a refused hand-off holds nothing.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from lmcache_pd import protocol as P
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.server_stats import PrefixHolder, ServerStats
from lmcache_pd.control.session import Session
from lmcache_pd.errors import PDError, PoolExhausted, TransferError
from lmcache_pd.handoff import Handoff

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    """An Allocate not answered yet: queued for pages, or parked for its blocks."""

    identity: bytes
    msg: P.Allocate
    owner: str
    deadline: float
    skip: int | None
    """Pages the decode's cache holds; None: it was not asked (nothing to release)."""


Answer = tuple[Waiting, P.Message]
"""A waiting Allocate and its answer, for the server to send in the Allocate's session."""


class Admission:
    def __init__(self, pool: PagePool, stats: ServerStats, *, session_of: Callable[[bytes], Session | None],
                 prefix: PrefixHolder, blocks: P.BlocksRegion | None,
                 direct: Callable[[str, int], tuple[int, ...]], direct_wait_s: float,
                 max_waiting: int, max_alloc_wait_s: float):
        """``session_of``: the live session of a control identity; ``blocks``/``direct``/
        ``direct_wait_s``: as ControlServer's (``transport.direct``); ``max_waiting``:
        ``backpressure.decode_queue``; ``max_alloc_wait_s``: the longest any Allocate waits."""
        self.pool = pool
        self.stats = stats
        self.session_of = session_of
        self.prefix = prefix
        self.blocks = blocks
        self.direct = direct
        self.direct_wait_s = direct_wait_s
        self.max_waiting = max_waiting
        self.max_alloc_wait_s = max_alloc_wait_s
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.parked: dict[str, Waiting] = {}  # transfer id -> an Allocate held for its blocks

    # --- an Allocate comes ------------------------------------------------------------------
    def admit(self, identity: bytes, owner: str, msg: P.Allocate, now: float) -> P.Message | None:
        """The answer to ``msg`` now (Allocated), or None when it waits (queued or parked); raises
        PoolExhausted or TransferError for :meth:`refused`."""
        if self._park(identity, owner, msg, now):
            return None  # answered by answer_parked, with the blocks or at direct_wait_s
        return self._allocate(identity, owner, msg, now)

    def refused(self, msg: P.Allocate | P.TransferDone | P.Cancel | P.Heartbeat, owner: str, now: float,
                e: PoolExhausted | TransferError) -> P.Error:
        """The answer to a request refused with ``e`` (any request of a session)."""
        if isinstance(e, PoolExhausted):
            # Leave a tombstone: the decode request for this hand-off recomputes at once. (An id
            # someone else owns was refused before this as already known.)
            self.pool.abort(msg.transfer_id, reason=str(e), now=now, owner=owner)
            code = P.ErrorCode.POOL_TOO_SMALL if e.too_large else P.ErrorCode.POOL_TIMEOUT
            return P.Error(msg_id=msg.msg_id, code=code, message=str(e))
        self.stats.rejected += 1
        return P.Error(msg_id=msg.msg_id, code=P.ErrorCode.BAD_STATE, message=str(e))

    def withdraw(self, transfer_id: str, owner: str) -> bool:
        """The owner canceled a hand-off whose Allocate still waits: True if one did."""
        return self._drop_waiting(transfer_id, owner) or self._unpark(transfer_id, owner)

    def drop_owner(self, owner: str, why: str, now: float) -> None:
        """The owner's session ended: its waiting Allocates go, each leaving a tombstone (its
        load recomputes at once)."""
        for w in [w for w in (*self.waiting, *self.parked.values()) if w.owner == owner]:
            self.withdraw(w.msg.transfer_id, owner)
            self.release(w.msg.transfer_id, w.skip is not None)
            self.pool.abort(w.msg.transfer_id, reason=why, now=now)

    def release(self, transfer_id: str, asked: bool = True) -> None:
        if asked:
            self.prefix.release(transfer_id)

    # --- the server's housekeeping -----------------------------------------------------------
    def answer_parked(self, now: float) -> list[Answer]:
        """Each held Allocate whose blocks are known now, or whose wait is over (pages)."""
        out: list[Answer] = []
        for tid, w in list(self.parked.items()):
            if now < w.deadline and not self.direct(tid, w.msg.num_pages):
                continue
            del self.parked[tid]
            try:
                reply = self._allocate(w.identity, w.owner, w.msg, now)
            except (PoolExhausted, TransferError) as e:
                reply = self.refused(w.msg, w.owner, now, e)
            if reply is not None:
                out.append((w, reply))
        return out

    def next_due(self) -> float:
        """When :meth:`serve_queue` must look again with no page returned: the head of the queue
        times out (only the head: the queue is served in order). inf: nothing queued."""
        return self.waiting[0].deadline if self.waiting else math.inf

    def serve_queue(self, now: float) -> list[Answer]:
        """The queued Allocates in order: refused past their deadline, granted while pages last."""
        out: list[Answer] = []
        while self.waiting:
            w = self.waiting[0]
            if w.deadline <= now:
                self.waiting.popleft()
                self.stats.alloc_timeouts += 1
                self.release(w.msg.transfer_id, w.skip is not None)
                self.pool.abort(w.msg.transfer_id, reason="decode pool stayed full (timeouts.alloc_s)", now=now)
                out.append((w, P.Error(
                    msg_id=w.msg.msg_id, code=P.ErrorCode.POOL_TIMEOUT,
                    message=f"decode pool stayed full for {w.msg.wait_s:g} s (timeouts.alloc_s; or raise pool.size_mib)")))
                continue
            try:
                pages = self._reserve(w.identity, w.msg, w.owner, w.skip or 0, now)
            except TransferError as e:
                self.waiting.popleft()
                self.release(w.msg.transfer_id, w.skip is not None)
                out.append((w, P.Error(msg_id=w.msg.msg_id, code=P.ErrorCode.BAD_STATE, message=str(e))))
                continue
            if pages is None:
                break
            self.waiting.popleft()
            out.append((w, self._allocated(w.msg, pages, w.skip or 0)))
        return out

    # --- inside ----------------------------------------------------------------------------
    def _park(self, identity: bytes, owner: str, msg: P.Allocate, now: float) -> bool:
        """Hold a direct hand-off's Allocate whose decode request is on its way but not scheduled
        yet (its blocks unknown), up to ``direct_wait_s``: True if held."""
        session = self.session_of(identity)
        if not (msg.direct and msg.decode_sent and self.blocks is not None and self.direct_wait_s > 0
                and (session is None or session.same_tp)):
            return False
        if msg.transfer_id in self.parked or self.pool.lookup(msg.transfer_id) is not None:
            raise TransferError("transfer id is already known", transfer_id=msg.transfer_id)
        if self.direct(msg.transfer_id, msg.num_pages):
            return False  # its blocks are known already
        self.parked[msg.transfer_id] = Waiting(identity, msg, owner, now + self.direct_wait_s, None)
        self.stats.direct_waits += 1
        return True

    def _unpark(self, transfer_id: str, owner: str) -> bool:
        w = self.parked.get(transfer_id)
        if w is None or w.owner != owner:
            return False
        del self.parked[transfer_id]
        return True

    def _skip(self, msg: P.Allocate) -> int | None:
        """Leading pages the decode's cache holds (held for the transfer id), or None when it
        was not asked (nothing to release)."""
        if (not msg.chains or msg.num_pages <= 1 or self.pool.lookup(msg.transfer_id)
                or any(w.msg.transfer_id == msg.transfer_id for w in self.waiting)):
            return None  # (a known transfer id is refused or joined below; its hold stays the first one's)
        try:
            skip = self.prefix.hold(msg)
        except Exception:  # noqa: BLE001 - the cache is an optimisation: without it, send everything
            log.exception("control: cache lookup for %s failed; the whole prompt is sent", msg.transfer_id)
            return 0
        return skip if 0 <= skip < msg.num_pages else 0

    def _reserve(self, identity: bytes, msg: P.Allocate, owner: str, skip: int, now: float) -> list[int] | None:
        session = self.session_of(identity)
        claim = Handoff(msg.transfer_id, session.peer if session is not None else "", msg.num_tokens,
                        msg.prompt_digest, tuple(msg.chains), msg.tenant)
        senders = session.senders if session is not None else 1
        if senders > 1 and self.pool.lookup(msg.transfer_id) is not None:  # another rank's heads, same pages
            return self.pool.join(claim, msg.num_pages, owner=owner, now=now).pages
        # Asked before the pool's lock is taken (the loader's lock comes first: loader.py). A
        # load cancelled meanwhile leaves a tombstone, and the reserve is refused.
        same_tp = session is None or session.same_tp
        direct = self.direct(msg.transfer_id, msg.num_pages - skip) if msg.direct and self.blocks and same_tp else ()
        return self.pool.reserve(claim, msg.num_pages - skip, owner=owner, now=now, skip_pages=skip,
                                 signals=msg.signals and senders == 1, direct=direct, senders=senders,
                                 summed=not same_tp, sections=session.sections if session is not None else ())

    def _allocated(self, msg: P.Allocate, pages: list[int], skip: int) -> P.Allocated:
        self.stats.allocations += 1
        r = self.pool.lookup(msg.transfer_id)
        if r is not None and r.direct:
            self.stats.direct += 1
        return P.Allocated(msg_id=msg.msg_id, transfer_id=msg.transfer_id, pages=pages, lease_s=self.pool.lease_s,
                           skip_pages=r.skip_pages if r is not None else skip,  # (a joiner: the first's)
                           generation=r.generation if r is not None else 0,
                           blocks=list(r.direct) if r is not None else [])

    def _allocate(self, identity: bytes, owner: str, msg: P.Allocate, now: float) -> P.Message | None:
        asked = self._skip(msg)
        skip = asked or 0
        pages = None
        try:
            # FIFO: nobody may overtake a queued request, but a direct one takes no page.
            if not self.waiting or self._takes_no_page(identity, msg, skip):
                pages = self._reserve(identity, msg, owner, skip, now)
            elif msg.num_pages - skip > self.pool.num_pages:
                self._reserve(identity, msg, owner, skip, now)  # raises too_large
            if pages is None and len(self.waiting) >= self.max_waiting:
                self.stats.queue_full += 1
                raise PoolExhausted(f"decode pool is full and {len(self.waiting)} allocations already wait "
                                    "(backpressure.decode_queue)", transfer_id=msg.transfer_id)
        except PDError:
            self.release(msg.transfer_id, asked is not None)
            raise
        if pages is not None:
            return self._allocated(msg, pages, skip)
        # NaN compares false both ways: it would never time out.
        wait = min(max(msg.wait_s, 0.0), self.max_alloc_wait_s) if math.isfinite(msg.wait_s) else 0.0
        self.waiting.append(Waiting(identity, msg, owner, now + wait, asked))
        self.stats.queued_allocations += 1
        return None  # answered later by serve_queue

    def _takes_no_page(self, identity: bytes, msg: P.Allocate, skip: int) -> bool:
        """A direct hand-off whose blocks are known now: it is reserved without pool pages."""
        session = self.session_of(identity)
        return bool(msg.direct and self.blocks and (session is None or session.same_tp)
                    and self.direct(msg.transfer_id, msg.num_pages - skip))

    def _drop_waiting(self, transfer_id: str, owner: str) -> bool:
        n = len(self.waiting)
        self.waiting = collections.deque(w for w in self.waiting
                                         if not (w.msg.transfer_id == transfer_id and w.owner == owner))
        return len(self.waiting) < n
