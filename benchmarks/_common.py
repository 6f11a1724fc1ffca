"""Small helpers shared by the benchmarks (device choice, host timing)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def pick_devices(transport: str, devices: str | None) -> tuple[str, str]:
    """(source, destination) devices: as given, else cuda:0 -> the last GPU for GPU transports."""
    if devices:
        src, dst = devices.split(",")
        return src, dst
    if transport == "cuda_ipc":
        return "cuda:0", f"cuda:{torch.cuda.device_count() - 1}"
    return "cpu", "cpu"


def host_seconds(fn: Callable[[], object], repeat: int, *, sync: bool = True, warmup: int = 1) -> float:
    """Median host time of ``fn`` (until the GPU is done when ``sync``), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(out)
