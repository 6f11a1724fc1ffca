"""Launched marks: a writer marks a hand-off's landing word as it queues the last copy, and the
decode's loader watches the word from C (csrc/landing_spin.c) instead of sleeping until the
semaphore's post (transport/landing.py, node/loader.py ``_spin``). The words between two
processes; the loader over loopback (its submit marks, its copy thread writes after ``delay_s``)."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec, signal_of
from lmcache_pd.transport.landing import LAUNCHED, LandingMap, LandingWords
from tests.unit.nodes import BLOCK, HeldTransferDone, Node, make_cfg, warm

D = "d" * 32


def _spinning(slots: int, spin_s: float = 5.0) -> LandingWords:
    words = LandingWords(slots, spin_s=spin_s)
    if words.spin_s == 0:
        words.close()
        pytest.skip("no C compiler here: csrc/landing_spin.c cannot be built, loaders only sleep")
    return words


# --- the words, between two processes ------------------------------------------------------------
def _gpu_like_writer(name: str, slots: int, slot: int, value: int) -> None:
    """As cuda_ipc's sender: the mark (and its post) once the copy is queued; the word itself 0.3 s
    later (the copy stream's write: no post); the post 2 s after that (CUDA's host function, late)."""
    m = LandingMap(name, slots)
    m.mark(slot, value)
    time.sleep(0.3)
    m.words[slot] = value
    time.sleep(2.0)
    m.post()
    m.close()


def test_the_loader_side_sees_the_word_land_before_any_post_after_the_mark():
    words = _spinning(64)
    try:
        p = mp.get_context("spawn").Process(target=_gpu_like_writer, args=(words.name, 64, 9, 77))
        p.start()
        assert words.wait(20.0), "the mark's post did not wake the sleeper"
        assert words.launched(9, 77) and not words.holds(9, 77) and not words.launched(9, 78)
        t0 = time.monotonic()
        assert words.spin([(3, 5), (9, 77)], 10.0) == 1, "the spin did not end on the landed word"
        took = time.monotonic() - t0
        assert words.holds(9, 77)
        assert took < 1.9, f"the spin ended after {took:.2f} s: on the late post, not on the word"
        p.join(10)
        assert p.exitcode == 0
    finally:
        words.close()


def test_a_spin_ends_at_its_budget_or_on_a_post_which_it_takes():
    words = _spinning(8)
    try:
        t0 = time.monotonic()
        assert words.spin([(2, 5)], 0.2) is None
        took = time.monotonic() - t0
        assert 0.19 < took < 5, f"a 0.2 s spin took {took:.3f} s"
        words.post()
        words.post()
        t0 = time.monotonic()
        assert words.spin([(2, 5)], 10.0) is None, "a post did not end the spin"
        assert time.monotonic() - t0 < 5
        assert not words.wait(0.01), "the spin left the posts it ended on for the next wait"
        with pytest.raises(ValueError):
            words.spin([(8, 5)], 0.1)  # (outside the words)
    finally:
        words.close()


def test_a_writer_marks_only_words_whose_loader_watches_and_a_mark_is_never_a_generation():
    quiet, watched = LandingWords(8), _spinning(8)
    try:
        for words in (quiet, watched):
            m = LandingMap(words.name, 8)
            m.mark(3, 0x7FFFFFFF)
            m.close()
        assert int(quiet.words[3]) == 0 and not quiet.wait(0.01), "a loader that does not watch was marked"
        assert int(watched.words[3]) == 0x7FFFFFFF | LAUNCHED and watched.wait(0.01)
        assert watched.launched(3, 0x7FFFFFFF) and not watched.holds(3, 0x7FFFFFFF)
        assert all(signal_of([3], (), 8, g)[1] < LAUNCHED for g in (1, 0x7FFFFFFF, 0x7FFFFFFF + 1, 2**40))
        m = LandingMap(watched.name, 8)  # the copy stream's write landed before the queueing thread marked
        m.words[5] = 41
        m.mark(5, 41)
        m.mark(6, 41)  # (another word: an older generation's)
        m.close()
        assert watched.holds(5, 41), "a late mark hid a landed value"
        assert watched.launched(6, 41)
    finally:
        quiet.close()
        watched.close()


# --- the loader, over loopback -------------------------------------------------------------------
def _node(spin_us: int, transfer_s: float = 3, **kw) -> Node:
    n = Node(make_cfg("loopback", options={"signals": True, "spin_us": spin_us, **kw}, transfer_s=transfer_s))
    if spin_us and n.receiver.loader._words.spin_s == 0:
        n.close()
        pytest.skip("no C compiler here: csrc/landing_spin.c cannot be built, loaders only sleep")
    return n


@pytest.mark.parametrize("spin_us", [10_000_000, 0], ids=["watching", "sleeping"])
def test_a_load_ends_on_the_word_its_loader_watched_land(spin_us):
    n = _node(spin_us, delay_s=0.3)
    try:
        warm(n)
        spins = n.receiver.status()["loads"]["spins_total"]
        held = HeldTransferDone(n)  # the load must end on its word, not on a TransferDone that came first
        n.receiver.submit_load(LoadSpec("d-s1", Handoff("s1", "prefill-0", 2 * BLOCK, D), (11, 12)))
        n.sender.reserve(Handoff("s1", "decode-0", 2 * BLOCK, D)).result(5)
        n.sender.submit(SendSpec("p-s1", Handoff("s1", "decode-0", 2 * BLOCK, D), (4, 9)))
        _, (ld,) = n.results(0, 1)
        assert ld.ok and ld.signaled and not held.release.is_set(), ld
        held.release.set()
        (s,), _ = n.results(1, 0)
        assert s.ok, s.error
        n.assert_moved([4, 9], [11, 12])
        loads = n.receiver.status()["loads"]
        if spin_us:
            assert ld.spun, "the load ended on the semaphore's post, not on the word its loader watched"
            assert loads["spun_total"] == 2 and loads["spins_total"] > spins  # (the warm-up's too)
        else:
            assert not ld.spun and loads["spins_total"] == loads["spun_total"] == 0
    finally:
        n.close()


def test_a_mark_whose_word_never_lands_is_watched_once_for_its_budget_then_the_load_times_out():
    n = _node(200_000, transfer_s=3.0)  # (0.2 s)
    try:
        warm(n)
        n.receiver.submit_load(LoadSpec("d-m1", Handoff("m1", "prefill-0", 2 * BLOCK, D), (11, 12)))
        n.sender.reserve(Handoff("m1", "decode-0", 2 * BLOCK, D)).result(5)
        r = n.receiver.pool.lookup("m1")
        slot, value = signal_of(r.pages, r.direct, n.receiver.pool.num_pages, r.generation)
        time.sleep(0.1)  # (the loader plans the load: LANDING)
        before = n.receiver.status()["loads"]["spins_total"]
        writer = LandingMap(n.receiver.loader._words.name, n.receiver.loader._words.slots)
        try:
            writer.mark(slot, value)  # a writer that queued its copy and then never wrote
            time.sleep(1.0)
            after = n.receiver.status()["loads"]["spins_total"]
            time.sleep(1.0)
            assert after > before, "the loader never watched the launched word"
            assert n.receiver.status()["loads"]["spins_total"] == after, "the loader watched past its budget"
            _, (ld,) = n.results(0, 1, timeout_s=5)
            assert not ld.ok and "timeouts.transfer_s" in ld.error and not ld.spun, ld
        finally:
            writer.close()
        n.sender.unreserve("m1")
        assert n.pool_full()
    finally:
        n.close()
