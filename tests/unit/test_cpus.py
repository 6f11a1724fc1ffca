"""Our threads in a vLLM worker run on every CPU of the instance, not only the cores vLLM bound
the rank's main thread to (connector/cpus.py)."""

from __future__ import annotations

import os
import threading

import pytest

from lmcache_pd.connector.cpus import cpus_of, instance_wide


def test_an_instances_cpus_are_every_ranks():
    assert cpus_of("0-3") == {0, 1, 2, 3}
    assert cpus_of(5) == {5}
    assert cpus_of("0,2|4-5") == {0, 2, 4, 5}
    assert cpus_of(None) == set(range(os.cpu_count() or 1))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs to pin one and widen to both")
def test_threads_started_inside_get_the_instances_cpus_and_the_caller_keeps_its_own():
    allowed = sorted(os.sched_getaffinity(0))
    seen: list[set[int]] = []

    def pinned_main() -> None:  # a stand-in for vLLM's worker main thread, bound to one core
        os.sched_setaffinity(0, {allowed[-1]})
        with instance_wide(f"{allowed[0]}|{allowed[-1]}"):
            t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            t.start()
            t.join()
        seen.append(os.sched_getaffinity(0))

    main = threading.Thread(target=pinned_main)
    main.start()
    main.join()
    assert seen == [{allowed[0], allowed[-1]}, {allowed[-1]}]
