"""``lmcache-pd demo``: 1 prefill + 1 decode + proxy on this machine, on a generated tiny model.

It sends a few prompts through the proxy (streamed), and prints for each the answer, the time
to first token seen by the client, and the hand-off: bytes moved from the prefill instance's
KV cache into the decode pool, data-plane time and throughput (from the decode instance's
hand-off log, matched by request id).
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from lmcache_pd.cli.local import LocalDeployment, local_config
from lmcache_pd.cli.tinymodel import build_tiny_model

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\nclass Config:\n    " * 6,
    "The quick brown fox jumps over the lazy dog. " * 60,
    "# A long module docstring that goes on and on.\n" * 150,
]


def stream_completion(url: str, prompt: str, max_tokens: int, request_id: str,
                      timeout_s: float = 120.0) -> tuple[str, float, float, int]:
    """(text, seconds to the first token, total seconds, prompt tokens) of one streamed completion."""
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body,
                                 {"content-type": "application/json", "x-request-id": request_id})
    t0 = time.monotonic()
    ttft = None
    text = []
    prompt_tokens = 0
    for event in sse_events(req, timeout_s):
        if event.get("usage"):
            prompt_tokens = event["usage"]["prompt_tokens"]
        if not event.get("choices"):
            continue
        piece = event["choices"][0].get("text", "")
        if piece and ttft is None:
            ttft = time.monotonic() - t0
        text.append(piece)
    return "".join(text), ttft if ttft is not None else float("nan"), time.monotonic() - t0, prompt_tokens


def sse_events(req: urllib.request.Request, timeout_s: float) -> Iterator[dict]:
    """The JSON events of a streamed OpenAI-style response; an error event raises."""
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            yield event


def _handoff(log: Path, request_id: str, timeout_s: float = 5.0) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text().splitlines():
                rec = json.loads(line)
                if rec["transfer_id"].startswith(request_id):
                    return rec
        time.sleep(0.1)
    return None


def run_demo(workdir: str, *, max_tokens: int = 24) -> int:
    work = Path(workdir).resolve()
    print(f"lmcache-pd demo: working in {work}")
    model = build_tiny_model(work / "tiny-model")
    cfg_path = local_config(model, work)
    dep = LocalDeployment(cfg_path, work)
    print("starting prefill-0, decode-0 and the proxy (vLLM on CPU takes about a minute)...", flush=True)
    t0 = time.monotonic()
    try:
        dep.start_all(timeout_s=600)
        print(f"all healthy after {time.monotonic() - t0:.0f} s; proxy at {dep.procs['proxy'].url}\n")
        url = dep.procs["proxy"].url
        stream_completion(url, "warm up", 2, uuid.uuid4().hex)  # first request compiles kernels
        log = work / "handoffs-decode-0.jsonl"
        rows = []
        for i, prompt in enumerate(PROMPTS):
            rid = f"demo{i}-{uuid.uuid4().hex[:8]}"
            text, ttft, total, n_prompt = stream_completion(url, prompt, max_tokens, rid)
            h = _handoff(log, rid)
            rows.append((i, prompt, text, ttft, total, h))
            print(f"[{i}] prompt ({n_prompt} tokens): {prompt[:60]!r}{'...' if len(prompt) > 60 else ''}")
            print(f"    answer: {text!r}")
            if h and h["ok"]:
                gbps = h["num_bytes"] / h["transfer_s"] / 1e9 if h["transfer_s"] else float("nan")
                print(f"    TTFT {ttft * 1e3:.1f} ms, total {total * 1e3:.1f} ms; hand-off {h['num_bytes']} B "
                      f"in {h['transfer_s'] * 1e3:.2f} ms ({gbps:.2f} GB/s)\n")
            else:
                why = h["error"] if h else "no hand-off record"
                print(f"    TTFT {ttft * 1e3:.1f} ms, total {total * 1e3:.1f} ms; decode recomputed ({why})\n")
        ok = all(h and h["ok"] for *_, h in rows)
        print("summary: every prompt was prefilled on prefill-0 and its KV moved to decode-0 by the tcp "
              "transport (on one host the decode copies it out of the prefill's memory, the socket carrying "
              "only its range table: transport.options.same_host_reads)"
              if ok else "summary: some hand-offs failed (the answers above were still served)")
        return 0 if ok else 1
    finally:
        dep.stop_all()
        print(f"stopped; logs are in {work}")
