"""Test helpers: the tiny model and a work folder for a deployment, and the main deployment's
short deadlines."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from lmcache_pd.cli.tinymodel import build_tiny_model

TRANSFER_S = 4.0
PREFILL_TIMEOUT_S = 2.0


def tiny_model_or_skip(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A work directory and the tiny model, one for the whole test session (LMCACHE_PD_TEST_MODEL_DIR
    names another); skips without vLLM. One model path matters: vLLM keys its torch.compile cache
    by it, and compiling takes about 30 s of each instance's start here, once per path."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (run scripts/setup)")
    work = tmp_path_factory.mktemp(name)
    shared = tmp_path_factory.getbasetemp() / "tiny-model"
    return work, build_tiny_model(Path(os.environ.get("LMCACHE_PD_TEST_MODEL_DIR", shared)))
