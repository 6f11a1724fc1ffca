"""Liveness and back-pressure of a sender and receivers in one process (real zmq, real transports):
peers that die, stop or restart; a full decode pool; the bound on a whole hand-off; a load
canceled while the loader copies into its blocks. docs/failures.md states what each must do.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import msgspec
import pytest

from lmcache_pd.cli.local import free_ports
from lmcache_pd.config import config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.worker import NodeConfig, Worker
from tests.unit.nodes import BLOCK, CPT, Node, make_cfg

_DEAD: list[object] = []
"""Senders stopped dead (their loop, not their sockets): kept until the process exits, because
collecting a zmq context whose sockets are still open blocks in zmq_ctx_term."""


def stop_dead(sender) -> None:
    """The prefill worker stops without a word: no heartbeats, no TransferDone, no Cancel."""
    sender._loop.close()
    _DEAD.append(sender)


def two_decodes_cfg(**timeouts):
    http_p, h0, c0, d0, h1, c1, d1 = free_ports(7)
    t = {"handshake_s": 2, "control_s": 1, "alloc_s": 3, "transfer_s": 5, "data_s": 3, "lease_s": 10,
         "heartbeat_s": 0.2, "peer_s": 1, **timeouts}
    return config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": "prefill-0", "http_port": http_p}],
        "decode": [{"name": "decode-0", "http_port": h0, "control_port": c0, "data_port": d0},
                   {"name": "decode-1", "http_port": h1, "control_port": c1, "data_port": d1}],
        "transport": {"name": "tcp"},
        "pool": {"size_mib": 1},  # 8 pages
        "timeouts": t,
        "backpressure": {"prefill_queue": 2},
    }, source="test")


def fill(n: Node, tid: str = "filler", pages: int = 8) -> None:
    """Take the whole decode pool with a reservation nobody will use before the test ends."""
    n.sender.reserve(Handoff(tid, "decode-0", pages * BLOCK, "d" * 32)).result(5)
    assert n.receiver.pool.free_pages == 0


def test_a_full_decode_pool_bounds_the_prefill_queue_and_starves_no_other_decode():
    cfg = two_decodes_cfg()
    n = Node(cfg)
    other = KVReceiver(Worker("decode-1", 0, CPT), NodeConfig.of(cfg), kv=n.receiver.kv,
                       kv_buffer=n.receiver.kv_buffer.clone())
    other.start()
    try:
        fill(n)
        for i in range(2):  # these wait for decode-0's pages (queued there)
            n.sender.submit(SendSpec(f"p-w{i}", Handoff(f"w{i}", "decode-0", BLOCK, "d" * 32), (1,)))
        time.sleep(0.3)
        t0 = time.monotonic()
        n.receiver.submit_load(LoadSpec("d-over", Handoff("over", "prefill-0", BLOCK, "d" * 32), (1,)))
        n.sender.submit(SendSpec("p-over", Handoff("over", "decode-0", BLOCK, "d" * 32), (1,)))
        (s,), (ld,) = n.results(1, 1, timeout_s=2)
        assert s.transfer_id == "over" and not s.ok and "backpressure.prefill_queue" in s.error
        assert not ld.ok and "backpressure.prefill_queue" in ld.error  # its decode recomputes at once too
        assert time.monotonic() - t0 < 1.5  # refused at once (not after timeouts.alloc_s = 3 s): blocks freed now
        # decode-1 is served meanwhile, at full speed.
        n.sender.submit(SendSpec("p-o", Handoff("o1", "decode-1", 2 * BLOCK, "d" * 32), (2, 3)))
        other.submit_load(LoadSpec("d-o", Handoff("o1", "prefill-0", 2 * BLOCK, "d" * 32), (4, 5)))
        deadline = time.monotonic() + 3
        got = []
        while not got and time.monotonic() < deadline:
            got = other.drain(0.1)
        assert got and got[0].ok, got
        assert time.monotonic() - t0 < 2.5  # before decode-0's queue gives up (alloc_s = 3 s)
        # The two queued hand-offs end by timeouts.alloc_s (decode-0's pool stays full).
        sends, _ = n.results(3, 0, timeout_s=6)
        by_tid = {r.transfer_id: r for r in sends}
        assert by_tid["o1"].ok and all(not by_tid[t].ok and "timeouts.alloc_s" in by_tid[t].error
                                       for t in ("w0", "w1")), sends
    finally:
        other.close()
        n.close()


def test_a_decode_that_dies_fails_waiting_handoffs_within_the_handshake_deadline():
    """Not after timeouts.alloc_s: the connection drops, and the one new session the hand-off
    tries (the decode might have restarted) fails within timeouts.handshake_s."""
    n = Node(make_cfg(alloc_s=10, control_s=10, handshake_s=1))
    try:
        fill(n)
        n.sender.submit(SendSpec("p-1", Handoff("t1", "decode-0", BLOCK, "d" * 32), (1,)))
        time.sleep(0.3)  # queued for pages on the decode side
        t0 = time.monotonic()
        n.receiver.close()  # the decode process dies: its sockets close
        (s,), _ = n.results(1, 0, timeout_s=5)
        assert not s.ok and "timeouts.handshake_s" in s.error and time.monotonic() - t0 < 2, s.error
    finally:
        n.close()


def test_a_prefill_that_stops_loses_what_it_was_writing_and_the_decode_recomputes_at_once():
    n = Node(make_cfg(transfer_s=30, heartbeat_s=0.2, peer_s=1))
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        n.receiver.submit_load(LoadSpec("d-1", Handoff("t1", "prefill-0", 2 * BLOCK, "d" * 32), (1, 2)))
        t0 = time.monotonic()
        stop_dead(n.sender)
        (ld,) = n.receiver.drain(5)
        assert not ld.ok and "timeouts.peer_s" in ld.error, ld.error
        assert time.monotonic() - t0 < 3  # not timeouts.transfer_s (30 s)
        assert n.pool_full()
    finally:
        n.receiver.close()


def test_a_restarted_prefill_frees_what_its_predecessor_was_writing():
    cfg = make_cfg(transfer_s=30, peer_s=30)
    n = Node(cfg)
    try:
        n.sender.reserve(Handoff("t1", "decode-0", 2 * BLOCK, "d" * 32)).result(5)
        n.receiver.submit_load(LoadSpec("d-1", Handoff("t1", "prefill-0", 2 * BLOCK, "d" * 32), (1, 2)))
        old = n.sender
        stop_dead(old)
        n.sender = type(old)(Worker("prefill-0", 0, CPT), NodeConfig.of(cfg), kv=old.kv, kv_buffer=old.kv_buffer)
        n.sender.start()
        t0 = time.monotonic()
        n.handoff("t2", [3], [3], BLOCK)  # its first hand-off links: the decode sees the new incarnation
        sends, loads = n.results(1, 2, timeout_s=5)
        by_tid = {ld.transfer_id: ld for ld in loads}
        assert sends[0].ok and by_tid["t2"].ok
        assert not by_tid["t1"].ok and "restarted" in by_tid["t1"].error and time.monotonic() - t0 < 3
        assert n.pool_full()
    finally:
        n.close()


def test_a_handoff_never_outlives_the_sum_of_its_deadlines(monkeypatch):
    n = Node(make_cfg(handshake_s=0.2, control_s=0.2, alloc_s=0.2, data_s=0.2))
    try:
        async def hang(*args, **kwargs):  # a transfer step that ignores its own deadline (a bug)
            await asyncio.sleep(3600)

        monkeypatch.setattr("lmcache_pd.node.lanes.send_groups", hang)
        t0 = time.monotonic()
        n.handoff("t1", [1], [1], BLOCK)
        (s,), (ld,) = n.results(1, 1, timeout_s=10)
        assert not s.ok and "took over" in s.error
        assert time.monotonic() - t0 < n.sender.handoff_deadline_s() + 1
        assert not ld.ok and n.pool_full()  # the pages were given back (Cancel)
    finally:
        n.close()


def test_a_load_canceled_while_the_loader_copies_ends_after_the_copy():
    n = Node(make_cfg())
    try:
        n.receiver.submit_load(LoadSpec("d-1", Handoff("t1", "prefill-0", BLOCK, "d" * 32), (1,)))
        loader = n.receiver.loader
        with loader._lock:
            load = loader._loads["d-1"]
            load.busy = True  # as the loader marks it while scattering landed pages into its blocks
        n.receiver.cancel_load("d-1")
        assert n.receiver.drain(0.3) == [], "reported while the loader may still write into the blocks"
        loader._settle(load)  # the loader's copy ended
        (ld,) = n.receiver.drain(1)
        assert not ld.ok and ld.error == "request aborted"
    finally:
        n.close()


@pytest.mark.parametrize("where", ["control", "data"])
def test_a_peer_without_the_secret_gets_nothing_in(where):
    from lmcache_pd import auth
    from lmcache_pd.node.sender import KVSender

    cfg = make_cfg()
    n = Node(cfg)
    try:
        evil = KVSender(Worker("prefill-0", 0, CPT), NodeConfig.of(cfg), kv=n.sender.kv,
                        kv_buffer=n.sender.kv_buffer, keys=auth.Keyring(b"a secret that is not ours......"))
        if where == "data":  # it even got the descriptor somehow: the tcp hello still refuses it
            evil.transport = type(evil.transport)(evil.transport.options, keys=evil.keys)
            evil.region = evil.transport.register(evil.kv_buffer)
            with pytest.raises(Exception, match="refused the hello"):
                evil.transport.connect(n.receiver.transport.export_descriptor(n.receiver.region), 2)
            assert n.receiver.transport.stats.refused == 1
        else:
            evil.start()
            evil.submit(SendSpec("p-e", Handoff("e1", "decode-0", BLOCK, "d" * 32), (1,)))
            deadline = time.monotonic() + 5
            out = []
            while not out and time.monotonic() < deadline:
                out = evil.drain()
                time.sleep(0.05)
            assert out and not out[0].ok and "timeouts.handshake_s" in out[0].error
            evil.close()
            assert n.receiver.server.stats.unauthenticated >= 1 and n.receiver.server.stats.handshakes == 0
        assert n.pool_full()
    finally:
        n.close()


class CutRelay:
    """A TCP relay to ``target`` for the prefill's data connections: after :meth:`hold` it
    passes ``after`` more bytes towards the decode and holds the rest; :meth:`cut` then closes
    both sides, as a prefill host that dies mid-batch does."""

    def __init__(self, target: int):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.target = target
        self.budget: int | None = None
        self.forwarded = 0
        self.socks: list[socket.socket] = []
        self._cut = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def hold(self, after: int) -> None:
        self.forwarded, self.budget = 0, after

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [conn, up]
            threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, towards_decode: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if towards_decode and self.budget is not None:
                    data = data[:max(0, self.budget - self.forwarded)]
                    self.forwarded += len(data)
                    if not data:
                        self._cut.wait()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self._cut.set()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.srv.close()


def test_a_prefill_that_dies_mid_batch_ends_its_reservation_at_once():
    """The prefill stops dead with a batch part-way on the wire (held in a relay on the data
    plane), then its connection closes (the host is gone): the decode sees the batch break,
    ends the reservation (it can never complete: no batch is ever resent) and recomputes at
    once, not after timeouts.peer_s (30 s here), and its pages come back."""
    cfg = make_cfg("tcp", pool_mib=4, transfer_s=30, peer_s=30, lease_s=60, data_s=10)
    relay = CutRelay(cfg.decode[0].data_port)
    data = msgspec.to_builtins(cfg)
    data["decode"][0]["data_advertise"] = f"127.0.0.1:{relay.port}"
    # The payload on the wire, as between two hosts (on one host the decode would read it out of
    # the prefill's memory: tests/transport/test_tcp_reads.py kills a sender whose batch is unread).
    data["transport"]["options"] = {"same_host_reads": False}
    n = Node(config_from_dict(data, source="test"))
    try:
        n.handoff("warm", [1], [2], num_tokens=BLOCK)  # the data connection through the relay is open
        assert all(r.ok for r in sum(n.results(1, 1), []))
        relay.hold(after=300_000)  # the batch's header and part of its 2 MiB
        n.handoff("t1", list(range(4, 20)), list(range(20, 36)), num_tokens=16 * BLOCK)
        deadline = time.monotonic() + 5
        while relay.forwarded < 300_000:
            assert time.monotonic() < deadline, "the batch never reached the decode"
            time.sleep(0.005)
        stop_dead(n.sender)
        time.sleep(0.2)
        assert not n.receiver.drain(), "the load ended before the prefill's connection closed"
        t0 = time.monotonic()
        relay.cut()
        (ld,) = n.receiver.drain(5)
        assert not ld.ok and "mid-batch" in ld.error, ld.error
        assert time.monotonic() - t0 < 3
        deadline = time.monotonic() + 5
        while not n.pool_full():
            assert time.monotonic() < deadline, "the pages stayed held"
            time.sleep(0.01)
    finally:
        relay.cut()
        n.receiver.close()
