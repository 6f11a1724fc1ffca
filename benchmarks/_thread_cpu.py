"""CPU time of our threads inside an instance, from /proc (Linux; a helper of gpu_engine.py).

On a CPU deployment each instance has one core: what our threads (``pd-*``, named in the OS by
lmcache_pd/threads.py) run there is taken from vLLM's forward. The benchmark snapshots every
thread of an instance's process tree (its session: the launcher starts each instance in a new
one) before and after a prompt length's requests, and reports our threads' share per request.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROC = Path("/proc")


def _session_of(pid: str) -> int | None:
    try:
        stat = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
    return int(fields[3])


def thread_cpu(session: int) -> dict[str, float]:
    """Seconds each thread of the processes of ``session`` ran on a CPU, summed by OS name with
    numbers dropped (``pd-tcp-send-12.0`` and ``pd-tcp-send-13.0`` count as ``pd-tcp-send-``);
    {} where /proc cannot tell (not Linux)."""
    out: dict[str, float] = {}
    if not PROC.is_dir():
        return out
    for pid in os.listdir(PROC):
        if not pid.isdigit() or _session_of(pid) != session:
            continue
        for name, seconds in _threads(pid):
            key = re.sub(r"[\d.]+$", "", name)
            out[key] = out.get(key, 0.0) + seconds
    return out


def _threads(pid: str) -> list[tuple[str, float]]:
    """(OS name, CPU seconds run) of each thread of process ``pid`` ("self": this one); threads
    that end while read are left out."""
    out: list[tuple[str, float]] = []
    try:
        tasks = os.listdir(PROC / pid / "task")
    except OSError:
        return out
    for tid in tasks:
        try:
            name = (PROC / pid / "task" / tid / "comm").read_text().strip()
            ns = int((PROC / pid / "task" / tid / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # (a thread that ended meanwhile)
        out.append((name, ns / 1e9))
    return out


def ours_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Milliseconds per request of each of our threads (``pd-*``) between two snapshots, and their
    sum under ``"all"`` (threads that ended between the snapshots are not counted)."""
    per = {k: (after[k] - before.get(k, 0.0)) * 1e3 / max(1, requests) for k in after if k.startswith("pd-")}
    per = {k: v for k, v in per.items() if v > 0.0}
    return {"all": sum(per.values()), **dict(sorted(per.items(), key=lambda kv: -kv[1]))}


def own_threads_cpu(prefix: str) -> float:
    """Seconds the threads of this process whose OS name starts with ``prefix`` ran on a CPU
    (Linux; 0.0 where /proc cannot tell). OS names are cut at 15 characters."""
    return sum(seconds for name, seconds in _threads("self") if name.startswith(prefix[:15]))
