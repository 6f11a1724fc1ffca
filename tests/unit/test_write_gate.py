"""The pool's admission of data batches (node/write_gate.py), without a transport: who may
write, where, and how much."""

from __future__ import annotations

import pytest

from lmcache_pd import protocol as P
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.errors import TransferError
from lmcache_pd.handoff import Handoff
from lmcache_pd.layout import PoolLayout
from lmcache_pd.node.write_gate import PoolGate

LAYOUT = PoolLayout(num_layers=2, num_pages=8, block_bytes=1024)


def gate_with(tid: str = "t", n: int = 2) -> tuple[PoolGate, PagePool, int]:
    pool = PagePool(LAYOUT.num_pages, lease_s=30)
    pool.reserve(Handoff(tid, "p", n * 16, "d"), n, owner="p/0/a", now=0)
    owners = {b"s" * 16: "p/0/a", b"o" * 16: "p/0/b"}
    return PoolGate(pool, LAYOUT, owners.get), pool, pool.lookup(tid).generation


def page_range(layer: int, page: int, pages: int = 1) -> tuple[int, int]:
    return (layer * LAYOUT.num_pages + page) * LAYOUT.block_bytes, pages * LAYOUT.block_bytes


def test_a_batch_of_its_session_into_its_pages_is_admitted_and_counted_as_a_writer():
    gate, pool, gen = gate_with()
    ranges = [page_range(0, 0, 2), page_range(1, 0, 2)]  # pages 0 and 1, both layers
    done = gate.admit(b"s" * 16, P.ticket("t", gen), [d for d, _ in ranges], [n for _, n in ranges])
    assert pool.lookup("t").writers == 1
    done(True)
    assert pool.lookup("t").writers == 0


def test_a_range_across_pages_of_the_reservation_is_admitted():
    """A writer of a share of every page (a prefill rank of a wider TP) writes its section of a run
    of consecutive pages (heads.page_sections): ranges that start and end inside pages."""
    gate, pool, gen = gate_with()
    done = gate.admit(b"s" * 16, P.ticket("t", gen), [100, LAYOUT.num_pages * 1024 + 700], [1024, 1100])
    assert pool.lookup("t").writers == 1
    done(True)
    assert pool.lookup("t").writers == 0


def test_a_layer_lands_once_every_page_of_it_landed_in_one_batch_or_several():
    """The loader scatters a layer before TransferDone only once the data plane saw every page
    of the reservation land in it (``Reservation.layers_landed``): in one batch, or in one per
    chunk of a chunked prompt; a batch with part of a layer's pages lands no layer by itself."""
    gate, pool, gen = gate_with(n=2)
    r = pool.lookup("t")
    part = gate.admit(b"s" * 16, P.ticket("t", gen), *zip(page_range(0, r.pages[0])))  # one page of layer 0
    part(True)
    assert r.layers_landed == frozenset()
    layer1 = gate.admit(b"s" * 16, P.ticket("t", gen), *zip(page_range(1, r.pages[0], 2)))  # all of layer 1
    layer1(True)
    assert r.layers_landed == frozenset({1}) and r.writers == 0
    rest = gate.admit(b"s" * 16, P.ticket("t", gen), *zip(page_range(0, r.pages[1])))  # layer 0's other page
    rest(True)
    assert r.layers_landed == frozenset({0, 1}) and r.writers == 0


def test_a_batch_that_breaks_part_way_lands_nothing_and_ends_the_reservation():
    """A batch whose connection broke part-way (a prefill that died, bytes that failed their
    check) lands no layer, and, since a sender never resends a batch, the hand-off can never
    complete: the reservation ends at once (its load fails and vLLM recomputes) instead of
    when the writer's session is found silent (timeouts.peer_s); no later batch is admitted."""
    gate, pool, gen = gate_with(n=2)
    r = pool.lookup("t")
    broken = gate.admit(b"s" * 16, P.ticket("t", gen), *zip(page_range(1, r.pages[0], 2)))  # all of layer 1
    broken(False)
    assert r.layers_landed == frozenset() and r.writers == 0
    assert r.ended and r.state.name == "ABORTED" and "mid-batch" in r.reason
    with pytest.raises(TransferError):
        gate.admit(b"s" * 16, P.ticket("t", gen), *zip(page_range(0, r.pages[0])))


@pytest.mark.parametrize("session,ticket,ranges,why", [
    (b"x" * 16, ("t", 0), [page_range(0, 0)], "no live control session"),
    (b"o" * 16, ("t", 0), [page_range(0, 0)], "another peer"),
    (b"s" * 16, ("t", 99), [page_range(0, 0)], "generation"),
    (b"s" * 16, ("gone", 0), [page_range(0, 0)], "unknown"),
    (b"s" * 16, ("t", 0), [page_range(0, 2)], "outside the reservation"),
    (b"s" * 16, ("t", 0), [(1024 + 100, 1024)], "outside the reservation"),  # page 1 on into page 2
    (b"s" * 16, ("t", 0), [page_range(0, 0)] * 5, "reservation of 2 pages"),  # one page, over and over
])
def test_anything_else_is_refused(session, ticket, ranges, why):
    gate, pool, gen = gate_with()
    tid, g = ticket
    with pytest.raises(TransferError, match=why):
        gate.admit(session, P.ticket(tid, g or gen), [d for d, _ in ranges], [n for _, n in ranges])
    assert pool.lookup("t").writers == 0


def test_a_garbled_ticket_is_refused():
    gate, _, _ = gate_with()
    with pytest.raises(TransferError, match="ticket"):
        gate.admit(b"s" * 16, b"\xc1not msgpack", [0], [1024])
