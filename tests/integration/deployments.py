"""Test helpers: the tiny model and a work folder for a deployment, and the main deployment's
short deadlines."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from lmcache_pd.cli.tinymodel import build_tiny_model

TRANSFER_S = 4.0
TP_TIMEOUTS = {"handshake_s": 60.0, "control_s": 30.0, "alloc_s": 30.0, "transfer_s": 60.0, "data_s": 30.0,
               "lease_s": 60.0, "heartbeat_s": 2.0, "peer_s": 30.0}
"""Deadlines of the TP deployments (test_e2e_tp*.py): their vLLM workers outnumber the cores, and
our control threads, in the same processes, wait behind them."""
QUIET_OMP = {"OMP_WAIT_POLICY": "PASSIVE"}
"""OpenMP threads that sleep when idle instead of spinning: with more vLLM workers than cores,
spinning threads starved the other processes' (and our control threads') share of the core."""
PREFILL_TIMEOUT_S = 2.0


def tp_cores_or_skip() -> None:
    """The TP deployments run more vLLM workers than this machine may have cores: on 2 vCPUs their
    spinning main threads (vLLM's message queues spin while the engine steps, e.g. while a load is
    pending) starved everything else for minutes in about half the runs, hand-offs timing out
    behind them. Run them with 4 CPUs or more, or force them with LMCACHE_PD_E2E_TP=1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 4 and os.environ.get("LMCACHE_PD_E2E_TP") != "1":
        pytest.skip(f"TP 2 deployments need 4 CPUs, this machine has {cpus}: their spinning vLLM workers "
                    "starved the control plane here (docs/tensor_parallel.md); LMCACHE_PD_E2E_TP=1 runs them anyway")


def tiny_model_or_skip(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A work directory and the tiny model, one for the whole test session (LMCACHE_PD_TEST_MODEL_DIR
    names another); skips without vLLM. One model path matters: vLLM keys its torch.compile cache
    by it, and compiling takes about 30 s of each instance's start here, once per path."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (run scripts/setup)")
    work = tmp_path_factory.mktemp(name)
    shared = tmp_path_factory.getbasetemp() / "tiny-model"
    return work, build_tiny_model(Path(os.environ.get("LMCACHE_PD_TEST_MODEL_DIR", shared)))
