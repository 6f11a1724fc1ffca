"""What the proxy's own path adds to the time to first token, by prompt length (no engine).

Two stand-ins for vLLM, each its own uvicorn process, answer at once: a "prefill" (one sampled
token and hand-off parameters, as ``proxy.first_token=prefill`` asks it) and a "decode" (a
streamed answer). Each parses the request body as JSON, as vLLM's server does. The proxy runs as
``lmcache-pd launch --role proxy`` in front of them. Measured, per prompt length (a prompt of
token ids, as the GPU benchmark sends), the time to the first streamed event:
  - ``direct``: the request straight to the stand-in decode (one HTTP hop with the same body:
    what a colocated instance's HTTP costs besides its engine) -- the ceiling;
  - ``proxy``: the same request through the proxy (client -> proxy -> prefill -> proxy -> client).
The difference is the proxy path's cost, which the GPU benchmark only sees in aggregate.

    python benchmarks/proxy_path.py --lens 256,1024,8192 --repeat 50
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lmcache_pd.cli.local import free_ports

_STANDIN = r'''
import json, sys, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

app = FastAPI()

@app.get("/health")
async def health():
    return {}

def event(text, tok, finish=None):
    choice = {"index": 0, "text": text, "token_ids": [tok], "logprobs": None, "finish_reason": finish}
    return b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
                                   "choices": [choice]}).encode() + b"\n\n"

@app.post("/v1/completions")
async def completions(request: Request):
    body = json.loads(await request.body())
    kv = body.get("kv_transfer_params") or {}
    n = len(body["prompt"])
    if kv.get("do_remote_decode"):
        choice = {"index": 0, "text": "x", "finish_reason": "length", "stop_reason": None,
                  "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5], "top_logprobs": None,
                               "text_offset": [0]} if body.get("logprobs") is not None else None}
        if body.get("return_token_ids"):
            choice |= {"token_ids": [7], "prompt_token_ids": body["prompt"]}
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny", "choices": [choice],
                "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
                "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                       "transfer_id": kv["transfer_id"], "num_tokens": n,
                                       "prompt_digest": "d" * 32, "prefill_peer": "prefill-0"}}
    async def events():
        for i in range(body.get("max_tokens", 8)):
            yield event("y", 8 + i, "length" if i + 1 == body.get("max_tokens", 8) else None)
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _healthy(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"port {port} did not become healthy in {timeout_s} s")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_event_s(port: int, body: bytes) -> float:
    """Seconds from sending a streamed completion to reading its first event (a new connection
    each time, as the GPU benchmark's client does)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()[:300]
    line = r.readline()
    took = time.perf_counter() - t0
    assert line.startswith(b"data: {"), line[:200]
    r.read()
    c.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="256,1024,8192")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    lens = [int(x) for x in args.lens.split(",")]
    work = Path(tempfile.mkdtemp(prefix="proxy-path-"))
    p_port, d_port, x_port, ctrl, data = free_ports(5)
    cfg = {"model": {"path": str(work), "served_name": "tiny"},
           "prefill": [{"name": "prefill-0", "http_port": p_port}],
           "decode": [{"name": "decode-0", "http_port": d_port, "control_port": ctrl, "data_port": data}],
           "proxy": {"port": x_port},
           "log_level": "warning"}
    (work / "pd.yaml").write_text(yaml.safe_dump(cfg))
    (work / "standin.py").write_text(_STANDIN)
    procs = [_spawn([sys.executable, str(work / "standin.py"), str(p)], work / f"standin-{p}.log")
             for p in (p_port, d_port)]
    procs.append(_spawn([sys.executable, "-m", "lmcache_pd.cli.main", "launch", "--role", "proxy",
                         "--config", str(work / "pd.yaml")], work / "proxy.log"))
    try:
        for port in (p_port, d_port, x_port):
            _healthy(port, 60)
        print("| prompt tokens | direct (ceiling) ms | proxy ms | proxy - direct ms | ratio | proxy CPU ms/request |")
        print("|---:|---:|---:|---:|---:|---:|")
        rows = []
        for n in lens:
            body = json.dumps({"model": "tiny", "prompt": list(range(1000, 1000 + n)), "max_tokens": 8,
                               "temperature": 0, "stream": True}).encode()
            got: dict[str, list[float]] = {"direct": [], "proxy": []}
            cpu0 = 0.0
            for i in range(args.warmup + args.repeat):
                if i == args.warmup:
                    cpu0 = cpu_s(procs[-1].pid)
                for name, port in (("direct", d_port), ("proxy", x_port)):  # taking turns: drift hits both
                    took = first_event_s(port, body)
                    if i >= args.warmup:
                        got[name].append(took * 1e3)
            cpu = (cpu_s(procs[-1].pid) - cpu0) / args.repeat * 1e3  # the decode's continuation included
            d, x = statistics.median(got["direct"]), statistics.median(got["proxy"])
            rows.append({"tokens": n, "direct_ms": d, "proxy_ms": x, "proxy_cpu_ms": cpu})
            print(f"| {n} | {d:.2f} | {x:.2f} | {x - d:+.2f} | {x / d:.2f}x | {cpu:.2f} |", flush=True)
        (work / "results.json").write_text(json.dumps(rows))
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
