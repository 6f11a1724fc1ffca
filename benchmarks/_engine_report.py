"""What gpu_engine.py measured, laid out: each hand-off's timeline from the client's clock and
both hand-off logs, and the summary (markdown) of a run's results."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache_pd.node.timeline import hidden_fraction  # noqa: E402

ENGINE_TIMES = ("time_to_first_token", "request_queue_time", "request_prefill_time")
"""vLLM's own request-phase histograms the benchmark reads (``vllm:<name>_seconds``)."""

SEGMENTS = {
    "to_load": "client sends -> decode asks for the KV (its request scheduled)",
    "to_computed": "client sends -> the prefill's forward over the prompt's last chunk ended (a whole hand-off "
                   "on CPU: its scheduler saw the request finish, just after)",
    "to_handoff": "client sends -> prefill's hand-off starts",
    "transfer": "hand-off starts -> all pages in the decode pool",
    "exposed": "prompt computed -> last byte in the decode pool (the transfer not hidden under the prefill)",
    "scatter": "pages in the pool -> in vLLM's blocks",
    "decode_first": "in vLLM's blocks -> the decode step that computed the first token ended (its own mark)",
    "after": "scattered -> first token at the client (report, schedule, forward, stream; negative "
             "where the prefill's token came first)",
}


def handoff_records(path: Path, event: str | None = None) -> dict[str, dict]:
    """A hand-off log's records by request id (a transfer id is ``<request id>-<8 hex>``); the
    last record wins: a workdir reused by an earlier run holds older ones. ``event``: the
    records of a later mark instead of the hand-off's end (``first_token`` on the decode)."""
    if not path.exists():
        return {}
    return {r["transfer_id"].rsplit("-", 1)[0]: r for r in map(json.loads, path.read_text().splitlines())
            if r.get("event") == event}


def timelines(sent: dict, logs: dict[str, Path]) -> dict:
    """Median ms of each timeline segment (SEGMENTS) per P/D target and length, from the
    client's wall clock and both hand-off logs (one machine: one clock). Transfer ids start with
    the client's request id."""
    out: dict = {}
    for target, per in sent.items():
        work = logs[target]
        sender, loader = handoff_records(work / "handoffs-prefill-0.jsonl"), handoff_records(
            work / "handoffs-decode-0.jsonl")
        firsts = handoff_records(work / "handoffs-decode-0.jsonl", event="first_token")
        for n, reqs in per.items():
            seg: dict[str, list[float]] = {k: [] for k in (*SEGMENTS, "hidden")}
            for req_id, at, first in reqs:
                p, d = sender.get(req_id), loader.get(req_id)
                if not (p and d and p["ok"] and d["ok"] and d.get("ready_at")):
                    continue
                seg["to_load"].append(d["submitted_at"] - at)
                seg["to_computed"].append(p.get("computed_at", 0.0) - at if p.get("computed_at") else float("nan"))
                seg["to_handoff"].append(p["started_at"] - at)
                seg["transfer"].append(d["ready_at"] - p["started_at"])
                seg["exposed"].append(p["last_byte_at"] - p["computed_at"] if p.get("computed_at") and
                                      p.get("last_byte_at") else float("nan"))
                seg["hidden"].append(hidden_fraction(SimpleNamespace(**p)) if "computed_at" in p else float("nan"))
                seg["scatter"].append(d["done_at"] - d["ready_at"])
                f = firsts.get(req_id)
                seg["decode_first"].append(f["first_token_at"] - f["loaded_at"] if f else float("nan"))
                seg["after"].append(first - d["done_at"])
            hidden = seg.pop("hidden")
            out.setdefault(target, {})[n] = {k: statistics.median(v) * 1e3 if v else float("nan")
                                             for k, v in seg.items()} | {"requests": len(seg["after"]),
                                                                         "hidden": statistics.median(hidden) if hidden else float("nan")}
    return out


