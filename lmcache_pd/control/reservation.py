"""What the decode's page pool holds per hand-off (L4): a :class:`Reservation` (its pages,
state, lease, writers and readers, what has landed) and the pool's :class:`PoolStats`. The
pool (allocator.py) changes them under its lock; readers outside it hold snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcache_pd._types import PageIdx, ReservationState, TransferId
from lmcache_pd.handoff import Handoff


@dataclass
class Reservation:
    claim: Handoff
    """The hand-off as the prefill's Allocate described it (``peer``: the prefill instance):
    the decode's own load must name the same token count and prompt digest."""
    pages: list[PageIdx]
    owner: str
    state: ReservationState
    lease_deadline: float
    num_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    landed: int = 0
    """Pages ``pages[:landed]`` hold their final bytes (all of them once READY)."""
    readers: int = 0
    ended: bool = False
    freed: bool = False
    skip_pages: int = 0
    """Leading blocks of the prompt the decode side supplies from its own cache tiers: the
    pages cover the blocks after them."""
    generation: int = 0

    @property
    def transfer_id(self) -> TransferId:
        return self.claim.transfer_id
    """New for every reservation of this pool: data batches name it with the transfer id."""
    writers: int = 0
    """Data batches being written into its pages now (admitted by ``begin_write``)."""
    digest: int | None = None
    """What the prefill said the pages hold (TransferDone, ``integrity.verify``)."""
    held_until: float = 0.0
    """Ended while being written by a transport the receiver cannot gate: its pages stay out of
    use until then, or until the owner confirms it stopped."""
    signals: bool = False
    """Its writer ends its last batch with the reservation's landing signal (Allocate)."""
    signaled: bool = False
    """Claimed on the proof of its landing signal (``claim_signaled``), before TransferDone."""
    direct: tuple[int, ...] = ()
    """A direct hand-off: the consumer's own blocks (vLLM's) for the last ``len(direct)``
    pages, which its writer fills instead of those pages (Allocated.blocks); fixed at reserve,
    so the consumer never scatters pages nobody wrote. Such a reservation takes no pool page:
    its ``pages`` are places past the pool (``num_pages + i``), never written or read."""
    layers_landed: frozenset[int] = frozenset()
    """Layers whose every page holds its final bytes, seen landing by the data plane (a
    transport that gates each batch, tcp): the loader may scatter them before TransferDone.
    Replaced, never changed in place: a reader holds a snapshot."""
    pages_landed: dict[int, set[PageIdx]] = field(default_factory=dict)
    """Per layer not landed yet, the pages landed so far (a chunked prompt's layer comes in
    one batch per chunk); the pool's lock guards it."""
    senders: int = 1
    """Writers this reservation expects: prefill ranks of a wider TP, each writing its own KV
    heads into the same pages (heads.senders_of). READY once every one marked it done."""
    cowriters: tuple[str, ...] = ()
    """The writers that joined after ``owner`` (:meth:`PagePool.join`)."""
    done_by: frozenset[str] = frozenset()
    """Writers whose TransferDone came."""
    sections: tuple[tuple[int, int], ...] = ()
    """With several writers: ``(first head, how many)`` of the decode rank's heads each writes,
    each into its own section of every run of consecutive pages (heads.page_sections), which
    the scatter reads them from (heads.plan_sections). Empty: whole pages, the pool's layout."""
    summed: bool = False
    """Its writers digest what they write with the additive formula (digests.plan_sum; a prefill of
    another TP size): ``digest`` is the sum of theirs, mod 2**64."""
    unconfirmed: frozenset[str] = frozenset()
    """Ended while being written: the writers that may still write until they confirm they
    stopped (their Cancel) or the quarantine passes."""

    def writes(self, owner: str) -> bool:
        """``owner`` is one of this reservation's writers."""
        return owner == self.owner or owner in self.cowriters


@dataclass(frozen=True)
class PoolStats:
    num_pages: int
    free_pages: int
    allocated: int
    ready: int
    consuming: int
    expired_total: int
    aborted_total: int
