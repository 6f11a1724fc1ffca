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
from typing import Annotated, Any, Literal

import msgspec
import yaml

from lmcache_pd.auth import MIN_SECRET_BYTES, Keyring, is_loopback
from lmcache_pd.config_text import apply_override, split_msgspec_error
from lmcache_pd.errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]

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


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(_Section):
    path: str
    """Local model directory (or Hugging Face id where downloads are possible)."""
    served_name: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    block_size: Positive | None = None
    """vLLM block size; None takes vLLM's platform default (128 on CPU, 16 on GPU)."""
    max_model_len: Positive = 4096
    seed: int = 0


def host_port(text: str, ranks: int = 1, *, field: str = "", source: str = "") -> tuple[str, int]:
    """``"host:port"`` as (host, port); ConfigError naming ``field`` if it is not one (with
    ``ranks`` ports from it)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65536 - ranks:
        raise ConfigError(f"{text!r} is not host:port (a port for each of {ranks} rank(s))", field=field, source=source)
    return host.strip("[]"), int(port)


class InstanceConfig(_Section):
    name: str
    http_port: Port
    host: str = "127.0.0.1"
    control_port: Port | None = None
    """Decode only: zmq control plane (allocation) port of TP rank 0; rank r uses +r."""
    data_port: Port | None = None
    """Decode only: data-plane port of TP rank 0 for transports that listen (tcp); rank r uses +r."""
    data_advertise: str | None = None
    """Decode only: ``host:port`` that prefill workers connect to for the data plane (TP rank 0;
    rank r: port + r), when it is not where this instance listens (a relay, NAT, a port
    forward). None: the listening address."""
    cache_port: Port | None = None
    """HTTP port of the prefix cache's control API and metrics, TP rank 0; rank r uses +r.
    None: no API (the cache still works). Served by prefill instances with ``cache.enabled``."""
    tp_size: Positive = 1
    cpus: str | int | None = None
    """CPUs the launcher pins the instance to (``taskset -c``) and binds vLLM's OpenMP threads to,
    e.g. ``"0-3"`` or ``1``; per TP rank, separated by ``|`` (``"0|1"``: rank 0 on CPU 0, rank 1 on 1)."""
    kv_cache_gib: Positive = 1
    """CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE); GPU uses --gpu-memory-utilization."""
    vllm_args: tuple[str, ...] = ()
    """Extra vLLM CLI arguments, appended as given."""
    env: dict[str, str] = {}


class TransportConfig(_Section):
    name: str = "tcp"
    options: dict[str, Any] = {}
    """Transport-specific options, validated by the transport's own ``Options`` struct."""
    group_mib: NonNegative = 0
    """Stream a hand-off larger than this in groups of pages of about this size: the decode side
    scatters each group as soon as it has landed, while the next ones are in flight. 0 (default)
    sends every hand-off as one group: on one H100 streaming measured slower, because each group
    costs host time (docs/benchmarks.md); measure with ``benchmarks/handoff.py --group-mib``."""
    layerwise: bool = True
    """Send each layer of a prompt's KV as soon as the prefill's forward has computed it, while
    the next layers compute (node/layered.py), instead of all of it after the request finished. ``group_mib`` does not apply to such a hand-off. On by default: it measured
    faster from 16 MiB on, on CPU and on one H200 (docs/benchmarks.md). On a GPU the prefill
    instance then runs vLLM's piecewise CUDA graphs (a full graph runs no per-layer hook)."""
    layerwise_min_mib: NonNegative = 8
    """With ``layerwise``, a hand-off smaller than this goes whole instead, as soon as the forward
    that computed its last chunk ended (still a step earlier than without ``layerwise``): a batch
    per layer cost more than it hid for small ones (2 MiB: 0.13 ms slower layered on one H200).
    0: every hand-off goes layer by layer."""
    layerwise_chunks: bool = True
    """With ``layerwise`` and chunked prefill, start the hand-off with the prompt's first chunk:
    the blocks each chunk's forward completes go during the next (one batch each), and only the
    last chunk's go layer by layer; a preempted request's hand-off is given up (the decode side
    recomputes). Off: the hand-off starts with the last chunk's forward, every block layer by
    layer. vLLMs whose scheduler does not name preempted requests always do the latter."""
    direct: bool = False
    """Direct hand-offs: when the decode's vLLM has allocated the request's blocks by the time the
    prefill's Allocate comes (the proxy's concurrent dispatch), the prefill writes straight into
    them and the decode scatters nothing (one pass instead of two: 0.81x the pool's time for 1 GiB
    on one H200, docs/benchmarks.md). nixl, cuda_ipc and loopback can; tcp refuses it at start.
    Set on both sides."""


