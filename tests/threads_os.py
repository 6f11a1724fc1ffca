"""What the OS counts of a thread of this process (Linux /proc): how often it slept and was woken,
and how long it ran. Tests that a thread sleeps while idle, or does not spin, read these."""

from __future__ import annotations

import threading


def _task(th: threading.Thread, name: str) -> str:
    with open(f"/proc/self/task/{th.native_id}/{name}") as f:
        return f.read()


def wakeups(th: threading.Thread) -> int:
    """How many times ``th`` went to sleep and was woken (voluntary context switches)."""
    return next(int(line.split()[1]) for line in _task(th, "status").splitlines()
                if line.startswith("voluntary_ctxt_switches"))


def cpu_s(th: threading.Thread) -> float:
    """CPU seconds ``th`` has run."""
    return int(_task(th, "schedstat").split()[0]) / 1e9
