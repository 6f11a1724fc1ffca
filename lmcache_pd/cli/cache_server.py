"""``lmcache-pd server``: this node's cache daemon in the foreground (docs/cache_server.md), or
``--status`` of a running one. Stopped by SIGTERM or SIGINT; what it holds lives in its memory
and goes with it (its own lower tiers, to keep chunks across its restarts, are not built yet)."""

from __future__ import annotations

import json
import logging
import signal
import threading

from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.daemon_client import DaemonClient, DaemonGone
from lmcache_pd.errors import ConfigError

log = logging.getLogger(__name__)


def serve(socket_path: str, size_mib: int, slab_mib: int) -> int:
    if size_mib <= 0 or slab_mib <= 0 or slab_mib > size_mib:
        raise ConfigError(f"--size-mib {size_mib} must hold at least one slab of --slab-mib {slab_mib}",
                          field="--size-mib")
    daemon = CacheDaemon(socket_path, segment_bytes=size_mib << 20, slab_bytes=slab_mib << 20)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon.start()
    log.info("cache daemon serving %d MiB on %s (slabs of %d MiB)", size_mib, socket_path, slab_mib)
    stop.wait()
    daemon.close()
    log.info("cache daemon stopped")
    return 0


def status(socket_path: str) -> int:
    try:
        client = DaemonClient(socket_path, timeout_s=5.0)
    except DaemonGone as e:
        print(f"lmcache-pd server: {e}")
        return 1
    try:
        print(json.dumps(client.stats(), indent=2))
    finally:
        client.close()
    return 0