class PoolConfig(_Section):
    size_mib: Positive = 256
    """Decode-side receive pool, pre-allocated at start, per TP rank."""
    scatter_landed: bool = True
    """Scatter each layer of a hand-off into vLLM's blocks as soon as all its pages landed (a
    layered hand-off's layers during the prefill's forward), not after TransferDone: tcp's
    receiver sees each batch land, over the others the prefill says (protocol Landed)."""


class IntegrityConfig(_Section):
    verify: bool = False
    """End-to-end check of every hand-off's bytes: the prefill sends a digest of what it sent
    (a fast non-cryptographic sum over the blocks, digests.cache_digest) and the decode checks the
    pool pages against it before loading; on a mismatch vLLM recomputes the prompt (counted).
    Costs a read of the hand-off's bytes on each side (docs/benchmarks.md)."""


class TimeoutsConfig(_Section):
    handshake_s: Seconds = 5.0
    """Prefill waits this long for a decode peer's handshake reply."""
    control_s: Seconds = 5.0
    """Any other control-plane round trip (transfer done, cancel, heartbeat)."""
    alloc_s: Seconds = 10.0
    """Prefill waits this long for decode pool pages (pool full), then gives up: decode recomputes."""
    transfer_s: Seconds = 30.0
    """Decode waits this long for a hand-off to arrive, then recomputes the prompt itself."""
    data_s: Seconds = 30.0
    """Prefill waits this long for the data plane to complete one transfer."""
    lease_s: Seconds = 30.0
    """Pool pages return to the pool when not renewed (heartbeat) or consumed within this time."""
    heartbeat_s: Seconds = 2.0
    """Prefill workers heartbeat every linked decode worker at this interval (renewing the leases
    of in-flight transfers); an unanswered heartbeat (``control_s``) drops the link."""
    direct_wait_s: Seconds = 0.05
    """With ``transport.direct``: a decode worker holds an Allocate whose decode request came at the
    same time up to this long for vLLM to schedule it (the prefill then writes into its blocks)."""
    peer_s: Seconds = 10.0
    """A decode worker forgets a prefill worker it has not heard from for this long (killed, stopped,
    partitioned): its reservations are aborted, their requests recompute without waiting ``transfer_s``."""


class AuthConfig(_Section):
    secret_file: str | None = None
    """File holding the deployment's shared secret (at least 16 bytes; surrounding whitespace is
    ignored; ``lmcache-pd secret FILE`` writes one). The environment variable LMCACHE_PD_SECRET
    may hold the secret instead. With neither, every instance and the proxy bind loopback only."""
    encrypt: bool = False
    """Encrypt the control plane (CurveZMQ) and the tcp data plane (AES-256-GCM), with keys derived
    from the secret; the same on every instance. nixl cannot, and refuses it (docs/security.md)."""


class BackpressureConfig(_Section):
    prefill_queue: Positive = 64
    """Hand-offs one prefill worker lets wait for pages of one decode instance; beyond it a
    hand-off fails at once (its blocks are freed, the decode side recomputes)."""
    decode_queue: Positive = 256
    """Allocations one decode worker queues while its pool is full; beyond it they are refused."""


class TierConfig(_Section):
    name: str
    """A registered cache tier: ``memory``, ``disk``, ``redis`` (Valkey too) or ``server``."""
    options: dict[str, Any] = {}  # validated by the tier's own ``Options`` struct (docs/cache.md)


class CacheConfig(_Section):
    enabled: bool = False
    """Keep computed prompt KV in the tiers below and reuse it (docs/cache.md)."""
    chunk_tokens: Positive = 256
    """Tokens per cached chunk (the unit of keys and reuse); a multiple of vLLM's block size."""
    tiers: tuple[TierConfig, ...] = (TierConfig(name="memory"),)
    """Fastest first. Reads go down the tiers and promote hits upward; writes go to all. In the
    file, ``cache.server: <socket>`` puts the node cache daemon's tier first (docs/cache_server.md)."""
    write_queue_mib: Positive = 512
    """Chunk writes waiting for the tiers, at most; a write beyond it is dropped (not cached)."""
    lookup_timeout_s: Seconds = 2.0
    """The scheduler waits this long for the workers to say how much of a prompt is cached,
    then schedules the request without cache hits."""
    hold_s: Seconds = 60.0
    """Chunks a lookup found are kept from eviction until their load ends, or this long at most."""
    decode_skip: bool = True
    """Decode instances tell the prefill side which leading chunks of a prompt their own local
    tiers (memory, disk) hold, and those are not transferred again (docs/cache.md)."""


