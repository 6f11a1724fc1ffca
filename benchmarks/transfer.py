"""Transfer sweep: every transport, 1 MiB to 4 GiB, the transport alone and the whole hand-off,
each beside its ceiling measured in the same run.

For each transport and size, in alternation (so that all see the same machine; a 2-core box
drifts by tens of percent from one second to the next), median of ``--repeat`` after a warm-up:
  raw/contiguous, raw/paged — the transport alone between two processes (benchmarks/_pairs.py);
  hand-off — paged cache -> decode pool -> paged cache: the copy, TransferDone, the decode's
      scatter (the Allocate round trip is done ahead, as the connector reserves the pages while
      the last prompt chunk computes: benchmarks/handoff.py --no-reserve times it too); checked
      bitwise after the last repeat. Sizes under one block of all layers (2 MiB in this shape)
      have no hand-off: a hand-off moves whole blocks.
  ceiling — the in-process device copy between the same devices (GPU paths), the best of the raw
      socket on loopback and a host copy (tcp: on one host it reads), a host copy (other host paths): benchmarks/_ceilings.py.
A progress bar runs on stderr; the table prints at the end; ``--out DIR`` also writes
``transfer.md``, ``transfer.json`` and the plot ``transfer.png``.

    python benchmarks/transfer.py                              # every available transport
    python benchmarks/transfer.py --transports tcp,nixl --sizes 1M,16M,256M
    python benchmarks/transfer.py --transports tcp --encrypt --no-handoff   # tcp clear and encrypted
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _ceilings import ceilings_for
from _common import human, parse_size, pick_devices
from _pairs import BLOCK, TOKEN_BYTES, HandoffPair, RawPair, plan_for

from lmcache_pd import transport as transports

GPU_SIZES = "1M,4M,16M,64M,256M,1G,4G"
CPU_SIZES = "1M,4M,16M,64M,256M"


class _Progress:
    """tqdm when installed (the `bench` extra), else one line per step."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True)
        except ImportError:
            self._bar, self._n, self._total = None, 0, total

    def step(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)
            self._bar.update(1)
        else:
            self._n += 1
            print(f"[{self._n}/{self._total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def measure_size(name: str, size: int, repeat: int, layouts: list[str], src: str, dst: str, raw: RawPair,
                 handoff: HandoffPair | None) -> list[dict]:
    ceilings = ceilings_for(name, size, src, dst)
    runners = {k: c.once for k, c in ceilings.items()}
    rng = np.random.default_rng(size)
    for layout in layouts:
        runners[f"raw/{layout}"] = functools.partial(raw.once, plan_for(layout, size, rng))
    tokens = size // TOKEN_BYTES
    if handoff is not None and tokens >= BLOCK and tokens % BLOCK == 0:
        runners["hand-off"] = lambda: handoff.once(tokens)
    times: dict[str, list[float]] = {k: [] for k in runners}
    try:
        for i in range(repeat + 1):
            for key, fn in runners.items():
                dt = fn()
                if i:  # round 0 warms connections, kernels and pages
                    times[key].append(dt)
        check = handoff.check_last() if "hand-off" in runners else None
        path = raw.path or (handoff.path if handoff else "")
    finally:
        for c in ceilings.values():
            c.close()
    gbps = {k: size / statistics.median(v) / 1e9 for k, v in times.items()}
    best = max(ceilings, key=lambda k: gbps[k])
    rows = []
    for kind in runners:
        if kind in ceilings:
            continue
        rows.append({"transport": name, "devices": f"{src}->{dst}", "size": size, "kind": kind,
                     "gbps": gbps[kind], "ms": statistics.median(times[kind]) * 1e3, "ceiling": best,
                     "ceiling_gbps": gbps[best], "ratio": gbps[kind] / gbps[best], "path": path,
                     "check": ("bitwise" if check else "MISMATCH") if kind == "hand-off" else ""})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| transport | devices | size | measured | GB/s | ms | ceiling | ceiling GB/s | ratio | carried by | check |\n"
            "|---|---|---:|---|---:|---:|---|---:|---:|---|---|\n")
    return head + "".join(
        f"| {r['transport']} | {r['devices']} | {human(r['size'])} | {r['kind']} | {r['gbps']:.2f} | {r['ms']:.3f} "
        f"| {r['ceiling']} | {r['ceiling_gbps']:.2f} | {r['ratio']:.2f} | {r['path'] or '-'} | {r['check']} |\n"
        for r in rows)


