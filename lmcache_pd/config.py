"""The one typed configuration of a deployment (L1).

One YAML file describes the whole deployment (model, instances, transport, pool, deadlines);
the launcher, the vLLM connector (through ``kv_connector_extra_config``) and the proxy all
read it through :func:`load_config`, which is also the only reader of ``os.environ``.

Sources, lowest precedence first:
  1. defaults below,
  2. the YAML file (``--config FILE`` or ``LMCACHE_PD_CONFIG``),
  3. environment overrides ``LMCACHE_PD__<SECTION>__<FIELD>=value`` (see :data:`ENV_VARS`),
  4. CLI overrides ``--set section.field=value``.
Override values are YAML scalars (``512``, ``true``, ``1.5``). Values from the file must have
the right type already; an unknown or ill-typed field is an error naming the field and source.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import yaml

from lmcache_pd.auth import MIN_SECRET_BYTES, Keyring, is_loopback
from lmcache_pd.config_sections import (
    AuthConfig,
    BackpressureConfig,
    CacheConfig,
    CacheServerConfig,
    InstanceConfig,
    IntegrityConfig,
    ModelConfig,
    NonNegative,
    PoolConfig,
    Port,
    Positive,
    ProxyConfig,
    RoutingConfig,
    Seconds,
    Section,
    TierConfig,
    TimeoutsConfig,
    TransportConfig,
)
from lmcache_pd.config_text import apply_override, split_msgspec_error
from lmcache_pd.errors import ConfigError

__all__ = [  # (the sections are config_sections.py's, named here too: importers need one place)
    "AuthConfig", "BackpressureConfig", "CacheConfig", "CacheServerConfig", "ENV_PREFIX", "ENV_VARS",
    "InstanceConfig", "IntegrityConfig", "ModelConfig", "NonNegative", "PDConfig", "PoolConfig", "Port",
    "Positive", "ProxyConfig", "RESOLVED_ENV", "RoutingConfig", "SECRET_ENV", "Seconds", "Section",
    "TierConfig", "TimeoutsConfig", "TransportConfig", "check_exposure", "config_from_dict",
    "configure_logging", "host_port", "keyring", "load_config", "read_secret", "redact", "resolve_instance",
]

ENV_PREFIX = "LMCACHE_PD__"
SECRET_ENV = "LMCACHE_PD_SECRET"
RESOLVED_ENV = "LMCACHE_PD_RESOLVED_CONFIG"
ENV_VARS: dict[str, str] = {
    "LMCACHE_PD_CONFIG": "path of the YAML config file, when no --config is given",
    RESOLVED_ENV: "the resolved config as JSON, set by the launcher for vLLM (it may hold passwords: "
                  "an environment is private to its user, a command line is not)",
    "LMCACHE_PD_INSTANCE": "name of this instance in the config (set by the launcher for vLLM)",
    SECRET_ENV: "the deployment's shared secret (instead of auth.secret_file; never on a command line)",
    ENV_PREFIX + "<SECTION>__<FIELD>": "override one field, e.g. LMCACHE_PD__POOL__SIZE_MIB=512",
}


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*:)[^@\s/]+@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@``) replaced by ***:
    for every log line and error that may show a configured URL (Redis, Valkey)."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)


def host_port(text: str, ranks: int = 1, *, field: str = "", source: str = "") -> tuple[str, int]:
    """``"host:port"`` as (host, port); ConfigError naming ``field`` if it is not one (with
    ``ranks`` ports from it)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65536 - ranks:
        raise ConfigError(f"{text!r} is not host:port (a port for each of {ranks} rank(s))", field=field, source=source)
    return host.strip("[]"), int(port)


