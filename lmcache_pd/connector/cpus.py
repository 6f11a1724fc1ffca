"""Where our threads run in a vLLM worker process (L6).

vLLM's CPU worker binds its rank's threads to the rank's cores (``VLLM_CPU_OMP_THREADS_BIND``,
from the instance's ``cpus``): the OpenMP threads and the worker's main thread, which spins on
its message queue (``sched_yield``) while the engine steps. A thread inherits the affinity of
the thread that starts it, so our control, transport and loader threads, started from that main
thread, would be confined to the rank's cores and wait behind the spinning: on two cores shared
by more workers than cores, a decode's control plane went unanswered for over a minute. So they
start with the affinity of the whole instance (every CPU of ``cpus``, every rank's; all CPUs
when ``cpus`` is not set), and the main thread gets its own back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)


def cpus_of(cpus: str | int | None) -> set[int]:
    """The CPUs of an instance's ``cpus`` (``"0-3"``, ``7``, ``"0,2|4-5"``: every rank's); all
    of this machine's when None."""
    if cpus is None:
        return set(range(os.cpu_count() or 1))
    out: set[int] = set()
    for part in str(cpus).replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


@contextlib.contextmanager
def instance_wide(cpus: str | int | None) -> Iterator[None]:
    """Threads started inside run on every CPU of the instance (see the module docstring)."""
    if not hasattr(os, "sched_setaffinity"):  # (not Linux)
        yield
        return
    saved = os.sched_getaffinity(0)
    wide = cpus_of(cpus)
    changed = False
    if wide and wide != saved:
        try:
            os.sched_setaffinity(0, wide)
            changed = True
        except (OSError, ValueError) as e:  # CPUs this process may not use (a cgroup's cpuset)
            log.debug("our threads keep the rank's CPUs %s: %s", sorted(saved), e)
    try:
        yield
    finally:
        if changed:
            os.sched_setaffinity(0, saved)
