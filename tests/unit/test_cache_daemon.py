"""The node cache daemon's server and client over a real Unix socket (cache/daemon.py,
daemon_client.py; docs/cache_server.md): chunks saved by one process are read by another through
the shared segment, bitwise; a client killed mid-save leaves nothing visible; a garbled client
is dropped and counted while the others go on; a daemon gone fails calls within their deadline."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import zlib

import pytest

from lmcache_pd.cache.daemon import CacheDaemon
from lmcache_pd.cache.daemon_client import DaemonClient, DaemonGone
from lmcache_pd.cache.keys import ChunkKey
from tests.waiting import wait_for

SLAB = 256 << 10
CHUNK = 60_000


def key(i: int) -> ChunkKey:
    return ChunkKey("-", i.to_bytes(32, "little"))


@pytest.fixture
def daemon(tmp_path):
    d = CacheDaemon(str(tmp_path / "cache.sock"), segment_bytes=4 * SLAB, slab_bytes=SLAB)
    d.start()
    yield d
    d.close()


def _saver(path: str, payloads: list[bytes]) -> None:
    c = DaemonClient(path, timeout_s=5)
    for i, p in enumerate(payloads):
        assert c.save(key(i), p, owner=f"req-{i}", crc=zlib.crc32(p))
    c.close()


def test_chunks_saved_by_one_process_are_read_by_another_bitwise(daemon):
    payloads = [os.urandom(CHUNK) for _ in range(3)]
    proc = mp.get_context("spawn").Process(target=_saver, args=(daemon.path, payloads))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    c = DaemonClient(daemon.path, timeout_s=5)
    try:
        slots = c.acquire([key(0), key(1), key(2), key(3)], owner="load-1")  # leading hits only
        assert len(slots) == 3
        for (offset, n, crc), p in zip(slots, payloads):
            got = bytes(c.segment.view[offset:offset + n])
            assert got == p and zlib.crc32(got) == crc
        assert c.stats()["leased"] == 3
        c.release("load-1")
        assert c.stats()["leased"] == 0
        assert c.save(key(0), payloads[0], owner="again", crc=0) is False  # stored already
    finally:
        c.close()


def _writer_killed(path: str, payload: bytes, started) -> None:
    c = DaemonClient(path, timeout_s=5)
    assert c.save(key(0), payload, owner="req-0", crc=zlib.crc32(payload))
    offset = c.reserve(key(99), CHUNK, owner="req-99")
    started.set()
    while True:  # writing its slot, over and over, until it is killed
        c.segment.view[offset:offset + CHUNK] = payload


def test_a_client_killed_mid_save_leaves_nothing_visible_and_its_slot_free(daemon):
    payload = os.urandom(CHUNK)
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_writer_killed, args=(daemon.path, payload, started))
    proc.start()
    assert started.wait(60), "the writer did not start"
    time.sleep(0.05)  # (bytes in flight: it copies into the slot in a loop)
    os.kill(proc.pid, 9)
    proc.join(10)
    wait_for(lambda: daemon.clients == 0, 5, "the killed client's connection ended", every_s=0.005)
    c = DaemonClient(daemon.path, timeout_s=5)
    try:
        assert c.contains([key(0), key(99)]) == [True, False]
        assert c.stats()["reserved"] == 0
        assert c.reserve(key(99), CHUNK, owner="again") >= 0  # its slot is free again
    finally:
        c.close()


def _payload(i: int) -> bytes:
    return (i.to_bytes(4, "little") * (CHUNK // 4 + 1))[:CHUNK]


def _busy_client(path: str, seed: int, out) -> None:
    import random

    rnd = random.Random(seed)
    c = DaemonClient(path, timeout_s=10)
    saved, checked = 0, 0
    for n in range(120):
        i = rnd.randrange(60)  # the clients' keys overlap: the same chunk saved by several at once
        if rnd.random() < 0.5:
            saved += c.save(key(i), _payload(i), owner=f"s{n}", crc=zlib.crc32(_payload(i)))
            continue
        for offset, size, crc in c.acquire([key(i)], owner=f"r{n}"):
            got = bytes(c.segment.view[offset:offset + size])
            assert got == _payload(i) and zlib.crc32(got) == crc, f"chunk {i} torn"
            checked += 1
        c.release(f"r{n}")
    c.close()
    out.put((saved, checked))


def test_many_clients_at_once_lose_no_chunk_and_tear_none(tmp_path):
    d = CacheDaemon(str(tmp_path / "busy.sock"), segment_bytes=8 << 20, slab_bytes=1 << 20)  # room for all 60
    d.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_busy_client, args=(d.path, seed, out)) for seed in range(4)]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        saved = sum(r[0] for r in results)
        assert saved == d.store.stats().writes == d.store.stats().chunks  # each save that said yes is kept
        assert sum(r[1] for r in results) > 0
        c = DaemonClient(d.path, timeout_s=5)
        present = [i for i in range(60) if c.contains([key(i)])[0]]
        for offset, size, crc in c.acquire([key(i) for i in present], owner="check"):
            assert zlib.crc32(bytes(c.segment.view[offset:offset + size])) == crc
        assert len(present) == saved and d.store.stats().reserved == 0
        c.close()
    finally:
        d.close()


def test_a_garbled_client_is_dropped_and_counted_and_the_others_go_on(daemon):
    good = DaemonClient(daemon.path, timeout_s=5)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bad.connect(daemon.path)
        bad.recv(8)
        bad.sendall(b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1")  # a frame that is no request
        wait_for(lambda: daemon.garbled == 1, 5, "the garbled client dropped", every_s=0.005)
        assert bad.recv(1) == b""  # closed by the daemon
        assert good.save(key(1), os.urandom(CHUNK), owner="r", crc=0)
        assert good.stats()["garbled"] == 1
    finally:
        bad.close()
        good.close()


def test_a_daemon_that_is_gone_fails_every_call_within_its_deadline(tmp_path):
    d = CacheDaemon(str(tmp_path / "gone.sock"), segment_bytes=SLAB, slab_bytes=SLAB)
    d.start()
    c = DaemonClient(d.path, timeout_s=1.0)
    d.close()
    t0 = time.monotonic()
    with pytest.raises(DaemonGone):
        c.contains([key(1)])
    assert time.monotonic() - t0 < 1.5
    c.close()
    with pytest.raises(DaemonGone, match="gone.sock"):
        DaemonClient(str(tmp_path / "gone.sock"), timeout_s=1.0)
    assert not os.path.exists(d.path)


def test_one_client_cannot_end_anothers_leases_or_writes_under_the_same_owner_name(daemon):
    a, b = DaemonClient(daemon.path, timeout_s=5), DaemonClient(daemon.path, timeout_s=5)
    try:
        assert a.save(key(1), os.urandom(CHUNK), owner="req", crc=0)
        assert len(a.acquire([key(1)], owner="req")) == 1
        assert a.reserve(key(2), CHUNK, owner="req") >= 0
        b.release("req")  # the same owner name, another connection
        assert not b.commit(key(2), "req", crc=0) and not b.abort(key(2), "req")
        assert a.stats()["leased"] == 1 and a.stats()["reserved"] == 1
        assert a.commit(key(2), "req", crc=0)
    finally:
        a.close()
        b.close()


def _connect_as(path: str, uid: int, out) -> None:
    os.setgid(uid)
    os.setuid(uid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        out.put(s.recv(8))  # b"": refused before the segment
    except OSError as e:
        out.put(repr(e))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root: to connect as another user")
def test_a_process_of_another_user_is_refused_before_the_segment_and_counted():
    import tempfile

    folder = tempfile.mkdtemp(prefix="pd-stranger-")  # (pytest's tmp_path is closed to other users)
    os.chmod(folder, 0o755)
    daemon = CacheDaemon(os.path.join(folder, "cache.sock"), segment_bytes=SLAB, slab_bytes=SLAB)
    daemon.start()
    try:
        _stranger(daemon)
    finally:
        daemon.close()
        os.rmdir(folder)


def _stranger(daemon: CacheDaemon) -> None:
    os.chmod(daemon.path, 0o666)  # the file's mode changed by mistake: the peer check still holds
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_connect_as, args=(daemon.path, 65534, out))
    p.start()
    got = out.get(timeout=10)
    p.join(10)
    assert got == b"", f"a stranger got {got!r}"
    assert daemon.strangers == 1 and daemon.clients == 0
    c = DaemonClient(daemon.path, timeout_s=5)  # this user still gets in
    try:
        assert c.status().stats["strangers"] == 1 and len(c.status().clients) == 1
    finally:
        c.close()


def test_status_names_the_clients_and_counts_hits(daemon):
    a, b = DaemonClient(daemon.path, timeout_s=5), DaemonClient(daemon.path, timeout_s=5)
    try:
        assert a.save(key(1), os.urandom(CHUNK), owner="w", crc=0)
        b.contains([key(1), key(2)])
        b.acquire([key(1), key(2)], owner="r")
        r = a.status()
        s = r.stats
        assert (s["lookups"], s["lookup_hits"], s["reads"], s["read_hits"], s["writes"]) == (2, 1, 2, 1, 1)
        assert s["read_bytes"] == s["written_bytes"] == CHUNK
        assert sorted(c.pid for c in r.clients) == [os.getpid()] * 2
        assert [(c.slabs, c.used) for c in r.classes] == [(1, 1)]
    finally:
        a.close()
        b.close()


def test_the_daemons_http_serves_metrics_and_stats_and_clears_only_with_the_token(daemon):
    import json
    import urllib.error
    import urllib.request

    from lmcache_pd.auth import Keyring
    from lmcache_pd.cache.daemon_http import DaemonHTTP

    keys = Keyring(b"s" * 32)
    http = DaemonHTTP(daemon, host="127.0.0.1", port=0, keys=keys)
    http.start()
    c = DaemonClient(daemon.path, timeout_s=5)
    base = f"http://127.0.0.1:{http.address[1]}"
    try:
        assert c.save(key(1), os.urandom(CHUNK), owner="w", crc=0)
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "lmcache_pd_cache_server_writes_total 1.0" in metrics
        assert "lmcache_pd_cache_server_clients 1.0" in metrics
        stats = json.loads(urllib.request.urlopen(base + "/cache/stats", timeout=5).read())
        assert stats["stats"]["chunks"] == 1 and len(stats["clients"]) == 1

        def clear(body, token=None):
            req = urllib.request.Request(base + "/cache/clear", data=json.dumps(body).encode(), method="POST")
            if token:
                req.add_header("authorization", f"Bearer {token}")
            try:
                return urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as e:
                return e.code

        assert clear({"all": True}) == 401 and clear({"all": True}, "wrong") == 401
        assert c.contains([key(1)]) == [True]
        assert clear({"everything": 1}, keys.api_token) == 400
        assert clear({"all": True}, keys.api_token) == 200 and c.contains([key(1)]) == [False]
    finally:
        c.close()
        http.close()


def test_a_daemon_serving_one_chunk_size_refuses_an_engine_of_another_and_names_both_fields(tmp_path):
    from lmcache_pd.cache.daemon_client import DaemonRefused

    d = CacheDaemon(str(tmp_path / "sized.sock"), segment_bytes=SLAB, slab_bytes=SLAB, chunk_tokens=256)
    d.start()
    try:
        with pytest.raises(DaemonRefused, match=r"cache_server.chunk_tokens.*not 128 \(cache.chunk_tokens\)"):
            DaemonClient(d.path, timeout_s=5, chunk_tokens=128)
        ok = DaemonClient(d.path, timeout_s=5, chunk_tokens=256)
        tool = DaemonClient(d.path, timeout_s=5)  # (--status says no size)
        assert ok.save(key(1), os.urandom(CHUNK), owner="w", crc=0) and tool.stats()["clients"] == 2
        ok.close()
        tool.close()
    finally:
        d.close()
