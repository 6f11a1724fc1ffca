"""Test helpers: a client of a deployment (requests, vLLM's metrics, hand-off reports and records),
prompts, and waiting for a condition."""

from __future__ import annotations

import json
import re
import urllib.request

from lmcache_pd.proxy.answers import REPORT_HEADER
from tests.waiting import wait_for  # noqa: F401 - re-exported: the e2e tests take it from here

MAX_TOKENS = 16


HANDOFF = "_handoff_report"
"""Where ``post`` puts the hand-off report the proxy sent as a header (never a key of vLLM's)."""


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = json.load(r)
        report = r.headers.get(REPORT_HEADER)  # the proxy's (proxy.handoff_report)
        if report is not None:
            data[HANDOFF] = json.loads(report)
        return data, dict(r.headers)


def metrics(url: str) -> dict[str, float]:
    """vLLM's Prometheus counters, keyed 'name{labels}'."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def counter(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples with these labels; a metric that is absent fails the test."""
    total, seen = 0.0, False
    for key, value in m.items():
        if not key.startswith(name + "{") and key != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
            seen = True
    assert seen, f"metric {name}{labels or ''} is not exported (vLLM renamed it?)"
    return total


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """n token ids of ordinary vocabulary (the tokenizer's special ids are 0-5)."""
    return [6 + (i * 7919 + seed * 104729 + (i * i) % 13) % 500 for i in range(n)]


def completion(url: str, prompt, headers: dict | None = None, **extra) -> tuple[dict, dict]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True, **extra}
    return post(f"{url}/v1/completions", body, headers)


def token_ids(resp: dict) -> list[int]:
    return resp["choices"][0]["token_ids"]


def report(resp: dict) -> dict:
    """The decode's hand-off report: the proxy's header (``post``), or vLLM's own answer field when
    the request went to the decode instance itself."""
    return resp.get(HANDOFF) or (resp.get("kv_transfer_params") or {}).get("lmcache_pd", {})


def handoff_record(dep, instance: str, transfer_prefix: str, timeout_s: float = 10.0, event: str | None = None) -> dict:
    """The instance's handoff_log line for a transfer: written when the hand-off ended there
    (``event``: a later mark's line instead, e.g. ``first_token`` on the decode)."""
    found: list[dict] = []

    def seen() -> bool:
        path = dep.workdir / f"handoffs-{instance}.jsonl"
        if path.exists():
            found[:] = [r for r in map(json.loads, path.read_text().splitlines())
                        if r["transfer_id"].startswith(transfer_prefix) and r.get("event") == event]
        return bool(found)

    wait_for(seen, timeout_s, f"{instance} recorded no end of hand-off {transfer_prefix}")
    assert len(found) == 1, found
    return found[0]


def rank_records(dep, instance: str, transfer_id: str) -> dict[int, dict]:
    """Each rank's handoff_log line for a transfer, by rank."""
    path = dep.workdir / f"handoffs-{instance}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    found = [r for r in map(json.loads, lines) if r["transfer_id"] == transfer_id and r.get("event") is None]
    return {r["rank"]: r for r in found}


def failed_records(dep, instance: str, *, besides: set[str] = frozenset(), transfer_id: str | None = None) -> list[dict]:
    """The handoff_log lines of ``instance``'s failed hand-offs (any rank), leaving out the
    transfer ids ``besides`` (those that had failed before), only ``transfer_id``'s if given."""
    path = dep.workdir / f"handoffs-{instance}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("event") is None and not r["ok"]
            and r["transfer_id"] not in besides and transfer_id in (None, r["transfer_id"])]


def prompt_counters(url: str) -> dict[str, float]:
    m = metrics(url)
    return {k: counter(m, "vllm:prompt_tokens_by_source_total", source=k)
            for k in ("local_compute", "local_cache_hit", "external_kv_transfer")}


def loaded_as_colocated(dep, via: str, decode: str, ids: list[int]) -> dict:
    """Send ``ids`` to ``decode`` alone (the colocated reference: vLLM computes every token), then
    through proxy ``via``: the outputs must be equal token for token, the decode must have loaded
    the hand-off and computed only the prefill's sampled token (its report, and vLLM's own
    prompt-token counters: the client's prompt all external). Returns the hand-off report."""
    url = dep.procs[decode].url
    reference, _ = completion(url, ids)
    before = prompt_counters(url)
    got, _ = completion(dep.procs[via].url, ids)
    assert token_ids(got) == token_ids(reference), f"P/D output through {via} differs from {decode}'s alone"
    r = report(got)
    assert r["loaded"] is True and r["prompt_tokens_computed"] == 1, r
    wait_for(lambda: sum(prompt_counters(url).values()) - sum(before.values()) >= len(ids) + 1, 10,
             f"{decode}'s prompt token counters did not move")
    after = prompt_counters(url)
    assert {k: after[k] - before[k] for k in after} == {"local_compute": 1, "local_cache_hit": 0,
                                                         "external_kv_transfer": len(ids)}
    return r