class CacheServerConfig(_Section):
    """This node's cache daemon, as ``lmcache-pd launch --role cache-server`` starts it (docs/cache_server.md)."""
    socket: str
    """Its Unix socket; a ``server`` tier in ``cache.tiers`` without ``options.socket`` uses it."""
    size_mib: Positive = 4096
    slab_mib: Positive = 64
    """Memory is handed to size classes in slabs of this size; a chunk larger than one is not cached."""
    eviction: Literal["lru", "fifo"] = "lru"
    chunk_tokens: Positive | None = None
    """The node's one chunk size: engines with another ``cache.chunk_tokens`` are refused."""
    tiers: tuple[TierConfig, ...] = ()
    """Its own tiers below its memory (disk, redis), as in ``cache.tiers``: written through, read back."""
    host: str = "127.0.0.1"
    http_port: Port | None = None
    """Its ``/metrics`` and ``/cache/*`` (none when unset)."""


class RoutingConfig(_Section):
    """How the proxy's routing policy weighs instances (``proxy.policy``; proxy/policies.py)."""

    lookup_timeout_s: Seconds = 0.05
    """Per request, asking the instances what they hold of its prompt (tokenizing a text prompt
    first) waits at most this long; whoever has not answered counts as holding nothing."""
    load_interval_s: Seconds = 0.5
    """How often the proxy reads each instance's load (vLLM's running and waiting requests, the
    decode pool's free pages)."""
    remote_weight: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """What a prompt token found only in the shared remote tier is worth against one in the
    instance's own tiers (it still crosses the network)."""
    decode_alone_tokens: NonNegative = 0
    """A request of which at most this many prompt tokens are left to compute on the chosen
    decode instance (a short prompt, or one whose history that decode holds) is served by the
    decode alone: no prefill, no hand-off (0: never for that reason)."""
    decode_alone_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    """... or of which the decode instance holds at least this fraction (1.0: never for that
    reason)."""
    decode_max_requests: Positive = 256
    """A decode instance with this many requests running and waiting is overloaded: history
    affinity no longer sends it a conversation's next turn."""
    decode_min_free: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    """... nor one whose pool has less than this fraction of its pages free."""


class ProxyConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    connect_timeout_s: Seconds = 5.0
    prefill_timeout_s: Seconds = 120.0
    """Whole prefill request (compute of the prompt); past it the decode recomputes."""
    decode_timeout_s: Seconds = 600.0
    """Whole decode request (until the last token)."""
    dispatch: Literal["concurrent", "sequential"] = "concurrent"
    """``concurrent``: the decode request is sent together with the prefill request and waits
    for the KV on the decode instance (its HTTP, tokenization and scheduling overlap the
    prefill's compute); ``sequential``: it is sent after the prefill answered."""
    first_token: Literal["prefill", "decode"] = "prefill"
    """Who gives the client its first token. ``prefill``: the prefill's sampled token goes to the
    client as soon as the prefill answers, and the decode continues from it (its prompt is the
    prompt plus that token, whose KV it computes; it computes no prompt token). ``decode``: the
    decode recomputes the last prompt token and samples the first token itself. Requests the
    proxy cannot continue exactly (chat, stop strings, bad words, seeds, presence or frequency
    penalties, structured output; docs/config.md) take the ``decode`` path, as ``dispatch`` says."""
    health_interval_s: Seconds = 2.0
    max_body_mib: Positive = 32
    """Largest request body the proxy reads (a larger one is answered 413, unread)."""
    handoff_report: bool = False
    """Diagnostics: put the decode's hand-off report (loaded or not, bytes, times, the error) of a
    non-streamed answer into the header ``x-lmcache-pd-handoff``. Off: answers carry nothing of
    the hand-off (transfer ids and error texts are for operators; the hand-off log has them)."""
    prefills: tuple[str, ...] = ()
    """Names of the prefill instances this proxy routes to (empty: all of them)."""
    decodes: tuple[str, ...] = ()
    """Names of the decode instances this proxy routes to (empty: all of them)."""
    policy: str = "round_robin"
    """Which prefill and decode serve each request (proxy/policies.py): ``round_robin``,
    ``kv_aware`` (the prefill that holds most of the prompt against its queued prefill work; the
    decode that holds the conversation's history unless overloaded, else the least loaded; the
    decode alone where ``routing`` says), or ``module:Class`` of your own (a ``Policy``)."""
    routing: RoutingConfig = RoutingConfig()


class PDConfig(_Section):
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

