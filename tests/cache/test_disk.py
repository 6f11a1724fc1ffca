"""Disk tier: checksummed records, atomic writes, survives a restart of the instance."""

from __future__ import annotations

import os
import time

from lmcache_pd.cache.disk import DiskOptions, DiskTier
from tests.cache.tiers import key, value


def _tier(tmp_path, size_mib=16):
    t = DiskTier(DiskOptions(path=str(tmp_path / "c"), size_mib=size_mib), instance="t", rank=0)
    t.open()
    return t


def test_a_corrupted_file_is_a_miss_and_is_deleted(tmp_path):
    t = _tier(tmp_path)
    t.put(key(1), value(1, 10_000))
    p = t._path(key(1))
    data = bytearray(p.read_bytes())
    data[5000] ^= 0x01  # one bit, in the payload
    p.write_bytes(bytes(data))
    assert t.get(key(1)) is None
    assert not p.exists() and t.contains([key(1)]) == [False]
    s = t.stats()
    assert s.corrupt == 1 and s.misses == 1 and s.entries == 0 and s.bytes == 0
    assert t.put(key(1), value(1, 10_000)) and bytes(t.get(key(1))) == value(1, 10_000)


def test_a_truncated_or_foreign_record_is_a_miss(tmp_path):
    t = _tier(tmp_path)
    t.put(key(1), value(1))
    t.put(key(2), value(2))
    p1, p2 = t._path(key(1)), t._path(key(2))
    p1.write_bytes(p1.read_bytes()[:-1])          # torn write
    p2.write_bytes(t._path(key(1)).read_bytes())  # a record that belongs to another key
    assert t.get(key(1)) is None and t.get(key(2)) is None
    assert t.stats().corrupt == 2


def test_chunks_survive_a_restart_in_access_order(tmp_path):
    t = _tier(tmp_path, size_mib=1)
    for i in range(4):
        t.put(key(i), value(i, 250_000))
        time.sleep(0.01)  # distinct mtimes
    t.get(key(0))  # most recently used now
    t.close()
    leftover = t._path(key(0)).with_name("x.1234.tmp")
    leftover.write_bytes(b"half a record")  # a write cut short by a crash

    again = _tier(tmp_path, size_mib=1)
    assert again.contains([key(i) for i in range(4)]) == [True] * 4
    assert bytes(again.get(key(2))) == value(2, 250_000)
    assert not leftover.exists()
    again.put(key(4), value(4, 250_000))  # 4 chunks fit in 1 MiB, not 5: evict the oldest (1)
    assert again.contains([key(i) for i in range(5)]) == [True, False, True, True, True]
    assert again.stats().entries == 4


def test_restart_with_a_smaller_bound_evicts_down_to_it(tmp_path):
    t = _tier(tmp_path, size_mib=4)
    for i in range(8):
        t.put(key(i), value(i, 400_000))
    t.close()
    small = _tier(tmp_path, size_mib=1)
    s = small.stats()
    assert s.entries == 2 and s.bytes <= 1 << 20
    files = [f for _, _, fs in os.walk(small.root) for f in fs if f != ".lock"]
    assert len(files) == 2
