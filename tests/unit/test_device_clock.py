"""device_clock.py: a stamp's wall clock is when the GPU passed it, not when the host queued it
(GPU only; the hand-off's use of it: test_layered.py::test_on_a_gpu_*)."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache_pd.device_clock import DeviceClock
from tests.unit.nodes import spin_cycles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU stamps untested here")


def test_a_stamp_reads_when_the_gpu_passed_it_before_or_after_the_anchor():
    clock = DeviceClock(torch.device("cuda", 0))
    cycles = spin_cycles(20_000)
    stream = torch.cuda.Stream()
    start = clock.stamp(stream)
    queued = time.time()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)
    first = clock.stamp(stream)  # recorded before the clock's first anchor: read with a negative span
    assert not first.done()
    stream.synchronize()
    synced = time.time()
    spin = start.seconds_to(first)  # the spin as the GPU timed it (no anchor involved)
    assert spin > 0.002, spin
    at = first.wall()
    # Queued at once, passed a spin later: not when the host queued it, nor later than it learned.
    assert queued + 0.8 * spin <= at <= synced + 0.001, (at - queued, synced - queued, spin)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)
    second = clock.stamp(stream)  # after the anchor
    stream.synchronize()
    assert abs((second.wall() - at) - first.seconds_to(second)) < 50e-6
    assert clock.bracket_s < 0.001
