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
    """A work directory and the tiny model (LMCACHE_PD_TEST_MODEL_DIR reuses one); skips without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (run scripts/setup)")
    work = tmp_path_factory.mktemp(name)
    return work, build_tiny_model(Path(os.environ.get("LMCACHE_PD_TEST_MODEL_DIR", work / "tiny-model")))
