"""The package installed outside this checkout: the proxy alone, in an environment without torch
or vLLM; and the CUDA kernels' sources inside the installed package.

The wheel is built from a copy of this checkout's files and installed with its dependencies into
a new virtual environment (from the package index; pip's cache makes it quick after the first
time). torch must not be importable there, and ``lmcache-pd launch --role proxy``, run from that
environment in a folder outside the checkout, must serve completions in front of two scripted
instances: the first token from the prefill, the rest from the decode.

A second environment holds the same wheel and reaches torch and the other dependencies in the
environment running these tests (a path file; that environment's own lmcache_pd, an editable
install of this checkout, is not reachable through it): from there ``handoff_installed.py`` runs
a hand-off over tcp, bitwise, and the kernel loader's CPU fallback with the sources found inside
the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from lmcache_pd.cli.local import free_ports
from tests.scripted import Scripted

ROOT = Path(__file__).resolve().parents[2]
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv*", ".gpu*", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".ruff_cache")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of this checkout's files."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(work / "dist"), str(src)])
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("lmcache_pd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = {f"lmcache_pd/csrc/{f}" for f in ("copy_ranges.cu", "digest.cu", "ops.h")} - names
    assert not missing, f"the wheel lacks the CUDA kernels' sources (ops.py builds them at run time): {missing}"
    return wheel


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the package and its dependencies, and nothing else."""
    env = tmp_path_factory.mktemp("install") / "env"
    made = _run([sys.executable, "-m", "venv", str(env)])
    assert made.returncode == 0, made.stderr
    got = _run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)])
    if got.returncode != 0 and not _index_reachable():
        pytest.skip(f"the package index is not reachable from here, so the wheel's dependencies cannot be "
                    f"installed: {got.stderr.strip().splitlines()[-1:]}")
    assert got.returncode == 0, got.stderr[-3000:]
    return env


class Instance(Scripted):
    """A scripted vLLM: as a prefill, one token ("x", id 7) and hand-off parameters; as a decode, "ab"."""

    async def answer(self, body: dict) -> dict:
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            return {"id": "cmpl-1", "created": 1, "model": "tiny", "choices": [{
                "index": 0, "text": "x", "finish_reason": "length", "token_ids": [7],
                "prompt_token_ids": [1, 2, 3]}], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                            "total_tokens": 4},
                "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                       "transfer_id": kv["transfer_id"], "num_tokens": 3,
                                       "prompt_digest": "d" * 32, "prefill_peer": "prefill-0"}}
        return {"id": "cmpl-2", "created": 2, "model": "tiny", "choices": [{
            "index": 0, "text": "ab", "finish_reason": "length", "token_ids": [8, 9]}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}


def test_the_proxy_installed_without_torch_serves_completions(installed, serve, tmp_path):
    python = installed / "bin" / "python"
    no_torch = _run([str(python), "-c", "import torch"])
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, "torch is in the environment"
    where = _run([str(python), "-c", "import lmcache_pd; print(lmcache_pd.__file__)"], cwd=tmp_path)
    assert where.returncode == 0 and str(installed) in where.stdout, where  # the installed copy, not the checkout
    kernel = Path(where.stdout.strip()).parent / "csrc" / "copy_ranges.cu"  # where ops.py looks first
    assert kernel.is_file() and not kernel.is_symlink() and "__global__" in kernel.read_text()

    prefill, decode = Instance(), Instance()
    p_port, d_port, x_port, ctrl, data = free_ports(5)
    serve(prefill.app, p_port)
    serve(decode.app, d_port)
    cfg = tmp_path / "pd.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": "tiny", "served_name": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": p_port}],
        "decode": [{"name": "decode-0", "http_port": d_port, "control_port": ctrl, "data_port": data}],
        "proxy": {"port": x_port}}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen([str(installed / "bin" / "lmcache-pd"), "launch", "--role", "proxy", "--config",
                             str(cfg)], cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{x_port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the proxy exited ({proc.returncode}): {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the proxy never answered /health: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        req = urllib.request.Request(f"{url}/v1/completions", json.dumps(
            {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}).encode(),
            {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.load(r)
        assert answer["choices"][0]["text"] == "xab", answer
        assert "kv_transfer_params" not in answer
        (p,) = prefill.seen
        (d,) = decode.seen
        assert p["max_tokens"] == 1 and p["kv_transfer_params"]["do_remote_decode"]
        assert d["prompt"] == [1, 2, 3, 7] and d["kv_transfer_params"]["transfer_id"] == \
            p["kv_transfer_params"]["transfer_id"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


def test_an_installed_package_hands_off_bitwise_and_finds_its_kernels(wheel, tmp_path):
    env = tmp_path / "env"
    made = _run([sys.executable, "-m", "venv", str(env)])
    assert made.returncode == 0, made.stderr
    python = env / "bin" / "python"
    got = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    assert got.returncode == 0, got.stderr[-3000:]
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps-of-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = tmp_path / "handoff_installed.py"  # run from outside the checkout
    shutil.copy(Path(__file__).with_name("handoff_installed.py"), script)
    env_vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ran = _run([str(python), str(script), str(site)], cwd=tmp_path, env=env_vars)
    assert ran.returncode == 0 and ran.stdout.startswith("OK "), ran.stdout[-2000:] + ran.stderr[-3000:]
    print(ran.stdout.strip())
