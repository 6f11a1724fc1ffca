"""A whole deployment on this machine: config generation, process start, health wait, stop.

Used by ``lmcache-pd demo`` and by the end-to-end tests (start once per test session).
Each instance runs ``lmcache-pd launch`` in its own process group, logging to a file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcache_pd.config import PDConfig, load_config


def free_ports(n: int, *, width: int = 1) -> list[int]:
    """``n`` loopback ports that bind now and were never handed out before by this process;
    ``width``: each the first of that many consecutive such ports (a TP instance's per-rank ports).

    Two hazards made tests collide: the kernel hands a just-closed port 0 to the next ``bind(0)``
    (so two calls could return the same port for a config that binds neither yet), and an outgoing
    connection takes its local port from the same ephemeral range. So ports are drawn at random
    below that range and remembered."""
    low = _EPHEMERAL_LOW
    ports: list[int] = []
    for _ in range(100 * n):
        if len(ports) == n:
            break
        first = _RANDOM.randrange(_LOWEST, low - width + 1) if low - _LOWEST >= 1000 else 0
        if first == 0 and width > 1:
            continue  # (no room below the ephemeral range: the kernel picks single ports only)
        run = [_bind(p) for p in range(first, first + width)]  # (port 0: the kernel's pick)
        if None in run or _HANDED.intersection(run):
            continue
        _HANDED.update(run)
        ports.append(run[0])
    if len(ports) < n:
        raise RuntimeError(f"found only {len(ports)} of {n} free loopback ports below {low}")
    return ports


def _bind(port: int) -> int | None:
    """The loopback port that binds now (``port``, or the kernel's pick for 0), or None."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_LOWEST = 10000
_EPHEMERAL_LOW = _ephemeral_low()
_HANDED: set[int] = set()
_RANDOM = random.Random()


def set_fields(cfg: dict[str, Any], fields: dict[str, Any]) -> None:
    """Set dotted fields (``"pool.size_mib": 64``) in a config's plain data, sections made as needed."""
    for key, value in fields.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value


def local_config(model_dir: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a 1P1D config on free loopback ports (prefill pinned to core 0, decode to the last)."""
    ncpu = os.cpu_count() or 1
    http_p, http_d, ctrl, data, proxy, cache_p, cache_d = free_ports(7)
    work = Path(workdir)
    data_cfg: dict[str, Any] = {
        "model": {"path": str(model_dir), "served_name": "tiny", "max_model_len": 4096},
        "prefill": [{"name": "prefill-0", "http_port": http_p, "cache_port": cache_p, "cpus": "0",
                     "kv_cache_gib": 1}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data,
                    "cache_port": cache_d, "cpus": str(ncpu - 1), "kv_cache_gib": 1}],
        "proxy": {"port": proxy, "handoff_report": True},  # a local deployment: show how each request went
        "transport": {"name": "tcp"},
        "pool": {"size_mib": 64},
        "handoff_log": str(work / "handoffs-{instance}.jsonl"),
    }
    set_fields(data_cfg, extra or {})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pd.yaml"
    path.write_text(yaml.safe_dump(data_cfg, sort_keys=False))
    return path


def engine_config(model_dir: str | os.PathLike[str], workdir: str | os.PathLike[str], *, transport: str,
                  vllm_args: list[str], pool_mib: int, max_model_len: int, cpus: tuple[str, str] | None = None,
                  kv_cache_gib: int | None = None, timeouts: dict[str, float] | None = None,
                  transport_options: dict[str, Any] | None = None, layerwise: bool | None = None,
                  overrides: dict[str, Any] | None = None) -> Path:
    """A 1P1D config for one machine whose instances share a GPU (or, with ``cpus``, pinned CPU
    cores): prefill-0, decode-0 (both with a worker API) and a proxy on free loopback ports.
    ``layerwise``: ``transport.layerwise`` (None: its default); ``overrides``: dotted config
    fields set last (``{"pool.scatter_landed": False}``)."""
    http_p, http_d, ctrl, data, proxy, api_p, api_d = free_ports(7)
    work = Path(workdir)
    host = {"kv_cache_gib": kv_cache_gib} if kv_cache_gib else {}
    cfg: dict[str, Any] = {
        "model": {"path": str(model_dir), "served_name": "tiny", "max_model_len": max_model_len},
        "prefill": [{"name": "prefill-0", "http_port": http_p, "cache_port": api_p, "vllm_args": list(vllm_args),
                     **({"cpus": cpus[0]} if cpus else {}), **host}],
        "decode": [{"name": "decode-0", "http_port": http_d, "control_port": ctrl, "data_port": data,
                    "cache_port": api_d, "vllm_args": list(vllm_args), **({"cpus": cpus[1]} if cpus else {}), **host}],
        "proxy": {"port": proxy, "handoff_report": True},
        "transport": {"name": transport, **({"options": transport_options} if transport_options else {}),
                      **({} if layerwise is None else {"layerwise": layerwise})},
        "pool": {"size_mib": pool_mib},
        "timeouts": {"transfer_s": 30, "lease_s": 10, **(timeouts or {})},
        "handoff_log": str(work / "handoffs-{instance}.jsonl"),
    }
    set_fields(cfg, overrides or {})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pd.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Process:
    name: str
    role: str
    url: str
    overrides: tuple[str, ...] = ()
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


@dataclass
class LocalDeployment:
    config_path: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cfg: PDConfig = load_config(self.config_path, environ={})
        for inst in self.cfg.prefill:
            self.procs[inst.name] = Process(inst.name, "prefill", f"http://{inst.host}:{inst.http_port}")
        for inst in self.cfg.decode:
            self.procs[inst.name] = Process(inst.name, "decode", f"http://{inst.host}:{inst.http_port}")
        p = self.cfg.proxy
        self.procs["proxy"] = Process("proxy", "proxy", f"http://{p.host}:{p.port}")

    def add_proxy(self, name: str, *overrides: str) -> Process:
        """Another proxy over the same deployment, e.g. ``add_proxy("p2", "proxy.decodes=[decode-1]")``."""
        port = free_ports(1)[0]
        proc = Process(name, "proxy", f"http://{self.cfg.proxy.host}:{port}", (f"proxy.port={port}", *overrides))
        self.procs[name] = proc
        return proc

    def start(self, name: str) -> None:
        proc = self.procs[name]
        argv = [sys.executable, "-m", "lmcache_pd.cli.main", "launch", "--role", proc.role,
                "--config", str(self.config_path)]
        if proc.role != "proxy":
            argv += ["--instance", name]
        for item in proc.overrides:
            argv += ["--set", item]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.env}
        proc.log_path = self.workdir / f"{name}.log"
        log = open(proc.log_path, "ab")  # noqa: SIM115 - handed to the child
        proc.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def start_all(self, timeout_s: float = 600.0, *, skip: tuple[str, ...] = ()) -> None:
        names = [n for n in self.procs if n not in skip]
        for name in names:
            self.start(name)
        deadline = time.monotonic() + timeout_s
        self.wait_healthy(names, timeout_s)
        self.wait_routed([n for n in names if self.procs[n].role != "proxy"], max(1.0, deadline - time.monotonic()))

    def wait_routed(self, instances: list[str], timeout_s: float) -> None:
        """Until every started proxy has seen each of ``instances`` it knows healthy: a proxy checks
        its instances every ``proxy.health_interval_s`` and routes nothing to one it has not seen up,
        so the first requests would all go to the instances that started first."""
        deadline = time.monotonic() + timeout_s
        for name, proc in self.procs.items():
            if proc.role != "proxy" or proc.popen is None:
                continue
            while True:
                view = _proxy_view(proc.url)
                down = [i for i in instances if not view.get(i, True)]
                if not down:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"proxy {name} did not see {down} healthy within {timeout_s:g} s")
                time.sleep(0.2)

    def wait_healthy(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.popen is not None and proc.popen.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.popen.returncode} before it was healthy; "
                                       f"log tail:\n{self.log_tail(name)}")
                if _healthy(proc.url):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{self.log_tail(n)}" for n in pending)
                raise TimeoutError(f"{pending} not healthy within {timeout_s:g} s\n{tails}")
            if pending:
                time.sleep(0.5)

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.popen is not None and proc.popen.poll() is None:
            os.killpg(proc.popen.pid, sig)

    def stop(self, name: str, timeout_s: float = 20.0) -> None:
        proc = self.procs[name]
        if proc.popen is None:
            return
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.popen.pid, signal.SIGTERM)
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout_s)
            except ProcessLookupError:
                pass
        try:  # children that outlived the group leader (vLLM's engine core, workers)
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.popen = None

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.procs[name].log_path
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _proxy_view(url: str) -> dict[str, bool]:
    """Which instances a proxy sees healthy (its /health), by name; empty when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # (503 while it sees none healthy: the body says which)
        try:
            body = json.load(e)
        except ValueError:
            return {}
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return {k: bool(v.get("healthy")) for k, v in (body.get("instances") or {}).items()}
