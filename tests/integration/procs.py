"""The processes of a TP deployment, as the fault tests need them: a vLLM worker's pid by TP
rank, and the bytes a prefill sent that wait in the kernel on a relay's connections (stopped
relays hold a hand-off's bytes in flight)."""

from __future__ import annotations

import os
from pathlib import Path


def worker_pid(dep, instance: str, rank: int) -> int:
    """The pid of an instance's vLLM worker of TP rank ``rank`` (vLLM titles it ``VLLM::Worker_TP<rank>``)."""
    group = dep.procs[instance].popen.pid
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            pgid = os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
        if pgid == group and title.strip() == f"VLLM::Worker_TP{rank}":
            return int(proc.name)
    raise AssertionError(f"no VLLM::Worker_TP{rank} process in {instance}'s process group")


def relay_queues(port: int) -> list[int]:
    """Per connection the relay accepted (sockets whose local port is ``port``), the bytes
    waiting in its kernel receive queue: sent by a prefill rank, not forwarded to the decode."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == port and f[3] == "01":  # ESTABLISHED
                out.append(int(f[4].split(":")[1], 16))
    return out


def relay_bytes_queued(port: int) -> int:
    """All the bytes waiting on the relay's connections (:func:`relay_queues`)."""
    return sum(relay_queues(port))
