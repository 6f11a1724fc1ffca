"""``lmcache-pd server`` and ``lmcache-pd launch --role cache-server``: this node's cache daemon
in the foreground (docs/cache_server.md), or ``--status`` of a running one. Stopped by SIGTERM or
SIGINT; what it holds in memory goes with it, what its own lower tiers (``cache_server.tiers``:
disk, redis) hold stays."""

from __future__ import annotations

import datetime
import logging
import signal
import threading

from lmcache_pd.auth import Keyring, is_loopback
from lmcache_pd.cache import build_cache
from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.daemon_client import DaemonClient, DaemonGone
from lmcache_pd.config import CacheConfig, CacheServerConfig, PDConfig, keyring
from lmcache_pd.errors import ConfigError

log = logging.getLogger(__name__)


def serve(cs: CacheServerConfig, keys: Keyring | None = None, *, prefix: str = "cache_server.") -> int:
    """Run the daemon ``cs`` describes until SIGTERM or SIGINT. ``prefix``: how errors name its
    fields (the config's ``cache_server.``, or the flags')."""
    from lmcache_pd.cache.daemon_http import DaemonHTTP

    def field(name: str) -> str:
        return prefix + (name.replace("_", "-") if prefix == "--" else name)

    if cs.slab_mib > cs.size_mib:
        raise ConfigError(f"must hold at least one slab of {cs.slab_mib} MiB", field=field("size_mib"))
    keys = keys if keys is not None else Keyring(None)
    if cs.http_port is not None and not keys.authenticated and not is_loopback(cs.host):
        raise ConfigError(f"{cs.host!r} is reachable beyond this machine, and no shared secret is configured: "
                          "bind 127.0.0.1 or set auth.secret_file", field=field("host"))
    lower = None
    if cs.tiers:
        if any(t.name in ("memory", "server") for t in cs.tiers):
            raise ConfigError("the daemon's own tiers go below its memory: disk or redis", field=field("tiers"))
        lower = build_cache(CacheConfig(enabled=True, tiers=cs.tiers), instance="cache-server", rank=0,
                            record_key=keys.records_key if keys.authenticated else None)
    daemon = CacheDaemon(cs.socket, segment_bytes=cs.size_mib << 20, slab_bytes=cs.slab_mib << 20,
                         eviction=cs.eviction, lower=lower, chunk_tokens=cs.chunk_tokens)
    http = DaemonHTTP(daemon, host=cs.host, port=cs.http_port, keys=keys) if cs.http_port is not None else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon.start()
    if http is not None:
        http.start()
    log.info("cache daemon serving %d MiB on %s (slabs of %d MiB, %s eviction)", cs.size_mib, cs.socket,
             cs.slab_mib, cs.eviction)
    stop.wait()
    if http is not None:
        http.close()
    daemon.close()
    log.info("cache daemon stopped")
    return 0


def launch(cfg: PDConfig) -> int:
    """``launch --role cache-server``: the daemon of the deployment's ``cache_server`` section."""
    if cfg.cache_server is None:
        raise ConfigError("the deployment has no cache_server section (socket, size_mib, ...)", field="cache_server")
    return serve(cfg.cache_server, keyring(cfg))


def status(socket_path: str) -> int:
    """Print occupancy, hit rates and the clients connected; 1 when the daemon cannot be reached."""
    try:
        client = DaemonClient(socket_path, timeout_s=5.0)
    except DaemonGone as e:
        print(f"lmcache-pd server: {e}")
        return 1
    try:
        reply = client.status()
    finally:
        client.close()
    print("\n".join(status_lines(reply.stats, reply.classes, reply.clients, socket_path)))
    return 0


def status_lines(s: dict[str, int], classes, clients, where: str) -> list[str]:
    mib = 1 << 20
    out = [f"cache daemon on {where}",
           f"  memory: {s['chunk_bytes'] / mib:.1f} MiB in {s['chunks']} chunks, of {s['segment_bytes'] / mib:.0f} MiB "
           f"({s['slabs_used']}/{s['slabs']} slabs in use); {s['reserved']} saves in progress, {s['leased']} "
           "chunks being read",
           f"  lookups: {s['lookup_hits']}/{s['lookups']} chunks found ({_rate(s['lookup_hits'], s['lookups'])}); "
           f"loads: {s['read_hits']}/{s['reads']} ({_rate(s['read_hits'], s['reads'])}), "
           f"{s['read_bytes'] / mib:.1f} MiB read",
           f"  saves: {s['writes']} chunks, {s['written_bytes'] / mib:.1f} MiB; evictions {s['evictions']}, "
           f"refused {s['refused']}; connections dropped garbled {s['garbled']}, refused (another user) "
           f"{s['strangers']}"]
    if "lower_written" in s:
        out.append(f"  lower tiers: {s['lower_written']} records written, {s['lower_queued']} queued, "
                   f"{s['lower_dropped']} dropped, {s['lower_failed']} failed; {s['lower_lookup_hits']} lookups found "
                   f"below memory, {s['lower_promoted']} chunks read back")
    for c in classes:
        out.append(f"  size class {c.slot_bytes / mib:.2f} MiB: {c.used}/{c.slots} slots used in {c.slabs} slabs")
    out.append(f"  clients: {len(clients)}")
    for c in clients:
        since = datetime.datetime.fromtimestamp(c.since).isoformat(timespec="seconds")
        out.append(f"    {c.id}: pid {c.pid}, connected {since}, {c.requests} requests")
    return out


def _rate(hits: int, asked: int) -> str:
    return f"{100 * hits / asked:.0f}%" if asked else "-"
