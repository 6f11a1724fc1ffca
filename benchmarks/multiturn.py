"""Multi-turn chat through the proxy, prefix cache off and on: TTFT per turn and hit rate.

Each conversation re-sends its whole history every turn (turn k's prompt = turn k-1's prompt +
its answer + a new user message). The same conversations run against three fresh 1P1D
deployments on this machine (the tcp transport):
- **off**: no prefix cache at all on the prefill instance (vLLM's own is off too), so every turn
  computes its whole prompt: the reference measured in this run;
- **vllm**: vLLM's own prefix cache on the prefill instance (in its KV cache; lost on restart,
  not shared), ours off;
- **ours**: ``cache.enabled`` with the given tiers and vLLM's own prefix cache off, so every
  reused token comes from our tiers.

TTFT is the client's time to the first streamed token, through the proxy: the prefill (with the
cache lookup and load), the hand-off, and the decode's first step. The hit rate is read from
vLLM's counters on the prefill instance: loaded / (loaded + computed) prompt tokens.

Correctness: with ``--chunk-tokens`` equal to vLLM's block size (the default, 128 on CPU) our
cache and vLLM's reuse the same prefix and compute the same rest, so **ours** must answer
exactly as **vllm**, token for token (checked; the exit status says). Against **off** the
answers may differ: computing a prompt's rest separately from its prefix changes the batch shape
of the matmuls, hence bf16 rounding; vLLM's own prefix cache does the same.

The model is a random-weight Llama generated here, larger than the tests' one (``--layers``,
``--hidden``), so that computing a prompt costs as much as on a small real model per token.

    python benchmarks/multiturn.py --turns 5 --conversations 2 [--tiers memory,disk] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from lmcache_pd.cli.demo import sse_events
from lmcache_pd.cli.local import LocalDeployment, local_config
from lmcache_pd.cli.tinymodel import build_tiny_model


def stream_ttft(url: str, prompt: list[int], max_tokens: int, request_id: str | None = None) -> tuple[float, list[int]]:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "return_token_ids": True}).encode()
    headers = {"content-type": "application/json", **({"x-request-id": request_id} if request_id else {})}
    req = urllib.request.Request(f"{url}/v1/completions", body, headers)
    t0 = time.perf_counter()
    ttft = None
    ids: list[int] = []
    for event in sse_events(req, 600):
        for c in event.get("choices", []):
            got = c.get("token_ids") or []
            if got and ttft is None:
                ttft = time.perf_counter() - t0
            ids += got
    if ttft is None:
        raise RuntimeError("no token streamed")
    return ttft, ids


def prefill_tokens(url: str) -> tuple[float, float]:
    """(computed, loaded) prompt tokens so far, from vLLM's counters on the prefill instance."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"local_compute": 0.0, "external_kv_transfer": 0.0}
    for m in re.finditer(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\} ([0-9.eE+-]+)$',
                         text, re.M):
        if m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    return out["local_compute"], out["external_kv_transfer"]


def user_message(n: int, seed: int) -> list[int]:
    """n ordinary token ids (the tokenizer's special ids are 0-5), different for every seed."""
    return np.random.default_rng(seed).integers(6, 506, n).tolist()


