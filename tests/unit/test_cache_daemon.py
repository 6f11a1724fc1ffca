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
from tests.integration.client import wait_for

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


def _saver(path: str, payloads: list[bytes], then_die: bool) -> None:
    c = DaemonClient(path, timeout_s=5)
    for i, p in enumerate(payloads):
        assert c.save(key(i), p, owner=f"req-{i}", crc=zlib.crc32(p))
    if then_die:  # a reserved slot half written, then killed: no commit, no goodbye
        offset = c.reserve(key(99), CHUNK, owner="req-99")
        c.segment.view[offset:offset + 100] = b"x" * 100
        os._exit(0)
    c.close()


def test_chunks_saved_by_one_process_are_read_by_another_bitwise(daemon):
    payloads = [os.urandom(CHUNK) for _ in range(3)]
    proc = mp.get_context("spawn").Process(target=_saver, args=(daemon.path, payloads, False))
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


def test_a_client_killed_mid_save_leaves_nothing_visible_and_its_slot_free(daemon):
    payloads = [os.urandom(CHUNK)]
    proc = mp.get_context("spawn").Process(target=_saver, args=(daemon.path, payloads, True))
    proc.start()
    proc.join(60)
    wait_for(lambda: daemon.clients == 0, 5, "the killed client's connection ended", every_s=0.005)
    c = DaemonClient(daemon.path, timeout_s=5)
    try:
        assert c.contains([key(0), key(99)]) == [True, False]
        assert c.stats()["reserved"] == 0
    finally:
        c.close()


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
