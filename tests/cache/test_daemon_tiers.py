"""The node cache daemon's own tiers below its memory (cache/daemon_tiers.py): every chunk an
engine commits is written through to them with the digest its writer committed; a daemon
started again over the same disk (or Redis) answers lookups from them and promotes a chunk into
its memory when an engine loads it, bitwise, with that digest; delete and clear reach them; a
full write-through queue drops and counts. Over a real disk tier and a real redis-server."""

from __future__ import annotations

import os
import uuid
import zlib

import pytest

from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.daemon_client import DaemonClient
from lmcache_pd.cache.disk import DiskOptions, DiskTier
from lmcache_pd.cache.store import TieredCache
from tests.cache.tiers import key
from tests.waiting import wait_for

SLAB = 256 << 10
CHUNK = 60_000


def lower(kind: str, tmp_path, request) -> TieredCache:
    if kind == "disk":
        tier = DiskTier(DiskOptions(path=str(tmp_path / "below"), size_mib=16), instance="d", rank=0)
    else:
        from lmcache_pd.cache.remote import RedisOptions, RedisTier

        url = request.getfixturevalue("redis_server").url
        prefix = request.node.__dict__.setdefault("prefix", f"test-{uuid.uuid4().hex[:8]}:")
        tier = RedisTier(RedisOptions(url=url, key_prefix=prefix), instance="d", rank=0)
    return TieredCache([tier], chunk_tokens=16)


def daemon(kind: str, tmp_path, request) -> CacheDaemon:
    d = CacheDaemon(str(tmp_path / f"cache-{uuid.uuid4().hex[:6]}.sock"), segment_bytes=4 * SLAB, slab_bytes=SLAB,
                    lower=lower(kind, tmp_path, request))
    d.start()
    return d


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_chunks_are_written_through_and_a_new_daemon_promotes_them_bitwise_with_their_digest(kind, tmp_path,
                                                                                               request):
    payloads = [os.urandom(CHUNK) for _ in range(3)]
    first = daemon(kind, tmp_path, request)
    c = DaemonClient(first.path, timeout_s=5)
    try:
        for i, p in enumerate(payloads):
            assert c.save(key(i), p, owner="w", crc=zlib.crc32(p) | (i << 40))  # any digest travels as given
        wait_for(lambda: c.stats()["lower_written"] == 3, 10, "the chunks were not written through")
    finally:
        c.close()
        first.close()  # its memory is gone; what is below stays
    second = daemon(kind, tmp_path, request)
    c = DaemonClient(second.path, timeout_s=5)
    try:
        assert c.stats()["chunks"] == 0
        assert c.contains([key(0), key(1), key(2), key(7)]) == [True, True, True, False]
        got = c.acquire([key(0), key(1), key(7)], owner="r")  # the leading ones: promoted, then leased
        assert len(got) == 2 and c.stats()["lower_promoted"] == 2 and c.stats()["chunks"] == 2
        with c.mapped() as seg:
            for i, (offset, n, digest) in enumerate(got):
                assert bytes(seg.view[offset:offset + n]) == payloads[i]
                assert digest == zlib.crc32(payloads[i]) | (i << 40)
        c.release("r")
        # The operator's delete and clear reach below too.
        assert c.delete([key(0)]) == 1 and c.contains([key(0)]) == [False]
        c.clear()
        assert c.contains([key(1), key(2)]) == [False, False]
    finally:
        c.close()
        second.close()


def test_a_full_write_through_queue_drops_and_counts(tmp_path, request):
    d = daemon("disk", tmp_path, request)
    d.lower.max_queued = 0
    c = DaemonClient(d.path, timeout_s=5)
    try:
        assert c.save(key(1), os.urandom(CHUNK), owner="w", crc=1)
        s = c.stats()
        assert s["lower_dropped"] == 1 and s["lower_written"] == 0 and s["chunks"] == 1
    finally:
        c.close()
        d.close()
