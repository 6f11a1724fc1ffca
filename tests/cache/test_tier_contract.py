"""The contract every cache tier keeps (memory, disk, and redis on a real redis-server)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from lmcache_pd.cache.keys import tenant_tag
from tests.cache.tiers import key, make_tier, value

MiB = 1 << 20


def test_put_then_get_is_bitwise(tier):
    assert tier.put(key(1), value(1, 100_000))
    got = tier.get(key(1))
    assert got is not None and bytes(got) == value(1, 100_000)
    s = tier.stats()
    assert s.hits == 1 and s.read_bytes == 100_000 and s.written_bytes == 100_000


def test_missing_key_is_none_and_counted(tier):
    assert tier.get(key(2)) is None
    assert tier.stats().misses == 1


def test_contains_answers_per_key_in_order(tier):
    tier.put(key(1), value(1))
    tier.put(key(3), value(3))
    assert tier.contains([key(1), key(2), key(3)]) == [True, False, True]
    assert tier.contains([]) == []


def test_put_of_a_present_key_keeps_one_copy(tier):
    tier.put(key(1), value(1))
    tier.put(key(1), value(1))
    assert bytes(tier.get(key(1))) == value(1)
    assert tier.delete([key(1)]) == 1
    assert tier.get(key(1)) is None


def test_delete_and_clear(tier):
    alice, bob = tenant_tag("alice"), tenant_tag("bob")
    for i in range(3):
        tier.put(key(i, alice), value(i))
        tier.put(key(i, bob), value(i))
    assert tier.delete([key(0, alice), key(9, alice)]) == 1
    assert tier.clear(alice) == 2
    assert tier.contains([key(i, alice) for i in range(3)]) == [False] * 3
    assert tier.contains([key(i, bob) for i in range(3)]) == [True] * 3
    assert tier.clear() == 3
    assert tier.contains([key(i, bob) for i in range(3)]) == [False] * 3


@pytest.mark.parametrize("name", ["memory", "disk"])
def test_size_bound_evicts_least_recently_used(name, tmp_path):
    t = make_tier(name, tmp_path=tmp_path, redis_url=None, size_mib=1)
    chunk = 200_000  # 5 fit in 1 MiB (with the disk record header)
    for i in range(5):
        assert t.put(key(i), value(i, chunk))
    assert t.get(key(0)) is not None  # 0 is now the most recently used
    assert t.put(key(5), value(5, chunk))
    s = t.stats()
    assert s.bytes <= s.capacity_bytes == MiB and s.evictions == 1
    assert t.contains([key(i) for i in range(6)]) == [True, False, True, True, True, True]
    assert not t.put(key(9), value(9, 2 * MiB)), "a chunk larger than the tier is refused"
    t.close()


@pytest.mark.parametrize("name", ["memory", "disk"])
def test_pinned_chunks_are_not_evicted(name, tmp_path):
    t = make_tier(name, tmp_path=tmp_path, redis_url=None, size_mib=1)
    chunk = 300_000
    t.put(key(0), value(0, chunk))
    t.pin([key(0)])
    for i in range(1, 6):
        assert t.put(key(i), value(i, chunk))
    assert t.contains([key(0)]) == [True]
    t.put(key(1), value(1, chunk))
    t.pin([key(i) for i in range(6)])  # everything pinned: nothing can make room
    assert not t.put(key(7), value(7, chunk))
    t.unpin([key(0)])
    assert t.put(key(7), value(7, chunk))
    assert t.contains([key(0), key(7)]) == [False, True]
    t.close()


def test_redis_size_bound_is_the_servers_maxmemory(tmp_path):
    # The remote tier stores plain string values, so a server set up as docs/cache.md says
    # (maxmemory + allkeys-lru) evicts the oldest chunks and keeps serving new ones.
    from tests.redis_server import RedisServer

    server = RedisServer("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru").start()
    try:
        t = make_tier("redis", tmp_path=tmp_path, redis_url=server.url)
        for i in range(40):
            assert t.put(key(i), value(i, 256 * 1024))
        used = server.client().info("memory")["used_memory"]
        held = t.contains([key(i) for i in range(40)])
        assert used <= 4 * MiB + 512 * 1024
        assert not held[0] and held[-1], "oldest evicted, newest kept"
        assert bytes(t.get(key(39))) == value(39, 256 * 1024)
        t.close()
    finally:
        server.stop()


def test_concurrent_access_is_consistent(tier):
    # 4 threads put, get and probe overlapping keys; every value read must be the one written.
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(60):
            i = int(rng.integers(0, 12))
            op = rng.integers(0, 3)
            if op == 0:
                tier.put(key(i), value(i, 20_000))
            elif op == 1:
                got = tier.get(key(i))
                if got is not None and bytes(got) != value(i, 20_000):
                    errors.append(f"key {i} read back wrong bytes")
            else:
                tier.contains([key(i), key(i + 1)])

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    for i in range(12):
        tier.put(key(i), value(i, 20_000))
    assert all(bytes(tier.get(key(i))) == value(i, 20_000) for i in range(12))
    s = tier.stats()
    if s.bytes >= 0:
        assert s.entries == 12 and s.bytes >= 12 * 20_000


def test_disk_folder_holds_no_temporary_files_after_writes(tmp_path):
    t = make_tier("disk", tmp_path=tmp_path, redis_url=None)
    for i in range(5):
        t.put(key(i), value(i))
    files = [f for _, _, fs in os.walk(t.root) for f in fs if f != ".lock"]
    assert len(files) == 5 and all(f.endswith(".chunk") for f in files)
    t.close()
