from __future__ import annotations

import uuid

import pytest

from lmcache_pd.cache.disk import DiskOptions, DiskTier
from lmcache_pd.cache.memory import MemoryOptions, MemoryTier
from lmcache_pd.cache.remote import RedisOptions, RedisTier
from tests.redis_server import RedisServer

TIERS = ["memory", "disk", "redis"]


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def make_tier(name: str, *, tmp_path, redis_url: str | None, size_mib: int = 4, opened: bool = True, **opts):
    if name == "memory":
        tier = MemoryTier(MemoryOptions(size_mib=size_mib), instance="t", rank=0)
    elif name == "disk":
        tier = DiskTier(DiskOptions(path=str(tmp_path / "{instance}.{rank}"), size_mib=size_mib, **opts),
                        instance="t", rank=0)
    else:  # each test gets its own key prefix on the shared server
        tier = RedisTier(RedisOptions(url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:8]}:", **opts),
                         instance="t", rank=0)
    if opened:
        tier.open()
    return tier


@pytest.fixture(params=TIERS)
def tier(request, tmp_path):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    t = make_tier(request.param, tmp_path=tmp_path, redis_url=url)
    yield t
    t.clear()
    t.close()
