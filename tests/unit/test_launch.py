"""What the launcher hands vLLM: the config through the environment, never the command line
(every local user can read /proc/*/cmdline, and vLLM logs its arguments)."""

from __future__ import annotations

import json
import os
import types

import pytest

from lmcache_pd import transport as transports
from lmcache_pd.cli.launch import instance_env, vllm_command
from lmcache_pd.config import RESOLVED_ENV, config_from_dict, redact
from lmcache_pd.errors import ConfigError

PASSWORD = "pw-0d6f1e2a9b"


def cfg_with_a_password():
    return config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": 18001}],
        "decode": [{"name": "decode-0", "http_port": 18002, "control_port": 18003, "data_port": 18004}],
        "cache": {"enabled": True, "tiers": [{"name": "redis", "options": {"url": f"redis://:{PASSWORD}@db:6379/0"}}]},
    }, source="test")


def test_the_command_line_names_where_the_config_is_and_holds_none_of_it():
    cfg = cfg_with_a_password()
    argv = vllm_command(cfg, "prefill-0", python="python")
    assert PASSWORD not in " ".join(argv)
    ktc = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert ktc["kv_connector_extra_config"] == {"config_env": RESOLVED_ENV, "instance": "prefill-0"}
    env = instance_env(cfg, cfg.instance("prefill-0"), {"PATH": "/bin"})
    assert config_from_dict(json.loads(env[RESOLVED_ENV]), source="env") == cfg


def test_the_connector_reads_the_config_from_the_environment(monkeypatch):
    pytest.importorskip("vllm", reason="the connector facade needs vLLM")
    from lmcache_pd.connector import compat
    from lmcache_pd.connector.facade import load_settings

    cfg = cfg_with_a_password()
    ktc = types.SimpleNamespace(kv_connector_extra_config={"config_env": RESOLVED_ENV, "instance": "decode-0"},
                                kv_role="kv_consumer")
    vllm_config = types.SimpleNamespace(kv_transfer_config=ktc)
    monkeypatch.setattr(compat, "check_supported", lambda v: None)
    monkeypatch.setenv(RESOLVED_ENV, json.dumps(cfg.to_dict()))
    got, instance, role = load_settings(vllm_config)
    assert (got, instance, role) == (cfg, "decode-0", "decode")
    monkeypatch.delenv(RESOLVED_ENV)
    with pytest.raises(ConfigError, match="config_env"):
        load_settings(vllm_config)


def test_only_a_prefill_instance_with_layered_handoffs_gives_up_full_cuda_graphs(monkeypatch):
    """Layered hand-offs need vLLM's per-layer hooks (a full CUDA graph runs none), so the
    connector asks vLLM for piecewise graphs; only where layers are sent: the decode instance of
    the same deployment keeps its full graphs."""
    pytest.importorskip("vllm", reason="the connector facade needs vLLM")
    from lmcache_pd.connector.facade import PDConnector

    monkeypatch.delenv("LMCACHE_PD_INSTANCE", raising=False)
    layered = cfg_with_a_password().to_dict()
    layered["transport"]["layerwise"] = True
    whole = cfg_with_a_password().to_dict()
    whole["transport"]["layerwise"] = False
    assert PDConnector.requires_piecewise_for_cudagraph({"config": layered, "instance": "prefill-0"})
    assert not PDConnector.requires_piecewise_for_cudagraph({"config": layered, "instance": "decode-0"})
    assert not PDConnector.requires_piecewise_for_cudagraph({"config": whole, "instance": "prefill-0"})
    monkeypatch.setenv("LMCACHE_PD_INSTANCE", "prefill-0")  # the name from the environment
    assert PDConnector.requires_piecewise_for_cudagraph({"config": layered})


def test_urls_in_logs_lose_their_password():
    assert redact(f"redis tier redis://:{PASSWORD}@db:6379/0 is down") == "redis tier redis://:***@db:6379/0 is down"
    assert redact(f"rediss://user:{PASSWORD}@db/1") == "rediss://user:***@db/1"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"


