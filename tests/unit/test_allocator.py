"""The decode-side pool: reservations, states, leases, tombstones."""

from __future__ import annotations

import threading

import pytest

from lmcache_pd._types import ReservationState
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.errors import PoolExhausted, TransferError
from lmcache_pd.handoff import Handoff


def reserve(pool: PagePool, tid: str, n: int, now: float = 0.0, owner: str = "p"):
    return pool.reserve(Handoff(tid, "p", n * 16, "d"), n, owner=owner, now=now)


def test_all_or_nothing_and_consecutive_pages():
    pool = PagePool(8, lease_s=10)
    assert reserve(pool, "a", 3) == [0, 1, 2]
    assert reserve(pool, "b", 4) == [3, 4, 5, 6]
    assert reserve(pool, "c", 2) is None          # only one page left: nothing is taken
    assert pool.free_pages == 1
    with pytest.raises(PoolExhausted) as e:
        reserve(pool, "d", 9)                      # larger than the whole pool: never waits
    assert e.value.too_large
    with pytest.raises(TransferError, match="already known"):
        reserve(pool, "a", 1)


def test_no_read_before_ready_and_release_returns_pages():
    pool = PagePool(4, lease_s=10)
    reserve(pool, "a", 2)
    with pytest.raises(TransferError, match="not ready"):
        pool.claim("a")
    with pytest.raises(TransferError, match="another peer"):
        pool.mark_ready("a", owner="intruder", num_bytes=1, seconds=0.1, now=1)
    pool.mark_ready("a", owner="p", num_bytes=10, seconds=0.5, now=1)
    with pytest.raises(TransferError, match="cannot mark ready"):
        pool.mark_ready("a", owner="p", num_bytes=10, seconds=0.5, now=1)
    r = pool.claim("a")
    assert r.state == ReservationState.CONSUMING and r.num_bytes == 10
    with pytest.raises(TransferError):
        pool.claim("a")
    pool.free("a", now=2)
    assert pool.free_pages == 4
    with pytest.raises(TransferError, match="ended"):
        pool.claim("a")


def test_lease_expiry_and_renewal():
    pool = PagePool(4, lease_s=10)
    reserve(pool, "a", 2, now=0)
    reserve(pool, "b", 2, now=0)
    assert pool.renew(["a", "zzz"], owner="p", now=8) == 1
    assert pool.renew(["b"], owner="other", now=8) == 0
    assert pool.expire(now=11) == ["b"]
    assert pool.free_pages == 2
    pool.mark_ready("a", owner="p", num_bytes=1, seconds=0.0, now=12)  # lease restarts for the consumer
    assert pool.expire(now=21) == []
    assert pool.expire(now=23) == ["a"]
    assert pool.lookup("a").state == ReservationState.EXPIRED and "lease" in pool.lookup("a").reason
    assert pool.stats().expired_total == 2 and pool.free_pages == 4


def test_claimed_pages_never_expire():
    pool = PagePool(2, lease_s=1)
    reserve(pool, "a", 1, now=0)
    pool.mark_ready("a", owner="p", num_bytes=1, seconds=0.0, now=0)
    pool.claim("a")
    assert pool.expire(now=100) == []
    pool.free("a", now=100)
    assert pool.free_pages == 2


def test_abort_frees_and_tombstones_refuse_late_reservations():
    pool = PagePool(4, lease_s=10, tombstone_s=5)
    reserve(pool, "a", 3)
    assert pool.abort("a", reason="canceled", now=1)
    assert pool.free_pages == 4 and pool.lookup("a").state == ReservationState.ABORTED
    # The consumer gave up before the prefill asked: a late reservation is refused.
    assert not pool.abort("late", reason="consumer timed out", now=1)
    with pytest.raises(TransferError):
        reserve(pool, "late", 1, now=2)
    pool.expire(now=7)  # tombstones go after tombstone_s
    assert pool.lookup("late") is None and pool.lookup("a") is None


def test_abort_by_another_owner_is_refused():
    pool = PagePool(2, lease_s=10)
    reserve(pool, "a", 1, owner="p1")
    with pytest.raises(TransferError, match="another peer"):
        pool.abort("a", reason="x", now=0, owner="p2")
    assert pool.lookup("a").state == ReservationState.ALLOCATED


