"""A load generator: many concurrent clients through the proxy for a bounded time.

Each client sends streamed, greedy completions of prompts drawn from a fixed set, one after the
other, and checks every answer token for token against that prompt's reference answer (taken
beforehand from a colocated instance, one request at a time). Reported: requests answered
correctly, wrong or failed; throughput; latency and time-to-first-token percentiles; how the
proxy served them (by hand-off or not); and, sampled every second, the resident memory of each
instance (every process of its group: API server, engine core, workers).

Used by ``benchmarks/load.py`` (figures for docs/benchmarks.md) and by the fault tests (a load
after the faults must be answered correctly with flat memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass
class Sample:
    ok: bool
    seconds: float
    ttft: float
    tokens: int
    error: str = ""


@dataclass
class LoadReport:
    clients: int
    seconds: float
    samples: list[Sample]
    rss_mib: dict[str, list[float]] = field(default_factory=dict)
    """Per instance: resident MiB, one value per second of the run."""
    served: dict[str, float] = field(default_factory=dict)
    """The proxy's request counts by mode during the run (pd, fallback, direct)."""

    @property
    def answered(self) -> int:
        return sum(s.ok for s in self.samples)

    @property
    def failed(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    def percentile(self, what: str, q: float) -> float:
        values = sorted(getattr(s, what) for s in self.samples if s.ok)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    def summary(self) -> dict[str, float]:
        ok = [s for s in self.samples if s.ok]
        return {
            "clients": self.clients, "seconds": round(self.seconds, 1), "requests": len(self.samples),
            "correct": len(ok), "failed": len(self.samples) - len(ok),
            "req_per_s": round(len(ok) / self.seconds, 2),
            "output_tok_per_s": round(sum(s.tokens for s in ok) / self.seconds, 1),
            **{f"latency_p{q}_ms": round(self.percentile("seconds", q) * 1e3, 1) for q in (50, 90, 99)},
            **{f"ttft_p{q}_ms": round(self.percentile("ttft", q) * 1e3, 1) for q in (50, 90, 99)},
            "mean_latency_ms": round(statistics.fmean(s.seconds for s in ok) * 1e3, 1) if ok else float("nan"),
        }

    def rss_growth_mib(self, name: str, warmup_fraction: float = 0.25) -> float:
        """Resident memory at the end minus the largest value of the warm-up part."""
        series = self.rss_mib[name]
        cut = max(1, int(len(series) * warmup_fraction))
        return series[-1] - max(series[:cut])


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in a process group (Linux /proc)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a process that just ended
    return total / 1024


def references(url: str, prompts: Sequence[list[int]], max_tokens: int, model: str = "tiny") -> list[list[int]]:
    """Each prompt's greedy answer from ``url``, one request at a time."""
    out = []
    for p in prompts:
        body = json.dumps({"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out.append(json.load(r)["choices"][0]["token_ids"])
    return out


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], expected: list[int], max_tokens: int,
               model: str) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    ttft = 0.0
    got: list[int] = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(False, time.perf_counter() - t0, 0.0, 0, f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return Sample(False, time.perf_counter() - t0, ttft, len(got), str(event["error"]))
                for c in event.get("choices", []):
                    ids = c.get("token_ids") or []
                    if ids and not got:
                        ttft = time.perf_counter() - t0
                    got += ids
    except httpx.HTTPError as e:
        return Sample(False, time.perf_counter() - t0, ttft, len(got), f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if got != expected:
        return Sample(False, seconds, ttft, len(got), f"wrong answer ({len(got)} tokens, "
                                                       f"first difference at {_first_diff(got, expected)})")
    return Sample(True, seconds, ttft, len(got))


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def _clients(url: str, prompts: Sequence[list[int]], expected: Sequence[list[int]], *, clients: int,
                   seconds: float, max_tokens: int, model: str, timeout_s: float) -> list[Sample]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    samples: list[Sample] = []
    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def run(c: int) -> None:
            i = c
            while time.monotonic() < stop_at:
                k = i % len(prompts)
                samples.append(await _one(client, url, prompts[k], expected[k], max_tokens, model))
                i += clients
        await asyncio.gather(*(run(c) for c in range(clients)))
    return samples


def _proxy_modes(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("lmcache_pd_proxy_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            mode = labels.split('mode="')[1].split('"')[0]
            out[mode] = out.get(mode, 0.0) + float(value)
    return out


def run_load(url: str, prompts: Sequence[list[int]], expected: Sequence[list[int]], *, clients: int,
             seconds: float, max_tokens: int, groups: dict[str, int] | None = None, model: str = "tiny",
             timeout_s: float = 300.0, proxy_metrics: bool = True) -> LoadReport:
    """``clients`` concurrent clients against ``url`` for ``seconds``; ``groups``: instance name ->
    process group id, whose resident memory is sampled every second."""
    groups = groups or {}
    rss: dict[str, list[float]] = {name: [] for name in groups}
    done = threading.Event()

    def sample() -> None:
        while True:
            for name, pgid in groups.items():
                rss[name].append(group_rss_mib(pgid))
            if done.wait(1.0):
                return

    before = _proxy_modes(url) if proxy_metrics else {}
    sampler = threading.Thread(target=sample, name="pd-load-rss", daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        samples = asyncio.run(_clients(url, prompts, expected, clients=clients, seconds=seconds,
                                       max_tokens=max_tokens, model=model, timeout_s=timeout_s))
    finally:
        elapsed = time.monotonic() - t0
        done.set()
        sampler.join()
    after = _proxy_modes(url) if proxy_metrics else {}
    served = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return LoadReport(clients, elapsed, samples, rss, served)
