"""The supported vLLM range, and the one module that knows how vLLM versions differ."""

from __future__ import annotations

import importlib.util
import os

import pytest

from lmcache_pd.cli import launch as launcher
from lmcache_pd.connector import compat
from lmcache_pd.errors import ConfigError
from tests.unit.nodes import make_cfg


@pytest.mark.parametrize("text, want", [("0.24.0", (0, 24)), ("0.32.1+cpu", (0, 32)), ("0.33.0rc1", (0, 33)),
                                        (" 1.0", (1, 0))])
def test_parse_version(text, want):
    assert compat.parse_version(text) == want


@pytest.mark.parametrize("version", ["0.24.0", "0.24.3+cpu", "0.28.1", "0.32.0", "0.32.2"])
def test_supported_versions_pass(version):
    compat.check_supported(version)


@pytest.mark.parametrize("version", ["0.23.9", "0.33.0", "1.0.0", "dev", ""])
def test_other_versions_are_refused_naming_both(version):
    with pytest.raises(ConfigError) as e:
        compat.check_supported(version)
    assert f"vLLM {version} is installed" in str(e.value) and "0.24 to 0.32" in str(e.value)
    assert e.value.field == "vllm"


def test_launcher_refuses_an_unsupported_vllm_before_starting_it(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "0.20.1")
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("vLLM was started"))
    with pytest.raises(ConfigError, match=r"vLLM 0\.20\.1 is installed; lmcache-pd supports vLLM 0\.24 to 0\.32"):
        launcher.launch(make_cfg(), "prefill", None)
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        launcher.launch(make_cfg(), "decode", None)


def test_importing_the_connector_package_does_not_import_vllm():
    # The launcher reads compat before anything of vLLM is imported (a wrong vLLM may not import).
    import subprocess
    import sys

    code = ("import sys, lmcache_pd.connector, lmcache_pd.connector.compat; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here (run scripts/setup)")
def test_the_installed_vllm_is_supported_and_detected_as_what_it_is():
    version = compat.installed_version()
    assert version is not None
    compat.check_supported(version)
    new = compat.parse_version(version) >= (0, 32)
    # The layout request and the failure channel follow the installed vLLM (both ends in CI:
    # 0.32 in scripts/test, 0.24 in scripts/test-vllm024).
    assert compat.required_kv_layout() == ("LBHNC" if new else None)
    assert compat.reports_failed_recving() is new
    assert (compat.cache_hit_kinds() is not None) is new
    from lmcache_pd.connector import PDConnector  # the lazy lookup vLLM does

    assert PDConnector.get_required_kvcache_layout(None) == compat.required_kv_layout()
