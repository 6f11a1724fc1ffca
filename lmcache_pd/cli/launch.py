"""``lmcache-pd launch --role prefill|decode``: start one vLLM instance of a deployment.

Exec vLLM's OpenAI server with everything derived from the config (model, ports, KV connector,
CPU pinning); the launcher process *becomes* vLLM, so signals reach it. (``--role proxy`` is
``launch_proxy.py``: it imports neither this module nor torch.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping

from lmcache_pd import transport as transports
from lmcache_pd.config import RESOLVED_ENV, InstanceConfig, PDConfig, check_exposure, keyring
from lmcache_pd.errors import ConfigError


def vllm_command(cfg: PDConfig, name: str, *, python: str = sys.executable) -> list[str]:
    """The argv that starts instance ``name`` (without CPU pinning)."""
    inst = cfg.instance(name)
    role = cfg.role_of(name)
    m = cfg.model
    ktc = {
        "kv_connector": "PDConnector",
        "kv_connector_module_path": "lmcache_pd.connector",
        "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
        "kv_load_failure_policy": "recompute",
        # The resolved config travels in the environment (instance_env), not on the command line:
        # every local user can read a command line (/proc/*/cmdline), and vLLM logs its arguments.
        "kv_connector_extra_config": {"config_env": RESOLVED_ENV, "instance": name},
    }
    argv = [python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", m.path, "--served-model-name", m.served_name or m.path,
            "--host", inst.host, "--port", str(inst.http_port),
            "--max-model-len", str(m.max_model_len), "--dtype", m.dtype, "--seed", str(m.seed),
            "--tensor-parallel-size", str(inst.tp_size),
            "--kv-transfer-config", json.dumps(ktc)]
    if m.tokenizer:
        argv += ["--tokenizer", m.tokenizer]
    if m.block_size:
        argv += ["--block-size", str(m.block_size)]
    return argv + list(inst.vllm_args)


def instance_env(cfg: PDConfig, inst: InstanceConfig, base: Mapping[str, str]) -> dict[str, str]:
    """The instance's environment: ``base``, what its transport's libraries read at start-up (where
    ``base`` does not set it: ``Transport.environment``), ours, then the instance's ``env``."""
    options = transports.parse_options(cfg.transport.name, cfg.transport.options)
    env = transports.get_class(cfg.transport.name).environment(options) | dict(base)
    env["LMCACHE_PD_INSTANCE"] = inst.name
    env[RESOLVED_ENV] = json.dumps(cfg.to_dict())  # every vLLM process of it sees the same config
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(inst.kv_cache_gib))
    # vLLM 0.32 with torch 2.13 cannot load the AOT-compiled model it saved ("'function' object has
    # no attribute 'finalize_loading'") and compiles again on every start; its older compile cache
    # loads. Measured on the CPU test model: a restart's engine init 18.8 s with AOT, 7.1 s without.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if inst.cpus is not None:
        # vLLM's CPU worker binds its OpenMP threads itself; give it our cores, not "auto" ("a|b": one
        # list per TP rank, as vLLM reads it).
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(inst.cpus)
    env.update(inst.env)
    return env


def pinned(argv: list[str], cpus: str | int | None) -> list[str]:
    """``argv`` under ``taskset -c``: every CPU of the instance (the per-rank form ``"0|1"`` pins
    the instance to all ranks' CPUs; vLLM binds each rank's threads to its own list)."""
    if cpus is not None and shutil.which("taskset"):
        return ["taskset", "-c", str(cpus).replace("|", ","), *argv]
    return argv


def check_vllm() -> None:
    """Refuse, before vLLM's slow start, a vLLM this connector does not support (or none)."""
    from lmcache_pd.connector.compat import SUPPORTED, check_supported, installed_version

    version = installed_version()
    if version is None:
        raise ConfigError(f"vLLM is not installed in this environment ({sys.executable}); lmcache-pd supports "
                          f"vLLM {SUPPORTED} (scripts/setup installs one)", field="vllm")
    check_supported(version)


def launch(cfg: PDConfig, role: str, instance: str | None) -> int:
    """Exec vLLM as instance ``instance`` (else the role's first) of ``role`` (prefill or decode)."""
    transports.parse_options(cfg.transport.name, cfg.transport.options)  # fail before vLLM's slow start
    if cfg.auth.encrypt and not transports.get_class(cfg.transport.name).capabilities.encrypts:
        raise ConfigError(f"transport {cfg.transport.name!r} cannot encrypt its data plane: use tcp, or turn "
                          "encryption off (docs/security.md)", field="auth.encrypt")
    keys = keyring(cfg)  # the secret is readable and long enough, and without one nothing binds beyond loopback
    group = cfg.prefill if role == "prefill" else cfg.decode
    name = instance or group[0].name
    if cfg.role_of(name) != role:
        raise SystemExit(f"instance {name!r} is not a {role} instance")
    inst = cfg.instance(name)
    check_exposure(cfg, keys, name)
    check_vllm()
    argv = pinned(vllm_command(cfg, name), inst.cpus)
    env = instance_env(cfg, inst, os.environ)
    print("lmcache-pd: exec", " ".join(a if " " not in a and "{" not in a else repr(a) for a in argv),
          file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)
    return 127  # not reached
