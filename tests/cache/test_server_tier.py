"""The ``server`` tier against a real node cache daemon (cache/server_tier.py): a daemon that
goes away turns the tier down (misses, counted, at once) and a restarted one brings it back; a
chunk whose bytes no longer match their crc is a miss, and dropped. The tier contract suite
(test_tier_contract.py) runs on it too."""

from __future__ import annotations

import time

from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.server_tier import ServerOptions, ServerTier
from tests.cache.tiers import key, value


def daemon_at(path: str) -> CacheDaemon:
    d = CacheDaemon(path, segment_bytes=1 << 20, slab_bytes=256 << 10)
    d.start()
    return d


def test_a_daemon_killed_turns_the_tier_down_at_once_and_a_restarted_one_brings_it_back(tmp_path):
    path = str(tmp_path / "cache.sock")
    d = daemon_at(path)
    t = ServerTier(ServerOptions(socket=path, timeout_s=1.0, retry_s=0.3), instance="t", rank=0)
    t.open()
    try:
        assert t.put(key(1), value(1)) and bytes(t.get(key(1))) == value(1)
        d.close()
        t0 = time.monotonic()
        assert t.get(key(1)) is None and not t.put(key(2), value(2)) and t.contains([key(1)]) == [False]
        assert time.monotonic() - t0 < 1.0, "a down daemon must not hold up the caller"
        s = t.stats()
        assert not s.up and s.errors >= 1
        d = daemon_at(path)  # restarted: empty (its memory died with it), reachable after retry_s
        time.sleep(0.35)
        assert t.put(key(3), value(3)) and bytes(t.get(key(3))) == value(3)
        assert t.stats().up and t.stats().entries == 1
    finally:
        t.close()
        d.close()


def test_a_chunk_whose_bytes_fail_their_crc_is_a_miss_and_is_dropped(tmp_path):
    d = daemon_at(str(tmp_path / "cache.sock"))
    t = ServerTier(ServerOptions(socket=d.path), instance="t", rank=0)
    t.open()
    try:
        assert t.put(key(1), value(1, 8192))
        (slot,) = d.store.acquire([key(1)], "test")
        d.store.release("test")
        d.segment.view[slot.offset + 100] ^= 0xFF  # damaged in the segment
        assert t.get(key(1)) is None
        assert t.stats().corrupt == 1 and t.contains([key(1)]) == [False]
    finally:
        t.close()
        d.close()


def test_a_daemon_restarted_between_two_calls_is_reconnected_at_once_not_after_retry_s(tmp_path):
    path = str(tmp_path / "cache.sock")
    d = daemon_at(path)
    t = ServerTier(ServerOptions(socket=path, timeout_s=1.0, retry_s=60.0), instance="t", rank=0)
    t.open()
    try:
        assert t.put(key(1), value(1))
        d.close()
        d = daemon_at(path)  # back before the tier noticed: its connection is stale
        assert t.put(key(2), value(2)) and bytes(t.get(key(2))) == value(2)
        s = t.stats()
        assert s.up and s.errors == 1  # the broken connection, counted; no retry_s wait
    finally:
        t.close()
        d.close()