def run(mode: str, model: Path, work: Path, args: argparse.Namespace) -> list[list[dict]]:
    extra: dict = {"transport.name": "tcp", "pool.size_mib": 256}
    if mode == "ours":
        tiers = []
        for name in args.tiers.split(","):
            opts = {"path": str(work / "disk" / "{instance}.{rank}")} if name == "disk" else {}
            if name == "redis":
                opts = {"url": args.redis_url}
            tiers.append({"name": name, "options": opts})
        extra["cache"] = {"enabled": True, "chunk_tokens": args.chunk_tokens, "tiers": tiers}
    cfg = local_config(model, work, extra=extra)
    data = yaml.safe_load(cfg.read_text())
    if mode != "vllm":
        data["prefill"][0]["vllm_args"] = ["--no-enable-prefix-caching"]
    data["model"]["max_model_len"] = 16384
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    results: list[list[dict]] = []
    try:
        dep.start_all(timeout_s=900)
        proxy, prefill = dep.procs["proxy"].url, dep.procs["prefill-0"].url
        stream_ttft(proxy, user_message(64, seed=999), 2)  # warm-up: first-request costs
        for c in range(args.conversations):
            prompt = user_message(args.first_tokens, seed=1000 * c)
            turns = []
            for t in range(args.turns):
                before = prefill_tokens(prefill)
                ttft, answer = stream_ttft(proxy, prompt, args.answer_tokens)
                time.sleep(0.3)  # the frontend updates its counters after the response
                after = prefill_tokens(prefill)
                computed, loaded = after[0] - before[0], after[1] - before[1]
                turns.append({"turn": t + 1, "prompt_tokens": len(prompt), "ttft_s": ttft, "computed": computed,
                              "loaded": loaded, "answer": answer})
                print(f"  {mode} conversation {c + 1} turn {t + 1}: {len(prompt)} tokens, TTFT {ttft * 1e3:.0f} ms, "
                      f"computed {computed:.0f}, loaded {loaded:.0f}", file=sys.stderr)
                prompt = prompt + answer + user_message(args.turn_tokens, seed=1000 * c + t + 1)
            results.append(turns)
    finally:
        dep.stop_all()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--first-tokens", type=int, default=1024)
    ap.add_argument("--turn-tokens", type=int, default=256, help="tokens of each new user message")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=128, help="cache.chunk_tokens (default: CPU block size)")
    ap.add_argument("--tiers", default="memory", help="comma-separated cache tiers for the 'on' run")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lmcache-pd-multiturn-"))
    spec = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
            "num_attention_heads": args.hidden // 64, "num_key_value_heads": max(1, args.hidden // 256),
            "max_position_embeddings": 16384}
    model = build_tiny_model(root / "model", overrides=spec)
    runs = {mode: run(mode, model, root / mode, args) for mode in ("off", "vllm", "ours")}

    def same(a: str, b: str) -> tuple[int, int]:
        pairs = [(x["answer"], y["answer"]) for ca, cb in zip(runs[a], runs[b]) for x, y in zip(ca, cb)]
        return sum(x == y for x, y in pairs), len(pairs)

    lines = [f"model: random Llama, {args.layers} layers, hidden {args.hidden}; chunk {args.chunk_tokens} tokens; "
             f"tiers {args.tiers}; median of {args.conversations} conversations",
             "",
             "| turn | prompt tokens | TTFT off (ms) | TTFT vLLM prefix cache (ms) | TTFT ours (ms) | ours / off "
             "| ours / vLLM | hit rate ours | computed ours |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in range(args.turns):
        rows = {m: [c[t] for c in runs[m]] for m in runs}
        ttft = {m: statistics.median(x["ttft_s"] for x in rows[m]) for m in runs}
        loaded = sum(x["loaded"] for x in rows["ours"])
        total = loaded + sum(x["computed"] for x in rows["ours"])
        lines.append(f"| {t + 1} | {rows['ours'][0]['prompt_tokens']} | {ttft['off'] * 1e3:.0f} | "
                     f"{ttft['vllm'] * 1e3:.0f} | {ttft['ours'] * 1e3:.0f} | {ttft['ours'] / ttft['off']:.2f} | "
                     f"{ttft['ours'] / ttft['vllm']:.2f} | {loaded / total if total else 0:.0%} | "
                     f"{statistics.median(x['computed'] for x in rows['ours']):.0f} |")
    ok, n = same("ours", "vllm")
    off_ok, _ = same("ours", "off")
    lines += ["", f"answers of ours identical to vLLM's prefix cache: {ok} of {n} turns; "
                  f"identical to full recompute: {off_ok} of {n} (may differ: bf16 rounding of the rest)"]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
        (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
