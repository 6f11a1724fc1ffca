"""Cache records are ours or a miss: sealed under a key from the deployment's
secret, in a private folder one process holds; a planted, grown or foreign record never loads.

Chunk keys hash the prompt, so anyone can compute them: before, a record with a matching CRC-32
under such a key (in Redis, or in the default folder under /tmp) was loaded by every instance.
"""

from __future__ import annotations

import os
import stat

import pytest

from lmcache_pd import auth
from lmcache_pd.cache import build_cache
from lmcache_pd.cache.disk import DiskOptions, DiskTier
from lmcache_pd.cache.remote import RedisOptions, RedisTier
from lmcache_pd.cache.tier import PUBLIC_RECORDS, Records
from lmcache_pd.config import CacheConfig, TierConfig, config_from_dict
from lmcache_pd.errors import ConfigError
from tests.cache.tiers import key, value

OURS = Records(auth.Keyring(b"the deployment's secret, 32 bytes").records_key)


def disk(path, records: Records = OURS) -> DiskTier:
    t = DiskTier(DiskOptions(path=str(path)), instance="t", rank=0)
    t.records = records
    t.open()
    return t


def test_a_record_planted_in_redis_by_someone_without_the_secret_is_a_miss(redis_server):
    ours = RedisTier(RedisOptions(url=redis_server.url), instance="t", rank=0)
    ours.records = OURS
    ours.open()
    planter = RedisTier(RedisOptions(url=redis_server.url), instance="x", rank=0)  # may write, has no secret
    planter.open()
    assert planter.put(key(1), value(666))  # a well-formed record, sealed with the public key
    assert ours.get(key(1)) is None and ours.stats().corrupt == 1
    assert ours.put(key(2), value(2)) and bytes(ours.get(key(2))) == value(2)  # ours load
    assert planter.get(key(2)) is None  # and only with the secret
    ours.close()
    planter.close()


def test_a_file_planted_in_the_folder_is_a_miss(tmp_path):
    t = disk(tmp_path / "c")
    assert t.put(key(1), value(1, 10_000))
    p = t._path(key(1))
    head, payload = PUBLIC_RECORDS.encode(key(1), value(666, 10_000))  # same size, not sealed by us
    p.write_bytes(bytes(head) + bytes(payload))
    assert t.get(key(1)) is None and not p.exists() and t.stats().corrupt == 1
    t.close()


def test_a_file_larger_than_its_index_entry_is_a_miss_not_a_memory_error(tmp_path):
    t = disk(tmp_path / "c")
    assert t.put(key(1), value(1, 10_000))
    with open(t._path(key(1)), "ab") as f:
        f.truncate(1 << 40)  # sparse: a terabyte on paper
    assert t.get(key(1)) is None and t.stats().corrupt == 1
    t.close()


def test_the_folder_is_private_and_its_files_too(tmp_path):
    t = disk(tmp_path / "c")
    assert t.put(key(1), value(1))
    assert stat.S_IMODE(os.stat(t.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(t._path(key(1))).st_mode) == 0o600
    t.close()


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    t = disk(tmp_path / "c")
    with pytest.raises(ConfigError, match="used by another process"):
        disk(tmp_path / "c")
    t.close()
    disk(tmp_path / "c").close()  # free again once the first closed


def test_a_folder_another_user_owns_or_can_swap_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to user 65534") as e:
        disk(theirs)
    assert e.value.field == "cache.tiers.options.path"
    shared = tmp_path / "shared"  # writable by all, no sticky bit: anyone can rename our folder
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match="can be changed by another user"):
        disk(shared / "c")
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="is a link"):
        disk(tmp_path / "link")


def test_build_cache_seals_records_with_the_secrets_key(tmp_path):
    cfg = CacheConfig(enabled=True, tiers=(TierConfig(name="disk", options={"path": str(tmp_path / "c")}),))
    cache = build_cache(cfg, instance="t", rank=0, record_key=OURS.key)
    assert all(t.records.key == OURS.key for t in cache.tiers)


def test_a_remote_redis_tier_needs_a_secret():
    from lmcache_pd.config import check_exposure

    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": 18001}],
        "decode": [{"name": "decode-0", "http_port": 18002, "control_port": 18003, "data_port": 18004}],
        "cache": {"enabled": True, "tiers": [{"name": "redis", "options": {"url": "redis://:pw@10.1.2.3:6379/0"}}]},
    }, source="test")
    with pytest.raises(ConfigError, match="seal its records") as e:
        check_exposure(cfg, auth.Keyring(None), "prefill-0")
    assert e.value.field == "cache.tiers.0.options.url" and "pw" not in str(e.value)
    check_exposure(cfg, auth.Keyring(b"the deployment's secret, 32 bytes"), "prefill-0")
