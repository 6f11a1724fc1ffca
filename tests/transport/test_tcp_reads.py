"""tcp's same-host reads (``same_host_reads``, transport/_cma.py): the receiver copies a batch out
of the sender's memory and the socket carries only its range table; who may be read, and what a
read that fails does. The contract suite runs tcp both ways (tests/transport/conftest.py)."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time

import msgspec
import numpy as np
import pytest
import torch

from lmcache_pd import auth
from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState
from lmcache_pd.layout import coalesce
from lmcache_pd.transport import _cma
from lmcache_pd.transport._tcp_wire import (
    _CHALLENGE,
    _ENCRYPTED,
    _HELLO,
    _HELLO_REPLY,
    _OFFER,
    _READS,
    _Descriptor,
    _hello_tag,
)
from tests.integration.relay import pump
from tests.transport.handles import wait
from tests.transport.test_tcp import PUBLIC, listening, recv_n

pytestmark = pytest.mark.skipif(not _cma.supported(), reason="no process_vm_readv here (Linux only)")

NBYTES = 4 << 20
_SENDER = r"""
import json, sys, time
import msgspec, numpy as np, torch
from lmcache_pd import transport as transports
from lmcache_pd.layout import coalesce
from tests.transport.handles import wait
desc, options, nbytes = bytes.fromhex(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
tx = transports.create("tcp", options)
src = (torch.arange(nbytes) % 251).to(torch.uint8)
sid = tx.register(src)
peer = tx.connect(desc, timeout_s=5)
# two ranges, the second out of order: both the offsets and the lengths must be read as sent
plan = coalesce(np.array([0, nbytes // 2]), np.array([nbytes // 2, 0]), np.array([nbytes // 2, nbytes // 2]))
h = tx.submit(peer, sid, plan, timeout_s=10)
print(json.dumps({"state": wait(tx, h).name, "error": h.error, "path": tx.stats.path}), flush=True)
tx.close()
"""


class CountingRelay:
    """Forwards one connection to ``target`` and counts the bytes the sender's side sends."""

    def __init__(self, target: tuple[str, int]):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.tally = [0]
        threading.Thread(target=self._run, args=(target,), daemon=True).start()

    @property
    def sent(self) -> int:
        return self.tally[0]

    def _run(self, target: tuple[str, int]) -> None:
        c, _ = self.srv.accept()
        up = socket.create_connection(target)
        threading.Thread(target=pump, args=(up, c), daemon=True).start()
        pump(c, up, tally=self.tally)


@pytest.mark.parametrize("off", [None, "sender", "receiver"])
def test_a_sender_in_another_process_is_read_and_its_socket_carries_no_payload(off):
    rx = transports.create("tcp", {"same_host_reads": off != "receiver"}, host="127.0.0.1", port=0)
    dst = torch.zeros(NBYTES, dtype=torch.uint8)
    region = rx.register(dst)
    rx.listen()
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    relay = CountingRelay((d.host, d.port))
    desc = msgspec.msgpack.encode(msgspec.structs.replace(d, port=relay.port))
    out = subprocess.run([sys.executable, "-c", _SENDER, desc.hex(), json.dumps({"same_host_reads": off != "sender"}),
                          str(NBYTES)], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["state"] == "DONE", got["error"]
    want = (torch.arange(NBYTES) % 251).to(torch.uint8)
    half = NBYTES // 2
    assert torch.equal(dst[:half], want[half:]) and torch.equal(dst[half:], want[:half])
    if off is None:
        assert got["path"] == rx.stats.path == "same-host reads"
        assert relay.sent < 4096, f"{relay.sent} B went through the socket for a read batch"
    else:
        assert got["path"] == rx.stats.path == ""
        assert relay.sent >= NBYTES
    rx.close()


def offered_hello(d: _Descriptor, pid: int, host: bytes, proof: int, proof_bytes: bytes | None = None,
                  flags: int = _READS) -> int:
    """Say a hello that offers reads, by hand; returns the reply's status. ``proof_bytes``: what
    the proof address holds (default: the hello's nonce, as a sender keeps it)."""
    conn = socket.create_connection((d.host, d.port))
    try:
        _, theirs = _CHALLENGE.unpack(recv_n(conn, _CHALLENGE.size))
        ours = auth.nonce()
        held = ctypes.create_string_buffer(ours if proof_bytes is None else proof_bytes, len(ours))
        offer = _OFFER.pack(pid, host, proof or ctypes.addressof(held))
        conn.sendall(_HELLO.pack(b"LPDH", d.token, d.region, ours, flags, bytes(16),
                                 _hello_tag(PUBLIC.tcp, theirs, d.token, d.region, ours, flags, bytes(16), offer))
                     + offer)
        return _HELLO_REPLY.unpack(recv_n(conn, _HELLO_REPLY.size))[1]
    finally:
        conn.close()


def test_only_a_process_that_holds_the_hellos_nonce_is_read():
    rx, _, region = listening(1 << 16, io_timeout_s=2)
    d = msgspec.msgpack.decode(rx.export_descriptor(region), type=_Descriptor)
    me, here = os.getpid(), _cma.host_id()
    assert offered_hello(d, me, here, 0) == 4  # the nonce where it says: reads
    # A key holder naming a process that does not hold its nonce there (one it could not read
    # itself, say) gets the socket path, never a copy of that process's memory.
    assert offered_hello(d, me, here, 0, proof_bytes=bytes(16)) == 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert offered_hello(d, child.pid, here, 0) == 0  # the same address in another process
    finally:
        child.kill()
        child.wait()
    assert offered_hello(d, me, bytes(16), 0) == 0  # another host (or pid namespace)
    assert offered_hello(d, me, here, 8) == 0  # an address that is not mapped
    assert offered_hello(d, me, here, 0, flags=_READS | _ENCRYPTED) == 2  # never reads with encryption
    assert rx.stats.path == "same-host reads"
    rx.close()


def test_a_source_that_cannot_be_read_fails_the_batch_and_lands_nothing():
    rx, dst, region = listening(1 << 16, io_timeout_s=2)
    tx = transports.create("tcp", {})
    sid = tx.register(torch.full((1 << 16,), 7, dtype=torch.uint8))
    peer = tx.connect(rx.export_descriptor(region), timeout_s=2)
    base, tx._bases[sid] = tx._bases[sid], 4096  # the sender names addresses nothing is mapped at
    h = tx.submit(peer, sid, coalesce(np.array([0]), np.array([0]), np.array([1 << 16])), timeout_s=5)
    assert wait(tx, h) == BatchState.FAILED
    assert "could not read our memory" in h.error
    assert rx.stats.refused_batches == 1 and rx.stats.batches == 0
    assert not dst.any()
    tx._bases[sid] = base  # the stream reconnects, and is read again
    h = tx.submit(peer, sid, coalesce(np.array([0]), np.array([0]), np.array([1 << 16])), timeout_s=5)
    assert wait(tx, h) == BatchState.DONE, h.error
    assert (dst == 7).all()
    tx.close()
    rx.close()


class KillingGate:
    """Admits every batch; the first one's sender is killed (and reaped) before its bytes are read."""

    def __init__(self):
        self.sender: subprocess.Popen | None = None
        self.landed: list[bool] = []

    def admit(self, session: bytes, ticket: bytes, dst: list[int], lengths: list[int]):
        if self.sender is not None and self.sender.poll() is None:
            self.sender.kill()
            self.sender.wait()

        def done(landed: bool) -> None:
            self.landed.append(landed)
        return done


def test_a_sender_killed_before_its_batch_is_read_lands_nothing_and_the_receiver_serves_on():
    gate = KillingGate()
    rx = transports.create("tcp", {}, host="127.0.0.1", port=0)
    dst = torch.full((NBYTES,), 0xEE, dtype=torch.uint8)
    region = rx.register(dst)
    rx.listen(gate)
    desc = rx.export_descriptor(region)
    gate.sender = subprocess.Popen([sys.executable, "-c", _SENDER, desc.hex(), "{}", str(NBYTES)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    deadline = time.monotonic() + 60
    while not gate.landed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.landed == [False], gate.sender.communicate()  # the read failed: nothing of it may be used
    assert gate.sender.returncode == -9
    assert rx.stats.refused_batches == 1 and rx.stats.batches == 0
    assert (dst == 0xEE).all()
    tx = transports.create("tcp", {})  # and the next sender is served, read as before
    sid = tx.register(torch.full((NBYTES,), 7, dtype=torch.uint8))
    peer = tx.connect(desc, timeout_s=2)
    h = tx.submit(peer, sid, coalesce(np.array([0]), np.array([0]), np.array([NBYTES])), timeout_s=5)
    assert wait(tx, h) == BatchState.DONE, h.error
    assert (dst == 7).all() and gate.landed == [False, True] and tx.stats.path == "same-host reads"
    tx.close()
    rx.close()


def test_a_read_of_more_ranges_than_one_call_takes_copies_every_range():
    # process_vm_readv takes at most IOV_MAX ranges a call: a batch of paged KV may have thousands.
    n = 3000
    src = np.random.default_rng(1).integers(0, 256, 8 * n, dtype=np.uint8)
    dst = np.zeros(8 * n, dtype=np.uint8)
    order = np.random.default_rng(2).permutation(n).astype(np.uint64)  # range i lands at slot order[i]
    _cma.read(os.getpid(), dst.ctypes.data + 8 * order, src.ctypes.data + 8 * np.arange(n, dtype=np.uint64),
              np.full(n, 8, dtype=np.uint64))
    assert np.array_equal(dst.reshape(n, 8)[order], src.reshape(n, 8))
    with pytest.raises(_cma.ReadError):  # a range past what is mapped, in the last call: the read fails
        _cma.read(os.getpid(), np.array([dst.ctypes.data] * 1500, dtype=np.uint64),
                  np.array([src.ctypes.data] * 1499 + [8], dtype=np.uint64), np.full(1500, 8, dtype=np.uint64))
