"""Load through the proxy: many concurrent clients against 1 prefill + 1 decode for a bounded time.

A fresh 1P1D deployment on this machine (tcp transport, a shared secret, the tests' tiny model,
prefill pinned to the first core and decode to the last). For each concurrency level, the
clients send streamed greedy completions of prompts of mixed lengths for ``--seconds``; every
answer is checked token for token against the prompt's reference (the colocated answer, one
request at a time). Printed per level: requests correct / failed, throughput, latency and TTFT
percentiles, how the proxy served them, and the resident memory growth of each instance after
the warm-up quarter. The ceiling, measured in the same run with the same clients: the same
load sent straight to one colocated vLLM instance (the prefill instance, on its one core, no
hand-off), which is what one of the two instances can do alone.

At the end the decode pool must be full again and vLLM must hold no KV blocks (the exit status
says).

    python benchmarks/load.py --clients 1,8,32 --seconds 60 [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lmcache_pd.cli.load import references, run_load
from lmcache_pd.cli.local import LocalDeployment, local_config
from lmcache_pd.cli.tinymodel import build_tiny_model

LENGTHS = [50, 100, 200, 300, 400, 600, 700, 900, 1000, 1200, 1300, 1500]


def prompt(n: int, seed: int) -> list[int]:
    return [6 + (i * 7919 + seed * 104729 + (i * i) % 13) % 500 for i in range(n)]


def held(dep: LocalDeployment, api: dict[str, str]) -> dict:
    with urllib.request.urlopen(f"{api['decode-0']}/pd/stats", timeout=5) as r:
        d = json.load(r)
    return {"free_pages": d["pool"]["free_pages"], "pages": d["pool"]["pages"], "loads": d["loads"]["waiting"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", help="directory for load.json and load.md")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pd-load-"))
    secret = work / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    model = build_tiny_model(work / "tiny-model")
    cfg = local_config(model, work, extra={"auth.secret_file": str(secret), "handoff_log": None})
    dep = LocalDeployment(cfg, work)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    api = {d["name"]: f"http://127.0.0.1:{d['cache_port']}" for d in (*data["prefill"], *data["decode"])}
    rows = []
    ok = True
    try:
        dep.start_all(timeout_s=900)
        prompts = [prompt(n, 100 + i) for i, n in enumerate(LENGTHS)]
        print(f"references for {len(prompts)} prompts of {min(LENGTHS)}-{max(LENGTHS)} tokens ...", flush=True)
        ref = references(dep.procs["prefill-0"].url, prompts, args.max_tokens)
        groups = {n: dep.procs[n].popen.pid for n in ("prefill-0", "decode-0", "proxy")}
        for clients in levels:
            for target in ("colocated", "pd"):
                url = dep.procs["prefill-0" if target == "colocated" else "proxy"].url
                print(f"{target}: {clients} clients for {args.seconds:g} s ...", flush=True)
                rep = run_load(url, prompts, ref, clients=clients, seconds=args.seconds,
                               max_tokens=args.max_tokens, groups=groups, proxy_metrics=target == "pd")
                s = rep.summary()
                s.update(target=target, served=rep.served,
                         rss_growth_mib={n: round(rep.rss_growth_mib(n), 1) for n in groups},
                         rss_end_mib={n: round(rep.rss_mib[n][-1]) for n in groups})
                if rep.failed:
                    ok = False
                    s["errors"] = sorted({f.error[:100] for f in rep.failed})[:5]
                rows.append(s)
                print(json.dumps(s), flush=True)
        time.sleep(2)
        end = held(dep, api)
        print("decode pool at the end:", end)
        ok &= end["free_pages"] == end["pages"] and end["loads"] == 0
    finally:
        dep.stop_all()
    print()
    print(table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "load.json").write_text(json.dumps(rows, indent=1))
        (out / "load.md").write_text(table(rows) + "\n")
    return 0 if ok else 1


def table(rows: list[dict]) -> str:
    head = ("| clients | served by | correct / failed | req/s | ratio | output tok/s | latency p50 / p90 / p99 ms "
            "| TTFT p50 / p90 / p99 ms | RSS growth MiB (P, D, proxy) |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---|---|---|"]
    ceiling = {r["clients"]: r["req_per_s"] for r in rows if r["target"] == "colocated"}
    for r in rows:
        ratio = r["req_per_s"] / ceiling[r["clients"]] if r["target"] == "pd" and ceiling.get(r["clients"]) else None
        g = r["rss_growth_mib"]
        lines.append(f"| {r['clients']} | {'proxy (P/D)' if r['target'] == 'pd' else 'one vLLM (ceiling)'} "
                     f"| {r['correct']} / {r['failed']} | {r['req_per_s']} | {f'{ratio:.2f}' if ratio else '-'} "
                     f"| {r['output_tok_per_s']} | {r['latency_p50_ms']} / {r['latency_p90_ms']} / "
                     f"{r['latency_p99_ms']} | {r['ttft_p50_ms']} / {r['ttft_p90_ms']} / {r['ttft_p99_ms']} "
                     f"| {g['prefill-0']}, {g['decode-0']}, {g['proxy']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