def median_ci(diffs: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of ``diffs`` (seeded: the same report each time)."""
    x = np.asarray(diffs, dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan")
    meds = np.median(np.random.default_rng(0).choice(x, (resamples, len(x))), axis=1)
    return float(np.quantile(meds, (1 - level) / 2)), float(np.quantile(meds, (1 + level) / 2))


def turn_diffs(each: dict, target: str, base: str, n: int) -> list[float]:
    """Each of ``target``'s requests at ``n`` tokens minus ``base``'s of the same turn (``each``:
    every request's TTFT by target and length, its keys ints or, read back from JSON, strings)."""
    a, b = (each.get(t, {}).get(n) or each.get(t, {}).get(str(n)) or [] for t in (target, base))
    return [x - y for x, y in zip(a, b)]


def _ci(r: dict, target: str, base: str, n: int) -> str:
    """`` [lo, hi]``: the 95% interval of the median of :func:`turn_diffs`, where every request's
    TTFT is in the results (else empty)."""
    diffs = turn_diffs(r.get("ttft_each_ms", {}), target, base, n)
    if not diffs:
        return ""
    lo, hi = median_ci(diffs)
    return f" [{lo:+.1f}, {hi:+.1f}]"


def alone_of(target: str) -> str:
    """The target that computes prompts alone in ``target``'s prefill process (pd-<d>[-dec] -> alone-<d>)."""
    return "alone-" + target.removeprefix("pd-").removesuffix("-dec") if target.startswith("pd-") else ""


def _table(title: str, head: list[str], align: str, rows: list[str]) -> list[str]:
    """A titled markdown table's lines (a blank line before the title and before the table)."""
    return ["", title, "", "| " + " | ".join(head) + " |", align, *rows]


def render(r: dict, lens: list[int]) -> str:
    v = r.get("versions", {})
    pd = r.get("pd_targets") or [f"pd-{t}" for t in r["transports"]]
    compared = pd + r.get("other_targets", [])  # vllm-nixl: vLLM's NixlConnector, through its own proxy
    lines = [f"# P/D inside vLLM's engine against colocated, {r['date']}, {v.get('device')}, vLLM {v.get('vllm')}, "
             f"torch {v.get('torch')}, model {r.get('shape')}, {'eager' if r['eager'] else 'CUDA graphs'}, "
             f"{r.get('settle_ms', 0):g} ms between requests", "",
             "TTFT, median ms (streamed, 8 tokens); pd-<transport>: hand-offs whole (transport.layerwise off), "
             "-layered: layer by layer (the default); proxy.first_token=prefill (the default), "
             "-dec: first_token=decode, dispatch=concurrent:",
             "", "| prompt tokens | colocated | " + " | ".join(f"{t} | diff | ratio" for t in compared) + " |",
             "|---:|---:|" + "---:|---:|---:|" * len(compared)]
    ttft = r.get("ttft_ms", {})
    for n in lens:
        c = ttft["colocated"][n]
        row = f"| {n} | {c:.2f} |"
        for t in compared:
            p = ttft[t][n]
            row += f" {p:.2f} | {p - c:+.2f} | {p / c:.3f} |"
        lines.append(row)
    paired = r.get("paired_diff_ms", {})
    if paired:
        lines += _table("TTFT difference from colocated, median over the turns of each request's own difference "
                        "(ms; each P/D request against colocated's of the same turn, seconds apart; [a 95% "
                        "bootstrap interval of that median]):",
                        ["prompt tokens", *compared], "|---:|" + "---:|" * len(compared),
                        [f"| {n} |" + "".join(f" {paired[t][n]:+.2f} ({paired[t][n] / ttft['colocated'][n]:+.1%})"
                                              f"{_ci(r, t, 'colocated', n)} |"
                                              if t in paired else " |" for t in compared) for n in lens])
    own = r.get("own_prefill_diff_ms", {})
    if own:
        alone = r.get("alone_targets", [])
        lines += _table("The same prompts computed alone by each deployment's own prefill vLLM (alone-<deployment>: "
                        "asked directly, no hand-off), median ms; and each P/D request's difference from the alone "
                        "request of its turn, median (ms, and of alone's median):",
                        ["prompt tokens", *alone, *compared], "|---:|" + "---:|" * (len(alone) + len(compared)),
                        [f"| {n} |" + "".join(f" {ttft[t][n]:.2f} |" for t in alone)
                         + "".join(f" {own[t][n]:+.2f} ({own[t][n] / ttft[base][n]:+.1%}){_ci(r, t, base, n)} |"
                                   if t in own and (base := alone_of(t)) in ttft else " |" for t in compared)
                         for n in lens])
    tt2 = r.get("second_token_ms", {})
    if tt2:
        lines += _table("Time to the second token, median ms (the same requests):",
                        ["prompt tokens", "colocated", *(f"{t} | diff" for t in compared)],
                        "|---:|---:|" + "---:|---:|" * len(compared),
                        [f"| {n} | {tt2['colocated'][n]:.2f} |" + "".join(
                            f" {tt2[t][n]:.2f} | {tt2[t][n] - tt2['colocated'][n]:+.2f} |" for t in compared)
                         for n in lens])
    legs = r.get("prefill_leg_ms", {})
    if legs:
        lines += _table("The proxy's prefill request (mean ms) and the rest of P/D's TTFT:",
                        ["prompt tokens", *(f"{t} prefill leg | rest" for t in pd)], "|---:|" + "---:|---:|" * len(pd),
                        [f"| {n} |" + "".join(f" {legs[t][n]:.2f} | {ttft[t][n] - legs[t][n]:.2f} |" for t in pd)
                         for n in lens])
    tl = r.get("timeline_ms", {})
    if tl:
        lines += ["", "Timeline of a hand-off, median ms per segment (" + "; ".join(
            f"{k}: {d}" for k, d in SEGMENTS.items()) + "):", "",
            "| target | prompt tokens | requests | " + " | ".join(SEGMENTS) + " | transfer hidden under the prefill |",
            "|---|---:|---:|" + "---:|" * (len(SEGMENTS) + 1)]
        for t in pd:
            for n in lens:
                row = tl.get(t, {}).get(n)
                if row:
                    lines.append(f"| {t} | {n} | {row['requests']} | " + " | ".join(
                        f"{row.get(k, float('nan')):.2f}" for k in SEGMENTS) + f" | {row.get('hidden', float('nan')):.0%} |")
    ours = r.get("our_threads_cpu_ms", {})
    if ours:
        lines += ["", "CPU time of our threads (pd-*, named in the OS) inside each instance, ms per request "
                  "it served (all of them, then the three busiest):", "",
                  "| instance | prompt tokens | all | busiest |", "|---|---:|---:|---|"]
        for name, per in ours.items():
            for n, row in per.items():
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(row.items())[1:4])
                lines.append(f"| {name} | {n} | {row['all']:.2f} | {top} |")
    eng = r.get("engine_ms", {})
    if eng:
        lines += ["", "vLLM's own request phases, mean ms over every request it served (both proxies', and on a prefill its alone ones) (" + ", ".join(ENGINE_TIMES) + "):",
                  "", "| engine | prompt tokens | " + " | ".join(ENGINE_TIMES) + " |", "|---|---:|" + "---:|" * len(ENGINE_TIMES)]
        for name, per in eng.items():
            for n, row in per.items():
                lines.append(f"| {name} | {n} | " + " | ".join(f"{row[k]:.2f}" for k in ENGINE_TIMES) + " |")
    lines += ["", "`vllm bench serve` (random dataset):", "",
              "| target | concurrency | req/s | output tok/s | goodput req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, per in r.get("serve", {}).items():
        for c, s in per.items():
            lines.append(f"| {name} | {c} | {s['request_throughput']:.2f} | {s['output_throughput']:.0f} | "
                         f"{s['request_goodput'] or 0:.2f} | {s['median_ttft_ms']:.1f} / {s['p99_ttft_ms']:.1f} | "
                         f"{s['median_tpot_ms']:.2f} / {s['p99_tpot_ms']:.2f} |")
    return "\n".join(lines) + "\n"
