"""Test helpers: a tier of each kind, and chunk keys and values made from a number."""

from __future__ import annotations

import uuid

import numpy as np

from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.disk import DiskOptions, DiskTier
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.memory import MemoryOptions, MemoryTier
from lmcache_pd.cache.server_tier import ServerOptions, ServerTier


def make_tier(name: str, *, tmp_path, redis_url: str | None, size_mib: int = 4, opened: bool = True, **opts):
    if name == "memory":
        tier = MemoryTier(MemoryOptions(size_mib=size_mib), instance="t", rank=0)
    elif name == "server":  # a daemon of its own (closed with the tier: ``tier.daemon``)
        daemon = CacheDaemon(str(tmp_path / "cache.sock"), segment_bytes=size_mib << 20, slab_bytes=256 << 10)
        daemon.start()
        tier = ServerTier(ServerOptions(socket=daemon.path, **opts), instance="t", rank=0)
        tier.daemon = daemon  # type: ignore[attr-defined]
    elif name == "disk":
        tier = DiskTier(DiskOptions(path=str(tmp_path / "{instance}.{rank}"), size_mib=size_mib, **opts),
                        instance="t", rank=0)
    else:  # each test gets its own key prefix on the shared server
        from lmcache_pd.cache.remote import RedisOptions, RedisTier  # (here: a GPU machine may lack redis-py)

        tier = RedisTier(RedisOptions(url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:8]}:", **opts),
                         instance="t", rank=0)
    if opened:
        tier.open()
    return tier


def key(i: int, tenant: str = "-") -> ChunkKey:
    return ChunkKey(tenant, i.to_bytes(4, "little") * 8)


def value(i: int, size: int = 4096) -> bytes:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