def test_the_transports_environment_is_set_by_the_launcher_and_the_operators_value_wins(monkeypatch):
    """transport.options.ucx_tls reaches UCX through the instance's environment, which the
    launcher builds (the transport never writes os.environ); UCX_TLS set by the operator, in the
    launcher's environment or the instance's ``env``, wins."""
    monkeypatch.delenv("UCX_TLS", raising=False)
    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": 18001}],
        "decode": [{"name": "decode-0", "http_port": 18002, "control_port": 18003, "data_port": 18004,
                    "env": {"UCX_TLS": "tcp"}}],
        "transport": {"name": "nixl", "options": {"ucx_tls": "cuda_ipc,cuda_copy,tcp"}},
    }, source="test")
    assert instance_env(cfg, cfg.instance("prefill-0"), {"PATH": "/bin"})["UCX_TLS"] == "cuda_ipc,cuda_copy,tcp"
    assert instance_env(cfg, cfg.instance("prefill-0"), {"UCX_TLS": "rc,cuda_copy"})["UCX_TLS"] == "rc,cuda_copy"
    assert instance_env(cfg, cfg.instance("decode-0"), {})["UCX_TLS"] == "tcp"
    tcp = config_from_dict({**cfg.to_dict(), "transport": {"name": "tcp"}}, source="test")
    assert "UCX_TLS" not in instance_env(tcp, tcp.instance("prefill-0"), {})
    if transports.available("nixl")[0]:  # constructing it leaves the process's environment alone
        t = transports.create("nixl", {"ucx_tls": "tcp"})
        t.close()
        assert "UCX_TLS" not in os.environ


def test_vllm_starts_from_its_working_compile_cache_unless_the_operator_says_otherwise():
    """vLLM 0.32's AOT-compiled artifacts fail to load on torch 2.13, so each start compiled again:
    the launcher turns AOT compilation off by default; the operator's value wins."""
    cfg = cfg_with_a_password()
    assert instance_env(cfg, cfg.instance("prefill-0"), {})["VLLM_USE_AOT_COMPILE"] == "0"
    assert instance_env(cfg, cfg.instance("prefill-0"), {"VLLM_USE_AOT_COMPILE": "1"})["VLLM_USE_AOT_COMPILE"] == "1"


def test_per_rank_cpus_pin_the_instance_to_all_of_them_and_bind_each_rank_to_its_own():
    """TP 2 on two cores: ``cpus: "0|1"``. taskset takes every rank's CPUs; vLLM's OpenMP binding
    gets the per-rank form as vLLM reads it ("0|1": rank 0 on CPU 0, rank 1 on CPU 1). A count of
    lists that is not the TP size is refused, naming the field."""
    from lmcache_pd.cli.launch import pinned

    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": 18001, "tp_size": 2, "cpus": "0|1"}],
        "decode": [{"name": "decode-0", "http_port": 18002, "control_port": 18003, "data_port": 18005,
                    "tp_size": 2, "cpus": "2-3|4-5"}],
    }, source="test")
    assert instance_env(cfg, cfg.instance("prefill-0"), {})["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert instance_env(cfg, cfg.instance("decode-0"), {})["VLLM_CPU_OMP_THREADS_BIND"] == "2-3|4-5"
    if pinned(["vllm"], "0|1") != ["vllm"]:  # (no taskset on this machine: nothing pinned)
        assert pinned(["vllm"], "0|1") == ["taskset", "-c", "0,1", "vllm"]
        assert pinned(["vllm"], "2-3|4-5") == ["taskset", "-c", "2-3,4-5", "vllm"]
    with pytest.raises(ConfigError, match="per-rank CPU lists") as e:
        config_from_dict({"model": {"path": "tiny"},
                          "prefill": [{"name": "p", "http_port": 18001, "tp_size": 2, "cpus": "0|1|2"}],
                          "decode": [{"name": "d", "http_port": 18002, "control_port": 18003, "data_port": 18005,
                                      "tp_size": 2}]}, source="test")
    assert e.value.field == "prefill.0.cpus"
