"""HTTP API and Prometheus metrics of one worker (thread ``pd-worker-api``).

Served on ``<instance host>:<cache_port + rank>`` (the proxy's ``/cache/*`` routes fan out to
every instance). The hand-off path's state, always:

  GET  /pd/stats                                 pool pages, control-plane counters, links, held blocks
  GET  /metrics                                  the same, and the cache's counters, for Prometheus

and the prefix cache's control API (``cache.enabled``). Prompts are given as token ids (the proxy
tokenizes text) and an optional ``tenant`` (the requests' ``cache_salt``):

  GET  /cache/stats                              tier sizes, hit/miss tokens, reads, writes, evictions
  POST /cache/lookup  {token_ids, tenant}        how many leading tokens are cached, and in which tier
                      {chains, tenant}           the same from the prompt's chunk chain hashes (hex,
                                                 lmcache_pd/chains.py): the proxy computes them once
  POST /cache/pin     {token_ids, tenant}        keep the prompt's cached chunks from eviction
  POST /cache/unpin   {token_ids, tenant}
  POST /cache/clear   {token_ids | chains, tenant} | {tenant} | {all: true}

With a shared secret configured, every POST needs ``Authorization: Bearer <token>``
(``lmcache-pd token`` prints it); without one the API binds loopback only (config.check_exposure).

Clearing a prefix deletes that prefix's chunks; every longer prompt that extends it is then
unreachable too (a lookup stops at the first missing chunk) and its chunks age out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmcache_pd.auth import Keyring
from lmcache_pd.cache import chain_hashes, chunk_keys, tenant_tag
from lmcache_pd.chains import DIGEST_BYTES
from lmcache_pd.http_api import BoundedServer, JsonHandler
from lmcache_pd.node.cache_io import CacheIO, NoCacheIO

log = logging.getLogger(__name__)

MAX_BODY = 16 << 20
SOCKET_TIMEOUT_S = 10.0
"""A client that sends nothing (or too slowly) for this long is dropped: it holds a thread."""
MAX_CONNECTIONS = 64
"""Connections served at once; more wait in the listen backlog (each holds a thread)."""


class WorkerAPI:
    def __init__(self, io: CacheIO | NoCacheIO, *, instance: str, rank: int, host: str, port: int,
                 keys: Keyring | None = None, status: Callable[[], dict[str, Any]] | None = None,
                 collectors: tuple[Collector, ...] = (), io_timeout_s: float = SOCKET_TIMEOUT_S):
        """``io``: the worker's prefix cache (``NoCacheIO`` when it is off: only /pd/* and /metrics);
        ``status``: the hand-off path's state for /pd/stats (a dict of sections of numbers);
        ``collectors``: more for /metrics (the hand-off timeline's histograms, node/timeline.py);
        ``io_timeout_s``: a connection silent this long is dropped."""
        self.io_timeout_s = io_timeout_s
        self.io = io
        self.instance = instance
        self.rank = rank
        self.address = (host, port)
        self.keys = keys if keys is not None else Keyring(None)
        self.status = status or (lambda: {})
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(self))
        for c in collectors:
            self.registry.register(c)
        if io.enabled:
            self.registry.register(_Collector(self))
        self._server: BoundedServer | None = None

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self, "timeout": self.io_timeout_s})
        self._server = BoundedServer(self.address, handler, max_connections=MAX_CONNECTIONS)
        self._server.start("pd-worker-api")
        log.info("worker API of %s rank %d on http://%s:%d", self.instance, self.rank, *self.address)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()

    # --- operations (also called directly by tests) -----------------------------------------
    @property
    def cache(self) -> CacheIO:
        if not isinstance(self.io, CacheIO):
            raise LookupError("the prefix cache is off on this instance (cache.enabled)")
        return self.io

    def keys_of(self, body: dict[str, Any]) -> list:
        tenant = _tenant(body)
        if body.get("chains") is not None:
            if body.get("token_ids") is not None:
                raise ValueError("give token_ids or chains, not both")
            chains = _chains(body["chains"])
        else:
            ids = body.get("token_ids")
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError("token_ids must be a list of integers")
            chains = chain_hashes(ids, self.cache.cfg.chunk_tokens, tenant=tenant)
        return chunk_keys(self.cache.salt, chains, tenant)

    def stats(self) -> dict[str, Any]:
        s = self.cache.cache.stats()
        return {"instance": self.instance, "rank": self.rank, "chunk_tokens": self.cache.cfg.chunk_tokens,
                "tiers": {name: t.as_dict() for name, t in s.tiers.items()},
                "hit_tokens": s.hit_tokens, "miss_tokens": s.miss_tokens,
                "queued_bytes": s.queued_bytes, "dropped_writes": s.dropped_writes, "holds": s.holds}

    def lookup(self, body: dict[str, Any]) -> dict[str, Any]:
        keys = self.keys_of(body)
        found = self.cache.cache.lookup(keys, record=False)
        per_tier: dict[str, int] = {}
        for i in found.tiers:
            name = self.cache.cache.tiers[i].name
            per_tier[name] = per_tier.get(name, 0) + self.cache.cfg.chunk_tokens
        return {"cached_tokens": found.hits * self.cache.cfg.chunk_tokens, "chunks": found.hits,
                "full_chunks": len(keys), "tiers": per_tier}

    def pin(self, body: dict[str, Any], *, pin: bool = True) -> dict[str, Any]:
        keys = self.keys_of(body)
        (self.cache.cache.pin if pin else self.cache.cache.unpin)(keys)
        return {"chunks": len(keys)}

    def clear(self, body: dict[str, Any]) -> dict[str, Any]:
        given = [k for k in ("token_ids", "chains", "all") if body.get(k) is not None]
        if given in (["token_ids"], ["chains"]):
            return {"removed": self.cache.cache.delete(self.keys_of(body))}
        if given == ["all"] and body["all"] is True and "tenant" not in body:
            return {"removed": self.cache.cache.clear()}
        if not given and _tenant(body):
            return {"removed": self.cache.cache.clear(tenant_tag(_tenant(body)))}
        raise ValueError("give token_ids or chains (with an optional tenant), or only a tenant, or {\"all\": true}")


def _chains(raw: object) -> list[bytes]:
    """Chain hashes as the proxy sends them: hex strings of 32 bytes each."""
    if not isinstance(raw, list) or len(raw) > MAX_BODY // 64:
        raise ValueError("chains must be a list of hex strings")
    try:
        out = [bytes.fromhex(c) for c in raw]
    except (TypeError, ValueError):
        raise ValueError("chains must be a list of hex strings") from None
    if any(len(c) != DIGEST_BYTES for c in out):
        raise ValueError(f"each chain hash is {DIGEST_BYTES} bytes ({2 * DIGEST_BYTES} hex digits)")
    return out


def _tenant(body: dict[str, Any]) -> str | None:
    t = body.get("tenant")
    if t is not None and not isinstance(t, str):
        raise ValueError("tenant must be a string")
    return t or None


class _Handler(JsonHandler):
    api: WorkerAPI
    what = "cache API"
    timeout = SOCKET_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path == "/pd/stats":
            self.json(200, self.api.status())
        elif self.path == "/cache/stats":
            try:
                self.json(200, self.api.stats())
            except LookupError as e:
                self.json(404, {"error": str(e)})
        elif self.path == "/metrics":
            self.send(200, generate_latest(self.api.registry), "text/plain; version=0.0.4")
        else:
            self.json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.post({"/cache/lookup": self.api.lookup, "/cache/pin": self.api.pin,
                   "/cache/unpin": lambda b: self.api.pin(b, pin=False), "/cache/clear": self.api.clear},
                  self.api.keys, MAX_BODY)


class _Collector:
    """Reads the cache's counters at scrape time (no second set of counters to keep in step)."""

    def __init__(self, api: WorkerAPI):
        self.api = api

    def describe(self) -> list:
        return []

    def collect(self):
        s = self.api.cache.cache.stats()
        labels = ["instance", "rank", "tier"]
        base = [self.api.instance, str(self.api.rank)]

        def family(kind, name, doc):
            return kind(f"lmcache_pd_cache_{name}", doc, labels=labels)

        fams = {
            "hit_tokens": family(CounterMetricFamily, "hit_tokens", "Prompt tokens lookups found in this tier"),
            "miss_tokens": family(CounterMetricFamily, "miss_tokens", "Prompt tokens lookups asked of this tier and "
                                                                      "did not find there"),
            "read_bytes": family(CounterMetricFamily, "read_bytes", "Chunk bytes read from this tier"),
            "written_bytes": family(CounterMetricFamily, "written_bytes", "Chunk bytes written to this tier"),
            "evictions": family(CounterMetricFamily, "evictions", "Chunks evicted to stay within the size bound"),
            "corrupt": family(CounterMetricFamily, "corrupt", "Records that failed their checksum (misses)"),
            "errors": family(CounterMetricFamily, "errors", "Operations that failed because the tier was down"),
            "bytes": family(GaugeMetricFamily, "bytes", "Chunk bytes held now (-1: not known, shared tier)"),
            "entries": family(GaugeMetricFamily, "entries", "Chunks held now (-1: not known, shared tier)"),
            "capacity_bytes": family(GaugeMetricFamily, "capacity_bytes", "Size bound (-1: the server's)"),
            "up": family(GaugeMetricFamily, "up", "1 when the tier answers"),
        }
        for name, t in s.tiers.items():
            lv = [*base, name]
            fams["hit_tokens"].add_metric(lv, s.hit_tokens.get(name, 0))
            fams["miss_tokens"].add_metric(lv, s.miss_tokens.get(name, 0))
            for k in ("read_bytes", "written_bytes", "evictions", "corrupt", "errors", "bytes", "entries",
                      "capacity_bytes"):
                fams[k].add_metric(lv, getattr(t, k))
            fams["up"].add_metric(lv, 1.0 if t.up else 0.0)
        yield from fams.values()
        dropped = CounterMetricFamily("lmcache_pd_cache_dropped_writes", "Chunk writes dropped (queue full)",
                                      labels=labels[:2])
        dropped.add_metric(base, s.dropped_writes)
        queued = GaugeMetricFamily("lmcache_pd_cache_queued_bytes", "Chunk bytes waiting for the tiers",
                                   labels=labels[:2])
        queued.add_metric(base, s.queued_bytes)
        holds = GaugeMetricFamily("lmcache_pd_cache_holds", "Lookups whose chunks are held for a pending load",
                                  labels=labels[:2])
        holds.add_metric(base, s.holds)
        yield dropped
        yield queued
        yield holds


class _StatusCollector:
    """/pd/stats as Prometheus samples: ``lmcache_pd_<section>_<field>{instance, rank}``.
    Fields that only grow (``*_total`` and the control-plane counters) are counters."""

    COUNTERS = ("control",)

    def __init__(self, api: WorkerAPI):
        self.api = api

    def describe(self) -> list:
        return []

    def collect(self):
        base = [self.api.instance, str(self.api.rank)]
        for section, fields in self.api.status().items():
            if not isinstance(fields, dict):
                continue
            for field, value in fields.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                counter = section in self.COUNTERS or field.endswith("_total")
                name = f"lmcache_pd_{section}_{field.removesuffix('_total')}"
                fam = (CounterMetricFamily if counter else GaugeMetricFamily)(
                    name, f"{section}.{field} of /pd/stats", labels=["instance", "rank"])
                fam.add_metric(base, value)
                yield fam