def test_concurrent_reservations_never_share_pages():
    pool = PagePool(64, lease_s=10)
    got: list[list[int]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(50):
            pages = reserve(pool, f"{k}-{i}", 3)
            if pages is not None:
                with lock:
                    got.append(pages)
                pool.abort(f"{k}-{i}", reason="done", now=0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.free_pages == 64 and all(len(set(p)) == 3 for p in got) and got


def test_stats():
    pool = PagePool(6, lease_s=10)
    reserve(pool, "a", 1)
    reserve(pool, "b", 2)
    pool.mark_ready("b", owner="p", num_bytes=1, seconds=0, now=0)
    s = pool.stats()
    assert (s.num_pages, s.free_pages, s.allocated, s.ready, s.consuming) == (6, 3, 1, 1, 0)
    with pytest.raises(ValueError):
        PagePool(0, lease_s=1)


def test_landed_pages_only_grow_and_ready_lands_them_all():
    pool = PagePool(8, lease_s=10)
    reserve(pool, "a", 4)
    pool.mark_landed("a", owner="p", pages=2, now=5)
    r = pool.lookup("a")
    assert r.landed == 2 and r.lease_deadline == 15          # a Landed renews the lease too
    for bad in (1, 5):                                       # shrinking, or past the reservation
        with pytest.raises(TransferError, match="outside"):
            pool.mark_landed("a", owner="p", pages=bad, now=5)
    with pytest.raises(TransferError, match="another peer"):
        pool.mark_landed("a", owner="intruder", pages=3, now=5)
    assert pool.lookup("a").landed == 2
    pool.mark_ready("a", owner="p", num_bytes=4, seconds=0.1, now=6)
    assert pool.lookup("a").landed == 4
    with pytest.raises(TransferError, match="cannot mark pages landed"):
        pool.mark_landed("a", owner="p", pages=4, now=6)


def test_landed_layers_join_and_bad_ones_are_refused():
    """Landed(layers) from a one-sided writer: those layers hold their bytes in every page. A
    layer outside the model, layers mixed with landed pages, or another peer's are refused and
    change nothing."""
    pool = PagePool(8, lease_s=10)
    reserve(pool, "a", 4)
    pool.mark_landed("a", owner="p", layers=[0, 2], num_layers=4, now=5)
    pool.mark_landed("a", owner="p", layers=[1], num_layers=4, now=6)
    r = pool.lookup("a")
    assert r.layers_landed == {0, 1, 2} and r.landed == 0 and r.lease_deadline == 16
    for bad in ([4], [-1]):
        with pytest.raises(TransferError, match=r"outside \[0, 4\)"):
            pool.mark_landed("a", owner="p", layers=bad, num_layers=4, now=6)
    with pytest.raises(TransferError, match="landed pages"):
        pool.mark_landed("a", owner="p", pages=2, now=6)
    with pytest.raises(TransferError, match="another peer"):
        pool.mark_landed("a", owner="intruder", layers=[3], num_layers=4, now=6)
    reserve(pool, "b", 2)
    pool.mark_landed("b", owner="p", pages=1, now=6)
    with pytest.raises(TransferError, match="landed layers and landed pages"):
        pool.mark_landed("b", owner="p", layers=[0], num_layers=4, now=6)
    assert pool.lookup("a").layers_landed == {0, 1, 2} and pool.lookup("b").layers_landed == frozenset()


@pytest.mark.parametrize("ending", ["abort", "expire"])
def test_pages_under_a_reader_guard_are_not_reused_until_the_read_ends(ending):
    pool = PagePool(8, lease_s=10)
    reserve(pool, "a", 6)
    pool.mark_landed("a", owner="p", pages=3, now=0)
    r = pool.begin_read("a")
    assert r is not None and r.landed == 3
    if ending == "abort":
        assert pool.abort("a", reason="canceled", now=1)
    else:
        assert pool.expire(now=11) == ["a"]
    assert pool.lookup("a").state.failed and pool.begin_read("a") is None
    assert pool.free_pages == 2                              # the reader still copies from them
    assert reserve(pool, "b", 3, now=1) is None              # so a new hand-off cannot get them
    pool.end_read(r)
    assert pool.free_pages == 8
    assert reserve(pool, "b", 8, now=1) is not None


def test_reader_guard_refuses_claimed_and_unknown_reservations():
    pool = PagePool(4, lease_s=10)
    assert pool.begin_read("nope") is None
    reserve(pool, "a", 2)
    pool.mark_ready("a", owner="p", num_bytes=2, seconds=0.1, now=1)
    r = pool.begin_read("a")                                 # READY pages may be read under a guard
    assert r is not None
    pool.end_read(r)
    pool.claim("a")
    assert pool.begin_read("a") is None
    pool.free("a", now=2)
    assert pool.free_pages == 4


# --- write admission ------------------------------------------------------

def test_a_write_is_admitted_only_into_its_own_live_reservation():
    pool = PagePool(8, lease_s=10)
    reserve(pool, "a", 2)
    reserve(pool, "b", 2, owner="other")
    gen = pool.lookup("a").generation
    assert gen and pool.lookup("b").generation != gen  # a generation per reservation
    with pytest.raises(TransferError, match="another peer"):
        pool.begin_write("a", gen, owner="other", pages=[0])
    with pytest.raises(TransferError, match="generation"):
        pool.begin_write("a", gen + 1, owner="p", pages=[0])
    with pytest.raises(TransferError, match="outside the reservation"):
        pool.begin_write("a", gen, owner="p", pages=[0, 2])  # page 2 is b's
    with pytest.raises(TransferError, match="unknown"):
        pool.begin_write("zz", gen, owner="p", pages=[0])
    r = pool.begin_write("a", gen, owner="p", pages=[0, 1])
    pool.end_write(r, now=1)
    pool.mark_ready("a", owner="p", num_bytes=1, seconds=0.1, now=1)
    with pytest.raises(TransferError, match="cannot write in state READY"):
        pool.begin_write("a", gen, owner="p", pages=[0])


def test_pages_of_a_reservation_ended_mid_write_come_back_only_after_the_write():
    """The critical race: the decode ends a hand-off while a batch of it is still landing. Its
    pages must not go to the next reservation before that batch's bytes stopped."""
    pool = PagePool(2, lease_s=10)
    reserve(pool, "a", 2)
    r = pool.begin_write("a", pool.lookup("a").generation, owner="p", pages=[0, 1])
    assert pool.abort("a", reason="request aborted", now=1)
    assert pool.free_pages == 0 and reserve(pool, "b", 2, now=1) is None  # still being written
    with pytest.raises(TransferError, match="ended"):
        pool.begin_write("a", r.generation, owner="p", pages=[0])  # no new batch of it
    pool.end_write(r, now=2)
    assert pool.free_pages == 2 and reserve(pool, "b", 2, now=2) == [0, 1]
    assert pool.take_notices() == [("p", "a", r.generation, "request aborted")]  # the owner is told


def test_one_sided_writes_are_quarantined_until_the_owner_confirms_or_time_passes():
    pool = PagePool(4, lease_s=10, quarantine_s=5)
    reserve(pool, "a", 2)
    reserve(pool, "b", 2)
    pool.abort("a", reason="deadline", now=1)   # the decode ended them: the prefill may still write
    pool.expire(now=1)
    assert pool.free_pages == 0
    assert not pool.confirm_end("a", owner="intruder", now=2)
    assert pool.confirm_end("a", owner="p", now=2) and pool.free_pages == 2  # its Cancel: it stopped
    pool.abort("b", reason="deadline", now=2)
    pool.expire(now=6.9)
    assert pool.free_pages == 2
    pool.expire(now=7.1)                           # quarantine_s passed: no write can still land
    assert pool.free_pages == 4
    assert [n[1] for n in pool.take_notices()] == ["a", "b"]


def test_the_owners_own_cancel_needs_no_quarantine_and_no_notice():
    pool = PagePool(2, lease_s=10, quarantine_s=5)
    reserve(pool, "a", 2)
    pool.abort("a", reason="canceled by prefill", now=1, owner="p")
    assert pool.free_pages == 2 and pool.take_notices() == []