class PDConfig(Section):
    model: ModelConfig
    prefill: tuple[InstanceConfig, ...]
    decode: tuple[InstanceConfig, ...]
    proxy: ProxyConfig = ProxyConfig()
    transport: TransportConfig = TransportConfig()
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    auth: AuthConfig = AuthConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
    cache: CacheConfig = CacheConfig()
    cache_server: CacheServerConfig | None = None
    integrity: IntegrityConfig = IntegrityConfig()
    log_level: str = "info"
    handoff_log: str | None = None
    """If set, each decode worker appends one JSON line per hand-off (outcome, bytes, times) to
    this path; ``{instance}`` and ``{rank}`` are replaced."""

    def instance(self, name: str) -> InstanceConfig:
        for inst in (*self.prefill, *self.decode):
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in (*self.prefill, *self.decode))
        raise ConfigError(f"no instance named {name!r} (known: {known})", field="prefill/decode")

    def role_of(self, name: str) -> str:
        if any(i.name == name for i in self.prefill):
            return "prefill"
        if any(i.name == name for i in self.decode):
            return "decode"
        raise ConfigError(f"no instance named {name!r}", field="prefill/decode")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (lists, not tuples), accepted back by config_from_dict."""
        return msgspec.json.decode(msgspec.json.encode(self))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> PDConfig:
    """Read, merge and validate the config. The only place that reads the environment."""
    env = os.environ if environ is None else environ
    path = path or env.get("LMCACHE_PD_CONFIG")
    if path is None:
        raise ConfigError("no config file: pass --config FILE or set LMCACHE_PD_CONFIG")
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e}", source=source) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=source) from e
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", source=source)
    cfg = config_from_dict(data, source=source)  # file values must be well typed on their own
    env_sets = [
        f"{k[len(ENV_PREFIX):].lower().replace('__', '.')}={v}" for k, v in env.items() if k.startswith(ENV_PREFIX)
    ]
    if env_sets or overrides:
        merged = cfg.to_dict()
        for origin, sets in (("environment (LMCACHE_PD__*)", env_sets), ("--set", list(overrides))):
            for item in sets:
                apply_override(merged, item, origin)
        cfg = config_from_dict(merged, source=f"{source} with overrides")
    return cfg


def config_from_dict(data: Mapping[str, Any], *, source: str) -> PDConfig:
    """Validate a plain dict (a parsed file, or ``kv_connector_extra_config``)."""
    data = _server_sockets(dict(data))
    try:
        cfg = msgspec.convert(data, PDConfig, strict=True)
    except msgspec.ValidationError as e:
        field, message = split_msgspec_error(str(e))
        raise ConfigError(message, field=field, source=source) from None
    _check_semantics(cfg, source)
    return cfg


def _server_sockets(data: dict[str, Any]) -> dict[str, Any]:
    """``cache.server: <socket>`` puts a ``server`` tier first in ``cache.tiers``; a ``server``
    tier without ``options.socket`` reaches ``cache_server.socket``."""
    sock, cache = (data.get("cache_server") or {}), data.get("cache")
    if isinstance(cache, dict) and isinstance(cache.get("server"), str):
        rest = [t for t in cache.get("tiers") or [] if not (isinstance(t, dict) and t.get("name") == "server")]
        cache = {k: v for k, v in cache.items() if k != "server"} | {
            "tiers": [{"name": "server", "options": {"socket": cache["server"]}}, *rest]}
        data = data | {"cache": cache}
    if not (isinstance(sock, dict) and isinstance(sock.get("socket"), str) and isinstance(cache, dict)
            and isinstance(cache.get("tiers"), list)):
        return data
    tiers = [dict(t, options={"socket": sock["socket"]} | (t.get("options") or {})) if isinstance(t, dict)
             and t.get("name") == "server" and isinstance(t.get("options") or {}, dict) else t for t in cache["tiers"]]
    return data | {"cache": cache | {"tiers": tiers}}


def _check_semantics(cfg: PDConfig, source: str) -> None:
    if not cfg.prefill:
        raise ConfigError("at least one prefill instance is required", field="prefill", source=source)
    if not cfg.decode:
        raise ConfigError("at least one decode instance is required", field="decode", source=source)
    names: set[str] = set()
    endpoints: dict[tuple[str, int], str] = {}
    for group, insts in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        for i, inst in enumerate(insts):
            where = f"{group}.{i}"
            if inst.name in names:
                raise ConfigError(f"duplicate instance name {inst.name!r}", field=f"{where}.name", source=source)
            names.add(inst.name)
            ports = [("http_port", inst.http_port)]
            if inst.cache_port is not None:
                ports += [("cache_port", inst.cache_port + r) for r in range(inst.tp_size)]
            if group == "decode":
                for fld in ("control_port", "data_port"):
                    port = getattr(inst, fld)
                    if port is None:
                        raise ConfigError("required for a decode instance", field=f"{where}.{fld}", source=source)
                    ports += [(fld, port + r) for r in range(inst.tp_size)]
                if inst.data_advertise is not None:
                    host_port(inst.data_advertise, inst.tp_size, field=f"{where}.data_advertise", source=source)
            if isinstance(inst.cpus, str) and "|" in inst.cpus and inst.cpus.count("|") + 1 != inst.tp_size:
                raise ConfigError(f"{inst.cpus.count('|') + 1} per-rank CPU lists ('|') for tp_size {inst.tp_size}",
                                  field=f"{where}.cpus", source=source)
            for fld, port in ports:
                other = endpoints.setdefault((inst.host, port), f"{where}.{fld}")
                if other != f"{where}.{fld}":
                    raise ConfigError(f"port {port} on {inst.host} is also used by {other}",
                                      field=f"{where}.{fld}", source=source)
    for fld, group in (("proxy.prefills", cfg.prefill), ("proxy.decodes", cfg.decode)):
        known = {i.name for i in group}
        for name in getattr(cfg.proxy, fld.split(".")[1]):
            if name not in known:
                raise ConfigError(f"{name!r} is not one of {sorted(known)}", field=fld, source=source)
    t = cfg.timeouts
    if t.heartbeat_s >= t.lease_s:
        raise ConfigError(f"must be below timeouts.lease_s ({t.lease_s:g})", field="timeouts.heartbeat_s",
                          source=source)
    if 2 * t.heartbeat_s >= t.peer_s:
        raise ConfigError(f"must exceed two heartbeats (2 x timeouts.heartbeat_s = {2 * t.heartbeat_s:g})",
                          field="timeouts.peer_s", source=source)
    tier_names = [tier.name for tier in cfg.cache.tiers]
    if len(set(tier_names)) != len(tier_names):
        raise ConfigError(f"each tier may appear once (got {tier_names})", field="cache.tiers", source=source)
    cs = cfg.cache_server
    if cs is not None and cs.slab_mib > cs.size_mib:
        raise ConfigError("must hold a slab of cache_server.slab_mib", field="cache_server.size_mib", source=source)
    if cs is not None and cs.chunk_tokens not in (None, cfg.cache.chunk_tokens):
        raise ConfigError(f"the node's cache daemon serves chunks of cache_server.chunk_tokens ({cs.chunk_tokens})",
                          field="cache.chunk_tokens", source=source)
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("one of debug, info, warning, error", field="log_level", source=source)


def read_secret(cfg: PDConfig, *, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The deployment's shared secret, from ``auth.secret_file`` or LMCACHE_PD_SECRET (not both),
    or None when neither is set. Never from the config's own values: the config travels on vLLM's
    command line, and command lines are visible to every user of the machine."""
    env = os.environ if environ is None else environ
    from_env = env.get(SECRET_ENV, "").strip().encode()
    path = cfg.auth.secret_file
    if path and from_env:
        raise ConfigError(f"the secret is given twice: set auth.secret_file or {SECRET_ENV}, not both",
                          field="auth.secret_file")
    secret = from_env or None
    where = SECRET_ENV
    if path:
        where = f"auth.secret_file ({path})"
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ConfigError(f"cannot read the secret: {e}", field="auth.secret_file") from None
        if mode & 0o077:
            logging.getLogger(__name__).warning("%s is readable by other users (mode %o): chmod 600 it",
                                                path, mode & 0o777)
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the secret in {where} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are "
                          "needed (`lmcache-pd secret FILE` writes a random one)", field="auth.secret_file")
    return secret


