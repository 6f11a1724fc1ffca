"""The decode loader's phases (node/loader.py, loads.LoadPhase): every load moves only as
loads.NEXT allows, in the order the hand-off's events come, over a real sender and receiver."""

from __future__ import annotations

import time

import pytest

from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.loads import NEXT, LoadPhase, LoadState
from tests.unit.nodes import BLOCK, Node, make_cfg

P = LoadPhase


@pytest.fixture
def moves(monkeypatch):
    """Every move of every load, as (transfer id, phase), in order."""
    seen: list[tuple[str, LoadPhase]] = []
    original = LoadState.move

    def record(self: LoadState, phase: LoadPhase) -> None:
        original(self, phase)  # refused moves raise before they are recorded
        seen.append((self.spec.handoff.transfer_id, phase))

    monkeypatch.setattr(LoadState, "move", record)
    return seen


@pytest.fixture
def node():
    n = Node(make_cfg())
    yield n
    n.close()


def load_spec(tid: str, blocks: tuple[int, ...], digest: str = "d" * 32) -> LoadSpec:
    return LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", len(blocks) * BLOCK, digest), blocks)


def phases(moves: list, tid: str) -> list[LoadPhase]:
    return [p for t, p in moves if t == tid]


def wait_phase(node: Node, req_id: str, phase: LoadPhase) -> None:
    deadline = time.monotonic() + 5
    while True:
        with node.receiver.loader._lock:
            load = node.receiver.loader._loads.get(req_id)
            if load is not None and load.phase is phase:
                return
        assert time.monotonic() < deadline, f"{req_id} never reached {phase.name}"
        time.sleep(0.005)


def test_a_move_outside_next_is_refused():
    load = LoadState(load_spec("t", (1,)), 0.0, 1.0)
    with pytest.raises(AssertionError, match="WAITING -> DONE is not a move"):
        load.move(P.DONE)
    assert load.phase is P.WAITING
    for phase in LoadPhase:  # every phase is reachable from WAITING, and the ends lead nowhere
        assert phase is P.WAITING or any(phase in after for after in NEXT.values())
    assert NEXT[P.DONE] == NEXT[P.FAILED] == frozenset()


def test_pages_granted_before_they_are_written_walk_every_phase(node, moves):
    blocks = (3, 4)
    node.receiver.submit_load(load_spec("t1", blocks))
    node.sender.reserve(Handoff("t1", "decode-0", len(blocks) * BLOCK, "d" * 32)).result(5)
    wait_phase(node, "d-t1", P.LANDING)  # granted, planned: waiting for the bytes
    assert phases(moves, "t1") == [P.GRANTED, P.LANDING]
    node.sender.submit(SendSpec("p-t1", Handoff("t1", "decode-0", len(blocks) * BLOCK, "d" * 32), blocks))
    (s,), (ld,) = node.results(1, 1)
    assert s.ok and ld.ok and ld.planned_ahead
    node.assert_moved(list(blocks), list(blocks))
    assert phases(moves, "t1") == [P.GRANTED, P.LANDING, P.SCATTERING, P.DONE]
    assert node.receiver.loader.waiting() == 0


def test_pages_already_written_go_from_granted_straight_to_scattering(node, moves):
    blocks = (5,)
    node.sender.submit(SendSpec("p-t2", Handoff("t2", "decode-0", BLOCK, "d" * 32), blocks))
    deadline = time.monotonic() + 5
    while not node.sender.drain():  # the hand-off ended: its pages are READY in the pool
        assert time.monotonic() < deadline
        time.sleep(0.005)
    node.receiver.submit_load(load_spec("t2", blocks))
    (ld,) = node.receiver.drain(5)
    assert ld.ok
    assert phases(moves, "t2") == [P.GRANTED, P.SCATTERING, P.DONE]


def test_a_different_prompt_fails_at_granted_and_its_pages_come_back(node, moves):
    node.handoff("t3", [1], [1], BLOCK, load_digest="e" * 32)
    (s,), (ld,) = node.results(1, 1)
    assert not ld.ok and "different prompt" in ld.error
    assert phases(moves, "t3") == [P.GRANTED, P.FAILED]
    assert node.pool_full()


def test_a_load_nobody_hands_off_fails_from_waiting_at_its_deadline(moves):
    n = Node(make_cfg(transfer_s=0.3))
    try:
        n.receiver.submit_load(load_spec("t4", (2,)))
        (ld,) = n.receiver.drain(5)
        assert not ld.ok and "timeouts.transfer_s" in ld.error
        assert phases(moves, "t4") == [P.FAILED]
    finally:
        n.close()


def test_a_handoff_ended_while_its_pages_are_loaded_fails_and_its_result_comes_first(node, moves):
    """The result goes out before the pages are returned (node/loader.py ``_scatter``: returning
    them wakes the control server); a hand-off ended during the copy (a prefill's Cancel) must
    then still be reported failed: its pages may have gone to another hand-off meanwhile."""
    loader = node.receiver.loader
    real_pages = loader.scatter.pages
    order: list[str] = []

    def pages_then_cancel(load, r, upto):
        real_pages(load, r, upto)
        if load.spec.handoff.transfer_id == "t5":  # the Cancel comes while the loader copies
            node.receiver.pool.abort("t5", reason="canceled by prefill", now=time.monotonic())

    real_free = loader.pool.free
    loader.scatter.pages = pages_then_cancel
    loader.pool.free = lambda tid, now: (order.append(f"free {tid}"), real_free(tid, now=now))[1]
    real_publish = loader._publish
    loader._publish = lambda result: (order.append(f"result {result.transfer_id}"), real_publish(result))[1]
    for tid, blocks in (("t5", (6,)), ("t6", (7,))):
        node.handoff(tid, list(blocks), list(blocks), BLOCK)
        (s,), (ld,) = node.results(1, 1)
        assert s.ok
        assert ld.ok == (tid == "t6") and (tid == "t6" or "ended while its pages were loaded" in ld.error), ld
    assert phases(moves, "t5")[-1] is P.FAILED and phases(moves, "t6")[-1] is P.DONE
    assert order == ["result t5", "result t6", "free t6"], order  # (t5's end returned its pages)
    assert node.pool_full()
