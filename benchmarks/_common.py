"""Small helpers shared by the benchmarks (sizes, device choice, host timing)."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1] in _UNITS else int(text)


def pin(core: int) -> None:
    """Run this process on ``core`` alone, as a CPU deployment pins an instance. torch counted
    the cores at import; two of its threads on one core spin against each other, so one."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


def pick_devices(transport: str, devices: str | None) -> tuple[str, str]:
    """(source, destination) devices: as given, else cuda:0 -> the last GPU where the transport
    can use GPU memory and a GPU exists, else cpu -> cpu."""
    if devices:
        src, dst = devices.split(",")
        return src, dst
    from lmcache_pd import transport as transports

    if torch.cuda.is_available() and "cuda" in transports.get_class(transport).capabilities.mem_kinds:
        return "cuda:0", f"cuda:{torch.cuda.device_count() - 1}"
    return "cpu", "cpu"


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def host_seconds(fn: Callable[[], object], repeat: int, *, sync: bool = True, warmup: int = 1) -> float:
    """Median host time of ``fn`` (until the GPU is done when ``sync``), after ``warmup`` calls.
    Without CUDA there is nothing to wait for."""
    gpu = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if gpu:
        torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync and gpu:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    if gpu:
        torch.cuda.synchronize()
    return statistics.median(out)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, deadline: float, what: str = "") -> None:
    """Until ``url``/health answers 200 (a vLLM or proxy we started), ``proc`` exits (its log's
    end in the error) or ``deadline`` (``time.monotonic()``) passes."""
    what = what or url
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not start (log: {log})")
