"""Holds: chunks a lookup found stay until their load (or the lease) ends; pins stay apart."""

from __future__ import annotations

import pytest

from lmcache_pd.cache import TieredCache
from lmcache_pd.cache.holds import Holds
from tests.cache.tiers import key, make_tier, value


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_holds_count_owners_and_end_by_release_or_lease():
    clock = Clock()
    h = Holds(clock)
    h.hold("a", [key(1), key(2)], 10)
    h.hold("b", [key(2)], 20)
    assert h.held() == {key(1), key(2)} and h.owners() == 2
    h.release("a")
    assert h.held() == {key(2)}  # b still holds it
    h.hold("b", [key(3)], 20)  # an owner's new hold replaces its old one
    assert h.held() == {key(3)}
    clock.t += 19.9
    assert h.held() == {key(3)}
    clock.t += 0.2
    assert h.held() == frozenset() and h.owners() == 0
    h.release("nobody")  # harmless


@pytest.mark.parametrize("name", ["memory", "disk"])
def test_a_held_chunk_is_not_evicted_and_a_released_one_is(tmp_path, name):
    tier = make_tier(name, tmp_path=tmp_path, redis_url=None, size_mib=1)
    cache = TieredCache([tier], chunk_tokens=64)
    big = 300_000  # three fit in 1 MiB, a fourth evicts the least recently used
    for i in range(3):
        assert tier.put(key(i), value(i, big))
    look = cache.lookup([key(0), key(1), key(7)], hold=("req", 30))
    assert look.hits == 2
    assert cache.holds.held() == {key(0), key(1)}  # narrowed to what was found
    assert tier.put(key(3), value(3, big))  # evicts key 2: 0 and 1 are older but held
    assert tier.contains([key(0), key(1), key(2), key(3)]) == [True, True, False, True]
    assert tier.put(key(4), value(4, big))  # evicts key 3, the newer one: 0 and 1 are held
    assert tier.contains([key(0), key(1), key(3), key(4)]) == [True, True, False, True]
    cache.release("req")
    assert tier.put(key(5), value(5, big))  # released: the least recently used goes again
    assert tier.contains([key(0), key(1)]) == [False, True]
    tier.close()


def test_local_lookup_skips_remote_tiers_and_missing_names_the_tiers_to_write(tmp_path, redis_server):
    tiers = [make_tier(n, tmp_path=tmp_path, redis_url=redis_server.url, opened=False) for n in ("memory", "redis")]
    cache = TieredCache(tiers, chunk_tokens=64)
    cache.start()
    try:
        mem, rds = cache.tiers
        mem.put(key(0), value(0))
        rds.put(key(0), value(0))
        rds.put(key(1), value(1))
        assert cache.lookup([key(0), key(1)]).hits == 2
        assert cache.lookup([key(0), key(1)], local=True).hits == 1
        assert cache.missing([key(0), key(1), key(2)]) == [(), (0,), (0, 1)]
        assert cache.put(key(1), value(1), (0,)) and cache.flush(5)
        assert mem.contains([key(1)]) == [True]
    finally:
        cache.clear()
        cache.close()