def plot(rows: list[dict], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e} (install the `bench` extra)"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (transport, kind) in dict.fromkeys((r["transport"], r["kind"]) for r in rows):
        pts = [(r["size"], r["gbps"]) for r in rows if r["transport"] == transport and r["kind"] == kind]
        ax.plot(*zip(*pts), marker="o", label=f"{transport} {kind}")
    for transport in dict.fromkeys(r["transport"] for r in rows):
        pts = sorted({(r["size"], r["ceiling_gbps"]) for r in rows if r["transport"] == transport})
        name = next(r["ceiling"] for r in rows if r["transport"] == transport)
        ax.plot(*zip(*pts), linestyle="--", color="gray", alpha=0.6)
        ax.annotate(f"{name} ({transport})", pts[-1], fontsize=7, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per transfer")
    ax.set_ylabel("GB/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default=None, help="comma-separated (default: every available one)")
    ap.add_argument("--transport", dest="transports", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=None, help=f"default {GPU_SIZES} on a GPU, {CPU_SIZES} on CPU")
    ap.add_argument("--layout", default="contiguous,paged", help="raw-transport layouts")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-handoff", action="store_true", help="time the transport alone")
    ap.add_argument("--devices", default=None, help="source,destination (default cuda:0,cuda:<last> where a "
                                                     "transport can use GPU memory and a GPU exists)")
    ap.add_argument("--options", default="{}", help="transport options as JSON (applied to every transport)")
    ap.add_argument("--out", type=Path, default=None, help="write transfer.md, transfer.json, transfer.png here")
    ap.add_argument("--encrypt", action="store_true", help="also time each transport that can encrypt with "
                                                          "auth.encrypt on (the raw transport; rows '<name>+encrypted')")
    args = ap.parse_args(argv)
    names = args.transports.split(",") if args.transports else [n for n in transports.names() if n != "loopback"]
    runnable = []
    for name in names:
        ok, why = transports.available(name)
        if ok:
            runnable.append(name)
        else:
            print(f"# skipped {name}: {why}")
    sizes = [parse_size(s) for s in (args.sizes or (GPU_SIZES if torch.cuda.is_available() else CPU_SIZES)).split(",")]
    options = json.loads(args.options)
    gpu = f" ({torch.cuda.get_device_name(0)} x{torch.cuda.device_count()})" if torch.cuda.is_available() else ""
    title = (f"{time.strftime('%Y-%m-%d')}{gpu}, {mp.cpu_count()} cpus, python {sys.version.split()[0]}, "
             f"torch {torch.__version__}; median of {args.repeat}")
    print(f"# {title}")
    runs = [(name, False) for name in runnable]
    if args.encrypt:
        runs += [(name, True) for name in runnable if transports.get_class(name).capabilities.encrypts]
    progress = _Progress(len(runs) * len(sizes))
    rows: list[dict] = []
    for name, encrypt in runs:
        src, dst = pick_devices(name, args.devices)
        max_tokens = max(sizes) // TOKEN_BYTES
        raw = RawPair(name, options, max(sizes), src, dst, encrypt=encrypt)
        handoff = None if args.no_handoff or encrypt or max_tokens < BLOCK else \
            HandoffPair(name, options, max_tokens, src, dst)
        try:
            first = len(rows)
            for size in sizes:
                got = measure_size(name, size, args.repeat, args.layout.split(","), src, dst, raw, handoff)
                for r in got:
                    r["transport"] += "+encrypted" if encrypt else ""
                rows += got
                progress.step(f"{name}{'+encrypted' if encrypt else ''} {human(size)}")
            time.sleep(0.6)  # nixl reads UCX's report in the background, twice a second
            for r in rows[first:]:
                r["path"] = r["path"] or raw.path
        finally:
            raw.close()
            if handoff is not None:
                handoff.close()
    progress.close()
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "transfer.md").write_text(f"{title}\n\n{text}")
        (args.out / "transfer.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1))
        print(plot(rows, args.out / "transfer.png", title))
    return 1 if any(r["check"] == "MISMATCH" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
