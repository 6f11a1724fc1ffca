"""The node cache daemon's HTTP side (L4; docs/cache_server.md): Prometheus metrics and its
control API, served on ``host:port`` (``cache_server.http_port``, ``lmcache-pd server --http-port``).

  GET  /metrics        occupancy, lookups and reads (and their hits), writes, evictions, refused
                       saves, clients, garbled and refused connections
  GET  /cache/stats    the same as JSON, with occupancy per size class and the clients connected
  GET  /health         200 while it serves
  POST /cache/clear    {"tenant": T} (that tenant's chunks) | {"all": true}; the lower tiers too

Chunk keys are salted per model by the engines, so the daemon cannot name a prompt's chunks:
lookups, pins and clears by prompt go through the engines' own ``/cache/*`` (they reach the
daemon through their ``server`` tier). With a shared secret, POST needs ``Authorization: Bearer
<token>`` (``lmcache-pd token``); without one it binds loopback only (the launcher checks).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmcache_pd.auth import Keyring
from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.keys import tenant_tag
from lmcache_pd.http_api import BoundedServer, JsonHandler

log = logging.getLogger(__name__)

MAX_BODY = 1 << 16
_COUNTERS = {
    "lookups": "Chunks engines asked about (lookups)", "lookup_hits": "Chunks lookups found",
    "reads": "Chunks engines asked to load", "read_hits": "Chunks leased to a load",
    "read_bytes": "Chunk bytes leased to loads", "writes": "Chunks saved (committed)",
    "written_bytes": "Chunk bytes saved", "evictions": "Chunks evicted to make room",
    "refused": "Saves refused: no slot could be freed (or larger than a slab)",
    "garbled": "Connections dropped for a frame that was not a request",
    "strangers": "Connections refused: the process runs as another user",
}
_GAUGES = {
    "segment_bytes": "Size of the shared segment", "chunk_bytes": "Chunk bytes held",
    "chunks": "Chunks held", "slabs_used": "Slabs given to a size class", "reserved": "Saves in progress",
    "leased": "Chunks being read now", "clients": "Engines connected",
    "lower_queued": "Chunks waiting to be written to the lower tiers",
}
_LOWER = {
    "lower_written": "Chunk records written to the lower tiers", "lower_promoted": "Chunks read back from "
    "the lower tiers into memory", "lower_dropped": "Write-throughs dropped (queue full)",
    "lower_failed": "Write-throughs that failed", "lower_lookup_hits": "Chunks lookups found only below memory",
}


class DaemonHTTP:
    def __init__(self, daemon: CacheDaemon, *, host: str, port: int, keys: Keyring | None = None):
        self.daemon = daemon
        self.address = (host, port)
        self.keys = keys if keys is not None else Keyring(None)
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(daemon))
        self._server: BoundedServer | None = None

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = BoundedServer(self.address, handler, max_connections=16)
        self.address = self._server.server_address[:2]  # (port 0: the one the system chose)
        self._server.start("pd-cache-daemon-http")
        log.info("cache daemon HTTP on http://%s:%d", *self.address)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()

    def stats(self) -> dict[str, Any]:
        return msgspec.to_builtins(self.daemon.stats_reply())

    def clear(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("all") is True and set(body) == {"all"}:
            return {"cleared": self.daemon.clear()}
        if set(body) == {"tenant"} and isinstance(body["tenant"], str) and body["tenant"]:
            return {"cleared": self.daemon.clear(tenant_tag(body["tenant"]))}
        raise ValueError('give {"tenant": "<cache_salt>"} or {"all": true}')


class _Handler(JsonHandler):
    api: DaemonHTTP
    what = "cache daemon HTTP"

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path == "/metrics":
            self.send(200, generate_latest(self.api.registry), "text/plain; version=0.0.4")
        elif self.path == "/cache/stats":
            self.json(200, self.api.stats())
        elif self.path == "/health":
            self.json(200, {"ok": True})
        else:
            self.json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.post({"/cache/clear": self.api.clear}, self.api.keys, MAX_BODY)


class _Collector:
    """Reads the daemon's counters at scrape time."""

    def __init__(self, daemon: CacheDaemon):
        self.daemon = daemon

    def describe(self) -> list:
        return []

    def collect(self):
        reply = self.daemon.stats_reply()
        for name, doc in _COUNTERS.items():
            f = CounterMetricFamily(f"lmcache_pd_cache_server_{name}", doc)
            f.add_metric([], reply.stats.get(name, 0))
            yield f
        for name, doc in _LOWER.items():
            if name in reply.stats:
                f = CounterMetricFamily(f"lmcache_pd_cache_server_{name}", doc)
                f.add_metric([], reply.stats[name])
                yield f
        for name, doc in _GAUGES.items():
            f = GaugeMetricFamily(f"lmcache_pd_cache_server_{name}", doc)
            f.add_metric([], reply.stats.get(name, 0))
            yield f
        used = GaugeMetricFamily("lmcache_pd_cache_server_class_slots_used", "Slots holding a chunk or a write, "
                                 "per size class", labels=["slot_bytes"])
        total = GaugeMetricFamily("lmcache_pd_cache_server_class_slots", "Slots per size class",
                                  labels=["slot_bytes"])
        for c in reply.classes:
            used.add_metric([str(c.slot_bytes)], c.used)
            total.add_metric([str(c.slot_bytes)], c.slots)
        yield used
        yield total
