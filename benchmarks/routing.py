"""Routing policies on a multi-turn workload: round robin against KV-aware against KV-aware with
conditional disaggregation, on 2 prefill and 2 decode instances behind one proxy each.

Several conversations run at once, each re-sending its whole history every turn (turn k's prompt
= turn k-1's prompt + its answer + a new user message), through three proxies over the same four
instances, one after the other, with the same conversations (the instances' cache tiers are
cleared between them, so each policy starts cold):
- **round_robin**: ``proxy.policy: round_robin``;
- **kv_aware**: ``proxy.policy: kv_aware`` (a turn goes to the prefill and the decode that hold
  its history);
- **kv_aware+alone**: the same with ``routing.decode_alone_tokens`` (``--alone-tokens``): a turn
  whose decode holds all but that many of its tokens is served by the decode alone.

Per policy and turn: TTFT (the client's time to the first streamed token, median over the
conversations); for the whole run: the prompt tokens loaded from the prefills' tiers against
those computed (vLLM's counters on the prefill instances), the bytes handed off (the prefill
instances' hand-off logs) and the requests served without a prefill (the proxy's
``lmcache_pd_proxy_routes_total``). Round robin, measured in the same run, is the reference;
every policy's answers must equal round robin's, token for token (the exit status says).
Instances: the tcp transport, our memory tier, vLLM's own prefix cache off; prefill-0 and
decode-1 on core 0, prefill-1 and decode-0 on the last core.

    python benchmarks/routing.py --conversations 4 --turns 4 [--alone-tokens 256] [--out DIR]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from multiturn import prefill_tokens, stream_ttft, user_message

from lmcache_pd.cli.local import LocalDeployment, free_ports, local_config
from lmcache_pd.cli.tinymodel import build_tiny_model

POLICIES = ("round_robin", "kv_aware", "kv_aware+alone")
TAG = {"round_robin": "rr", "kv_aware": "kv", "kv_aware+alone": "alone"}
"""Each policy's request ids start with its tag (hand-off logs name transfers by them)."""
PREFILLS = ("prefill-0", "prefill-1")


