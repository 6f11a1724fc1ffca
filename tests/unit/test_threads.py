"""Our threads carry their names in the OS (threads.py): ``top -H`` and the benchmarks'
per-thread CPU accounting (benchmarks/_thread_cpu.py) tell them from vLLM's own thread."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from lmcache_pd.threads import thread
from tests.transport.test_tcp import listening, sender_to

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in the OS: Linux only")


def os_names() -> set[str]:
    """The OS names of this process's threads."""
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.add(f.read().strip())
        except FileNotFoundError:  # (a thread that ended meanwhile)
            pass
    return names


def test_a_thread_started_through_thread_has_its_name_in_the_os_cut_to_15_bytes():
    seen: dict[str, object] = {}
    go = threading.Event()

    def body(a, *, b):
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["comm"] = f.read().strip()
        seen["args"] = (a, b)
        go.wait(5)

    t = thread(body, "pd-a-name-longer-than-15", 1, b=2)
    assert t.daemon and t.name == "pd-a-name-longer-than-15"
    t.start()
    try:
        for _ in range(500):
            if "args" in seen:  # (set last: the thread may be between its two writes)
                break
            threading.Event().wait(0.01)
        assert seen == {"comm": "pd-a-name-longe", "args": (1, 2)}
        assert "pd-a-name-longe" in os_names()
    finally:
        go.set()
        t.join(5)
    assert threading.current_thread().name == "MainThread"  # the caller's own name is left alone


def test_a_tcp_transport_s_threads_are_named_in_the_os():
    rx, _, region = listening(1 << 16, io_timeout_s=2.0)
    tx, _, _ = sender_to(rx, region, torch.zeros(1 << 16, dtype=torch.uint8))
    try:
        deadline = time.monotonic() + 5  # (a thread names itself as it starts to run)
        while True:
            names = {n.rstrip("0123456789.") for n in os_names()}
            if {"pd-tcp-accept", "pd-tcp-recv-", "pd-tcp-send-"} <= names:
                break
            assert time.monotonic() < deadline, names
            time.sleep(0.01)
    finally:
        tx.close()
        rx.close()
