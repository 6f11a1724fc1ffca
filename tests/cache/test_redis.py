"""Remote tier on a real redis-server: outages are misses within a deadline, then it reconnects."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from lmcache_pd.cache.remote import RedisOptions, RedisTier
from tests.cache.tiers import key, value
from tests.redis_server import RedisServer


@pytest.fixture
def own_server():
    server = RedisServer().start()
    yield server
    server.stop()


def _tier(url, **opts):
    t = RedisTier(RedisOptions(url=url, **opts), instance="t", rank=0)
    t.open()
    return t


def test_server_down_is_a_fast_miss_then_the_tier_reconnects(own_server, caplog):
    t = _tier(own_server.url, timeout_s=0.5, retry_s=0.5)
    assert t.put(key(1), value(1))
    own_server.kill()
    with caplog.at_level(logging.WARNING, logger="lmcache_pd"):
        t0 = time.monotonic()
        assert t.get(key(1)) is None
        assert t.contains([key(1), key(2)]) == [False, False]
        assert not t.put(key(2), value(2))
        assert t.get(key(1)) is None
        assert time.monotonic() - t0 < 2.0
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 1 and "retry_s" in down[0].getMessage(), "one warning per outage, naming the field"
    s = t.stats()
    assert not s.up and s.errors >= 4

    own_server.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 5
    while not t.put(key(3), value(3)):
        assert time.monotonic() < deadline, "the tier did not reconnect within retry_s"
        time.sleep(0.1)
    assert bytes(t.get(key(3))) == value(3)
    assert t.stats().up
    t.close()


def test_a_stopped_server_costs_one_command_deadline(own_server):
    t = _tier(own_server.url, timeout_s=0.3, retry_s=30)
    t.put(key(1), value(1))
    own_server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert t.get(key(1)) is None  # waits timeout_s once ...
        first = time.monotonic() - t0
        t1 = time.monotonic()
        assert t.contains([key(1)]) == [False]  # ... then answers at once while down
        assert first < 1.5 and time.monotonic() - t1 < 0.1
    finally:
        own_server.proc.send_signal(signal.SIGCONT)
    t.close()


def test_a_garbled_value_is_a_miss_and_is_deleted(redis_server):
    t = _tier(redis_server.url, key_prefix="garble:")
    t.put(key(1), value(1, 10_000))
    name = t._name(key(1))
    c = redis_server.client()
    raw = bytearray(c.get(name))
    raw[-1] ^= 0xFF
    c.set(name, bytes(raw))
    assert t.get(key(1)) is None
    assert c.exists(name) == 0 and t.stats().corrupt == 1
    c.set(name, b"not a record")
    assert t.get(key(1)) is None
    t.close()


def test_ttl_expires_chunks_unless_pinned(redis_server):
    t = _tier(redis_server.url, key_prefix="ttl:", ttl_s=60)
    t.put(key(1), value(1))
    t.put(key(2), value(2))
    c = redis_server.client()
    assert 0 < c.ttl(t._name(key(1))) <= 60
    t.pin([key(1)])
    assert c.ttl(t._name(key(1))) == -1 and c.ttl(t._name(key(2))) > 0
    t.unpin([key(1)])
    assert c.ttl(t._name(key(1))) > 0
    t.clear()
    t.close()


def test_a_server_down_at_start_does_not_fail_the_start():
    from tests.redis_server import free_port

    t = _tier(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2, retry_s=60)
    assert not t.stats().up
    assert t.get(key(1)) is None
    t.close()


def test_the_tier_logs_its_url_without_the_password(caplog):
    server = RedisServer(password="pw-51c0ffee").start()
    try:
        with caplog.at_level(logging.INFO, logger="lmcache_pd"):
            t = _tier(server.url, timeout_s=0.5, retry_s=0.5)
            assert t.put(key(1), value(1))  # the password is right: the tier works
            server.kill()
            assert t.get(key(1)) is None
            server.start()
            deadline = time.monotonic() + 5
            while not t.put(key(2), value(2)):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "unreachable" in text and "reachable again" in text and "redis://:***@" in text
        assert "pw-51c0ffee" not in text
        t.close()
    finally:
        server.stop()