def deployment(model: Path, work: Path, args: argparse.Namespace) -> LocalDeployment:
    cfg = local_config(model, work, extra={
        "transport.name": "tcp", "pool.size_mib": 256, "proxy.handoff_report": False,
        "cache": {"enabled": True, "chunk_tokens": args.chunk_tokens,
                  "tiers": [{"name": "memory", "options": {"size_mib": 512}}]}})
    data = yaml.safe_load(cfg.read_text())
    p0, d0 = data["prefill"][0], data["decode"][0]
    for inst in (p0, d0):
        inst["vllm_args"] = ["--no-enable-prefix-caching"]
    http_p, api_p, http_d, api_d, ctrl, dport = free_ports(6)
    data["prefill"].append({**p0, "name": "prefill-1", "http_port": http_p, "cache_port": api_p, "cpus": d0["cpus"]})
    data["decode"].append({**d0, "name": "decode-1", "http_port": http_d, "cache_port": api_d, "control_port": ctrl,
                           "data_port": dport, "cpus": p0["cpus"]})
    data["model"]["max_model_len"] = 16384
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    del dep.procs["proxy"]
    dep.add_proxy("round_robin", "proxy.policy=round_robin")
    dep.add_proxy("kv_aware", "proxy.policy=kv_aware")
    dep.add_proxy("kv_aware+alone", "proxy.policy=kv_aware", f"proxy.routing.decode_alone_tokens={args.alone_tokens}")
    return dep


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def routes(proxy: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{proxy}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {f"{m.group(2)}:{m.group(1)}": float(m.group(3)) for m in re.finditer(
        r'^lmcache_pd_proxy_routes_total\{reason="(\w+)",role="(\w+)"\} ([0-9.eE+-]+)$', text, re.M)}
    for m in re.finditer(r'^lmcache_pd_proxy_routing_lookup_seconds_(count|sum) ([0-9.eE+-]+)$', text, re.M):
        out[f"lookup:{m.group(1)}"] = float(m.group(2))  # asking the instances what they hold
    return out


def handed_off_bytes(dep: LocalDeployment, policy: str) -> int:
    total = 0
    for name in PREFILLS:
        path = dep.workdir / f"handoffs-{name}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            if r["transfer_id"].startswith(f"{TAG[policy]}-c") and r.get("ok"):
                total += r.get("num_bytes", 0)
    return total


def conversation(proxy: str, policy: str, c: int, args: argparse.Namespace) -> list[dict]:
    prompt = user_message(args.first_tokens, seed=1000 * c)
    turns = []
    for t in range(args.turns):
        ttft, answer = stream_ttft(proxy, prompt, args.answer_tokens, request_id=f"{TAG[policy]}-c{c}-t{t}")
        turns.append({"turn": t + 1, "prompt_tokens": len(prompt), "ttft_s": ttft, "answer": answer})
        prompt = prompt + answer + user_message(args.turn_tokens - len(answer), seed=1000 * c + t + 1)
    return turns


def run(dep: LocalDeployment, policy: str, args: argparse.Namespace) -> dict:
    proxy = dep.procs[policy].url
    post(f"{proxy}/cache/clear", {"all": True})  # each policy starts cold
    before = {p: prefill_tokens(dep.procs[p].url) for p in PREFILLS}
    r0 = routes(proxy)
    with ThreadPoolExecutor(args.conversations) as pool:
        convs = list(pool.map(lambda c: conversation(proxy, policy, c, args), range(args.conversations)))
    time.sleep(0.5)  # vLLM's frontend updates its counters after the response
    after = {p: prefill_tokens(dep.procs[p].url) for p in PREFILLS}
    computed = sum(after[p][0] - before[p][0] for p in PREFILLS)
    loaded = sum(after[p][1] - before[p][1] for p in PREFILLS)
    r1 = routes(proxy)
    decided = {k: r1[k] - r0.get(k, 0.0) for k in r1 if r1[k] - r0.get(k, 0.0) and not k.startswith("lookup:")}
    alone = sum(v for k, v in decided.items() if k in ("prefill:decode_holds_prompt", "prefill:short_prompt"))
    asked = r1.get("lookup:count", 0.0) - r0.get("lookup:count", 0.0)
    lookup_s = (r1.get("lookup:sum", 0.0) - r0.get("lookup:sum", 0.0)) / asked if asked else 0.0
    return {"conversations": convs, "computed": computed, "loaded": loaded, "bytes": handed_off_bytes(dep, policy),
            "decode_alone": alone, "routes": decided, "lookups": asked, "lookup_s": lookup_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-tokens", type=int, default=512)
    ap.add_argument("--turn-tokens", type=int, default=128, help="tokens each turn adds (answer + new message)")
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=128, help="cache.chunk_tokens (default: CPU block size)")
    ap.add_argument("--alone-tokens", type=int, default=256, help="routing.decode_alone_tokens of kv_aware+alone")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lmcache-pd-routing-"))
    spec = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
            "num_attention_heads": max(1, args.hidden // 64), "num_key_value_heads": max(1, args.hidden // 256),
            "max_position_embeddings": 16384}
    model = build_tiny_model(root / "model", overrides=spec)
    dep = deployment(model, root / "dep", args)
    runs: dict[str, dict] = {}
    try:
        dep.start_all(timeout_s=900)
        deadline = time.monotonic() + 60
        while not all(all(i["healthy"] for i in get(f"{dep.procs[p].url}/admin/instances")["instances"].values())
                      for p in POLICIES):
            if time.monotonic() > deadline:
                raise TimeoutError("the proxies did not see every instance healthy")
            time.sleep(0.5)
        stream_ttft(dep.procs["round_robin"].url, user_message(64, seed=999), 2)  # warm-up
        for policy in POLICIES:
            runs[policy] = run(dep, policy, args)
            print(f"  {policy}: done", file=sys.stderr)
    finally:
        dep.stop_all()

    lines = [f"model: random Llama, {args.layers} layers, hidden {args.hidden}; {args.conversations} conversations at "
             f"once, {args.turns} turns, first prompt {args.first_tokens} tokens, +{args.turn_tokens} a turn; "
             f"kv_aware+alone: routing.decode_alone_tokens={args.alone_tokens}", "",
             "| turn | prompt tokens | " + " | ".join(f"TTFT {p} (ms)" for p in POLICIES)
             + " | " + " | ".join(f"{p} / round_robin" for p in POLICIES[1:]) + " |",
             "|---:|---:|" + "---:|" * (2 * len(POLICIES) - 1)]
    for t in range(args.turns):
        ttft = {p: statistics.median(c[t]["ttft_s"] for c in runs[p]["conversations"]) for p in POLICIES}
        n = runs["round_robin"]["conversations"][0][t]["prompt_tokens"]
        lines.append(f"| {t + 1} | {n} | " + " | ".join(f"{ttft[p] * 1e3:.0f}" for p in POLICIES) + " | "
                     + " | ".join(f"{ttft[p] / ttft['round_robin']:.2f}" for p in POLICIES[1:]) + " |")
    lines += ["", "| policy | prompt tokens loaded / computed (prefills) | prefix hit rate | MiB handed off "
                  "| requests without a prefill | asking the instances: requests, mean ms | routing reasons |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for p in POLICIES:
        r = runs[p]
        total = r["loaded"] + r["computed"]
        lines.append(f"| {p} | {r['loaded']:.0f} / {r['computed']:.0f} | {r['loaded'] / total if total else 0:.0%} | "
                     f"{r['bytes'] / 2**20:.1f} | {r['decode_alone']:.0f} | "
                     f"{r['lookups']:.0f}, {r['lookup_s'] * 1e3:.2f} | "
                     + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["routes"].items())) + " |")
    ref = [c["answer"] for conv in runs["round_robin"]["conversations"] for c in conv]
    same = {p: sum(a == b for a, b in zip(ref, [c["answer"] for conv in runs[p]["conversations"] for c in conv]))
            for p in POLICIES[1:]}
    lines += ["", "answers identical to round robin's: " + ", ".join(f"{p} {n} of {len(ref)}" for p, n in same.items())]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
        (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    return 0 if all(n == len(ref) for n in same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
