"""Fixtures of the cache tests: a real redis-server for the session, and each tier in turn."""

from __future__ import annotations

import pytest

from tests.cache.tiers import make_tier

TIERS = ["memory", "disk", "redis", "server"]


@pytest.fixture(scope="session")
def redis_server():
    from tests.redis_server import RedisServer  # (here: a GPU machine may lack redis-py)

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(params=TIERS)
def tier(request, tmp_path):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    t = make_tier(request.param, tmp_path=tmp_path, redis_url=url)
    yield t
    t.clear()
    t.close()
    if hasattr(t, "daemon"):
        t.daemon.close()