def keyring(cfg: PDConfig, *, environ: Mapping[str, str] | None = None) -> Keyring:
    """This process's keys (auth.py), from the deployment's secret."""
    secret = read_secret(cfg, environ=environ)
    if cfg.auth.encrypt and secret is None:
        raise ConfigError(f"encryption needs a shared secret (auth.secret_file or {SECRET_ENV})", field="auth.encrypt")
    return Keyring(secret)


def check_exposure(cfg: PDConfig, keys: Keyring, name: str | None) -> None:
    """Refuse to start instance ``name`` (None: the proxy) on a non-loopback address without a
    shared secret: whoever reaches its ports could then write into the decode pool."""
    if keys.authenticated:
        return
    if name is None:
        host, field = cfg.proxy.host, "proxy.host"
    else:
        inst = cfg.instance(name)
        group = "prefill" if cfg.role_of(name) == "prefill" else "decode"
        index = [i.name for i in getattr(cfg, group)].index(name)
        host, field = inst.host, f"{group}.{index}.host"
    if not is_loopback(host):
        raise ConfigError(f"{host!r} is reachable beyond this machine, and no shared secret is configured: set "
                          f"auth.secret_file or {SECRET_ENV} (`lmcache-pd secret FILE` writes one), or bind "
                          "127.0.0.1", field=field)
    if name is not None and cfg.cache.enabled:
        for i, tier in enumerate(cfg.cache.tiers):
            url = str(tier.options.get("url", "")) if tier.name == "redis" else ""
            server = urllib.parse.urlsplit(url).hostname if url else None
            if server is not None and not is_loopback(server):
                # Records are sealed with a key derived from the secret: without one, anybody
                # who can write to that server could plant KV that every instance loads.
                raise ConfigError(f"the Redis tier {redact(url)!r} is beyond this machine, and no shared secret "
                                  f"is configured to seal its records: set auth.secret_file or {SECRET_ENV}",
                                  field=f"cache.tiers.{i}.options.url")


def resolve_instance(explicit: str | None, *, environ: Mapping[str, str] | None = None) -> str:
    """This process's instance name: given explicitly, else ``LMCACHE_PD_INSTANCE``."""
    env = os.environ if environ is None else environ
    name = explicit or env.get("LMCACHE_PD_INSTANCE")
    if not name:
        raise ConfigError("this instance has no name: set `instance` in kv_connector_extra_config "
                          "or LMCACHE_PD_INSTANCE", field="instance")
    return name


def configure_logging(level: str) -> None:
    """Print lmcache_pd's records to stderr at ``log_level``, once per process.

    vLLM and uvicorn configure only their own loggers, so without this our INFO lines (hand-off
    timings, which UCX transport carried the data) were never printed in their processes. Our
    handler replaces propagation to the root logger, which would print nothing below WARNING
    there, or everything twice where the application configured the root logger.
    """
    logger = logging.getLogger("lmcache_pd")
    logger.setLevel(level.upper())
    if any(getattr(h, "lmcache_pd", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.lmcache_pd = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False

