"""TieredCache over real tiers: lookups across tiers, promotion, async writes, Redis outages."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from lmcache_pd.cache import TieredCache, build_cache, tenant_tag
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.memory import MemoryOptions, MemoryTier
from lmcache_pd.cache.tier import Buffer, Tier
from lmcache_pd.config import CacheConfig, TierConfig
from lmcache_pd.errors import ConfigError
from tests.cache.tiers import key, make_tier, value
from tests.redis_server import RedisServer


@pytest.fixture
def three(tmp_path, redis_server):
    tiers = [make_tier(n, tmp_path=tmp_path, redis_url=redis_server.url, opened=False)
             for n in ("memory", "disk", "redis")]
    cache = TieredCache(tiers, chunk_tokens=64)
    cache.start()
    yield cache
    cache.clear()
    cache.close()


def test_lookup_finds_the_longest_prefix_across_tiers(three):
    mem, disk, rds = three.tiers
    mem.put(key(0), value(0))
    rds.put(key(1), value(1))
    disk.put(key(2), value(2))
    disk.put(key(4), value(4))  # after the gap at 3: not part of the prefix
    look = three.lookup([key(i) for i in range(5)])
    assert look.hits == 3 and look.tiers == (0, 2, 1)
    s = three.stats()
    assert s.hit_tokens == {"memory": 64, "redis": 64, "disk": 64}
    # chunk 1 missed memory and disk, chunk 2 missed memory, chunk 3 missed everywhere
    assert s.miss_tokens == {"memory": 3 * 64, "disk": 2 * 64, "redis": 64}
    assert three.lookup([key(9)], record=False).hits == 0
    assert three.stats().miss_tokens["memory"] == 3 * 64


def test_get_promotes_a_lower_hit_to_the_tiers_above(three):
    mem, disk, rds = three.tiers
    rds.put(key(7), value(7))
    assert bytes(three.get(key(7))) == value(7)
    assert three.flush(5)
    assert mem.contains([key(7)]) == disk.contains([key(7)]) == [True]
    assert three.get(key(8)) is None


def test_put_writes_every_tier_in_the_background(three):
    assert three.put(key(1), value(1, 50_000))
    assert three.flush(5)
    for t in three.tiers:
        assert bytes(t.get(key(1))) == value(1, 50_000), t.name
    assert three.clear(tenant_tag("nobody")) == {"memory": 0, "disk": 0, "redis": 0}
    assert three.clear() == {"memory": 1, "disk": 1, "redis": 1}


class _StuckTier(Tier):
    """A tier whose writes wait on an event: shows that put() never waits for a tier."""

    name = "stuck"
    Options = MemoryOptions

    def __init__(self):
        super().__init__(None, instance="t", rank=0)
        self.release = threading.Event()
        self.stored: list[ChunkKey] = []

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [k in self.stored for k in keys]

    def get(self, key: ChunkKey) -> Buffer | None:
        return None

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        self.release.wait(30)
        self.stored.append(key)
        return True

    def delete(self, keys):
        return 0

    def clear(self, tenant=None):
        return 0


def test_put_never_waits_and_the_queue_is_bounded():
    stuck = _StuckTier()
    cache = TieredCache([stuck], chunk_tokens=64, write_queue_bytes=100_000)
    cache.start()
    try:
        t0 = time.monotonic()
        results = [cache.put(key(i), value(i, 30_000)) for i in range(5)]
        assert time.monotonic() - t0 < 0.5
        # 3 x 30 KB fit in 100 KB (the first may already be with the writer); the rest are dropped
        assert results[:3] == [True] * 3 and results[-1] is False
        assert cache.stats().dropped_writes == results.count(False)
        assert not cache.flush(0.2)
        stuck.release.set()
        assert cache.flush(5)
        assert stuck.stored == [key(i) for i, ok in enumerate(results) if ok]
        assert cache.stats().queued_bytes == 0
    finally:
        stuck.release.set()
        cache.close()


def test_redis_down_serves_from_the_other_tiers_and_comes_back(tmp_path):
    server = RedisServer().start()
    try:
        cfg = CacheConfig(enabled=True, chunk_tokens=64, tiers=(
            TierConfig(name="memory"), TierConfig(name="disk", options={"path": str(tmp_path / "d")}),
            TierConfig(name="redis", options={"url": server.url, "timeout_s": 0.3, "retry_s": 0.3})))
        cache = build_cache(cfg, instance="t", rank=0)
        cache.start()
        cache.put(key(0), value(0))
        cache.put(key(1), value(1))
        assert cache.flush(5)
        server.kill()
        t0 = time.monotonic()
        assert cache.lookup([key(0), key(1), key(2)]).hits == 2
        assert bytes(cache.get(key(1))) == value(1)
        assert cache.put(key(2), value(2)) and cache.flush(5)
        assert cache.lookup([key(0), key(1), key(2)]).hits == 3  # memory and disk took it
        assert time.monotonic() - t0 < 3
        assert not cache.stats().tiers["redis"].up

        server.start()
        time.sleep(0.4)  # retry_s
        cache.put(key(3), value(3))
        assert cache.flush(5)
        assert cache.tiers[2].contains([key(3)]) == [True]
        assert cache.stats().tiers["redis"].up
        cache.close()
    finally:
        server.stop()


def test_build_cache_validates_tier_options_naming_the_field(tmp_path):
    bad = CacheConfig(tiers=(TierConfig(name="memory"), TierConfig(name="disk", options={"size": 1})))
    with pytest.raises(ConfigError, match=r"cache\.tiers\.1\.options\.size"):
        build_cache(bad, instance="t", rank=0)
    with pytest.raises(ConfigError, match=r"cache\.tiers\.0\.name.*registered: disk, memory, redis"):
        build_cache(CacheConfig(tiers=(TierConfig(name="tape"),)), instance="t", rank=0)
    with pytest.raises(ConfigError, match=r"size_mib"):
        build_cache(CacheConfig(tiers=(TierConfig(name="memory", options={"size_mib": 0}),)), instance="t", rank=0)


def test_a_tier_may_appear_once():
    with pytest.raises(ValueError, match="once"):
        TieredCache([MemoryTier(MemoryOptions(), instance="t", rank=0)] * 2, chunk_tokens=64)
