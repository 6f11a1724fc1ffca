"""Tiered prefix cache (L4): chunk keys, the tier registry, and the cache of one worker.

A new tier is one module implementing :class:`~lmcache_pd.cache.tier.Tier` plus one line in
``_BUILTIN`` (or a call to :func:`register` from outside the package).
"""

from __future__ import annotations

from lmcache_pd.cache.keys import ChunkKey, cache_salt, chain_hashes, chunk_keys, tenant_tag
from lmcache_pd.cache.store import CacheStats, Lookup, TieredCache
from lmcache_pd.cache.tier import Records, Tier, TierStats
from lmcache_pd.config import CacheConfig
from lmcache_pd.errors import ConfigError
from lmcache_pd.registry import Registry

__all__ = [
    "CacheStats", "ChunkKey", "Lookup", "Tier", "TierStats", "TieredCache",
    "build_cache", "cache_salt", "chain_hashes", "chunk_keys", "create_tier", "names", "register", "tenant_tag",
]

_BUILTIN: dict[str, str] = {
    "memory": "lmcache_pd.cache.memory:MemoryTier",
    "disk": "lmcache_pd.cache.disk:DiskTier",
    "redis": "lmcache_pd.cache.remote:RedisTier",
    "server": "lmcache_pd.cache.server_tier:ServerTier",
}
_registry = Registry("cache tier", _BUILTIN, field="cache.tiers", unavailable=ConfigError)
register = _registry.register
names = _registry.names


def create_tier(cfg: CacheConfig, index: int, *, instance: str, rank: int) -> Tier:
    """Tier ``cache.tiers[index]``, its options validated (errors name the field)."""
    t = cfg.tiers[index]
    field = f"cache.tiers.{index}"
    cls = _registry.get_class(t.name, field=f"{field}.name")
    return cls(_registry.parse_options(t.name, t.options, field=f"{field}.options"), instance=instance, rank=rank)


def build_cache(cfg: CacheConfig, *, instance: str, rank: int, record_key: bytes | None = None) -> TieredCache:
    """The (not yet started) cache of one worker, as ``cache`` in the config describes it.
    ``record_key``: seals the records of tiers whose bytes leave the process (from the
    deployment's secret: ``Keyring.derive(b"cache-records")``); None keeps the public key."""
    tiers = [create_tier(cfg, i, instance=instance, rank=rank) for i in range(len(cfg.tiers))]
    if record_key is not None:
        for t in tiers:
            t.records = Records(record_key)
    return TieredCache(tiers, chunk_tokens=cfg.chunk_tokens, write_queue_bytes=cfg.write_queue_mib << 20)
