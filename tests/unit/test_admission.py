"""Admission of Allocates on its own (control/admission.py), with an explicit clock and no socket:
the queue's order and deadlines, parked direct Allocates, and what a dropped owner leaves.

Through the server's socket: test_control.py (FIFO, timeouts, holds), test_control_auth.py (the
queue bound), test_direct.py (parked Allocates end to end)."""

from __future__ import annotations

from lmcache_pd import protocol as P
from lmcache_pd._types import ReservationState
from lmcache_pd.control.admission import Admission
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.server_stats import ServerStats

BLOCKS = P.BlocksRegion(descriptor=b"d", num_blocks=64, block_bytes=1, block_stride=1, layer_offsets=[0])


class Holder:
    """The decode's own cache: holds no page, records what it was asked and released."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.released: list[str] = []

    def hold(self, msg: P.Allocate) -> int:
        self.asked.append(msg.transfer_id)
        return 0

    def release(self, transfer_id: str) -> None:
        self.released.append(transfer_id)


def admission(pages: int = 2, known: dict[str, tuple[int, ...]] | None = None) -> Admission:
    """``known``: the decode loads whose blocks are known, by transfer id (transport.direct)."""
    known = {} if known is None else known
    return Admission(PagePool(pages, lease_s=30), ServerStats(), session_of=lambda identity: None, prefix=Holder(),
                     blocks=BLOCKS, direct=lambda tid, n: known.get(tid, ())[:n], direct_wait_s=0.5,
                     max_waiting=8, max_alloc_wait_s=5.0)


def allocate(tid: str, n: int, wait_s: float = 1.0, *, direct: bool = False, chains: int = 0) -> P.Allocate:
    return P.Allocate(msg_id=1, transfer_id=tid, num_pages=n, num_tokens=n * 16, prompt_digest="d", wait_s=wait_s,
                      chains=[bytes([i]) * 8 for i in range(chains)], direct=direct, decode_sent=direct)


def test_the_queue_is_served_in_order_and_a_head_past_its_deadline_does_not_hold_the_rest_back():
    a = admission(pages=3)
    assert isinstance(a.admit(b"p", "p", allocate("first", 2), now=0.0), P.Allocated)
    assert a.admit(b"p", "p", allocate("big", 2, wait_s=1.0), now=0.0) is None  # one page free: queued
    assert a.admit(b"p", "p", allocate("small", 1, wait_s=9.0), now=0.0) is None  # FIFO: it fits, but waits
    assert a.serve_queue(now=0.5) == []  # nobody overtakes the head
    (w1, err), (w2, ok) = a.serve_queue(now=1.5)  # the head's wait is over: the next one goes at once
    assert w1.msg.transfer_id == "big" and isinstance(err, P.Error) and err.code == P.ErrorCode.POOL_TIMEOUT
    assert a.pool.lookup("big").state == ReservationState.ABORTED  # a tombstone: its load recomputes at once
    assert w2.msg.transfer_id == "small" and isinstance(ok, P.Allocated) and len(ok.pages) == 1
    assert not a.waiting and a.pool.free_pages == 0
    assert a.stats.alloc_timeouts == 1 and a.stats.queued_allocations == 2 and a.stats.allocations == 2


def test_a_parked_allocate_gets_its_blocks_once_its_load_is_known_or_pages_when_its_wait_ends():
    known: dict[str, tuple[int, ...]] = {}
    a = admission(pages=4, known=known)
    assert a.admit(b"p", "p", allocate("soon", 2, direct=True), now=0.0) is None
    assert a.admit(b"p", "p", allocate("never", 2, direct=True), now=0.0) is None
    assert sorted(a.parked) == ["never", "soon"] and a.stats.direct_waits == 2
    assert a.answer_parked(now=0.1) == []  # neither load is known yet, and neither wait is over
    known["soon"] = (7, 9)
    (w, got), = a.answer_parked(now=0.2)
    assert w.msg.transfer_id == "soon" and isinstance(got, P.Allocated) and got.blocks == [7, 9]
    assert a.pool.free_pages == 4  # a direct reservation takes no pool page
    (w, got), = a.answer_parked(now=0.6)  # direct_wait_s (0.5) passed: pool pages
    assert w.msg.transfer_id == "never" and isinstance(got, P.Allocated) and got.blocks == []
    assert len(got.pages) == 2 and a.pool.free_pages == 2 and not a.parked


def test_a_dropped_owners_waiting_allocates_leave_tombstones_and_their_holds_end():
    a = admission(pages=2)
    assert isinstance(a.admit(b"gone", "gone", allocate("granted", 2), now=0.0), P.Allocated)
    assert a.admit(b"gone", "gone", allocate("queued", 2, chains=2), now=0.0) is None
    assert a.admit(b"gone", "gone", allocate("parked", 2, direct=True), now=0.0) is None
    assert a.admit(b"other", "other", allocate("theirs", 2, chains=2), now=0.0) is None
    assert a.prefix.asked == ["queued", "theirs"]  # (with chains, two pages or more)
    a.drop_owner("gone", "prefill worker gone/0 restarted", now=0.1)
    assert [w.msg.transfer_id for w in a.waiting] == ["theirs"] and not a.parked
    for tid in ("queued", "parked"):  # its load, if it comes, recomputes at once
        r = a.pool.lookup(tid)
        assert r.state == ReservationState.ABORTED and "restarted" in r.reason
    assert a.prefix.released == ["queued"]  # the parked one was never asked
    # What it had been granted is the server's to abort (PagePool.abort_writing), not this.
    assert a.pool.lookup("granted").state == ReservationState.ALLOCATED


def test_a_withdrawn_allocate_is_only_its_owners_to_withdraw():
    a = admission(pages=1)
    assert isinstance(a.admit(b"p", "p", allocate("first", 1), now=0.0), P.Allocated)
    assert a.admit(b"p", "p", allocate("queued", 1), now=0.0) is None
    assert a.admit(b"p", "p", allocate("parked", 1, direct=True), now=0.0) is None
    assert not a.withdraw("queued", "stranger") and not a.withdraw("parked", "stranger")
    assert len(a.waiting) == 1 and list(a.parked) == ["parked"]
    assert a.withdraw("queued", "p") and a.withdraw("parked", "p")
    assert not a.waiting and not a.parked
