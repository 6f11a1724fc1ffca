"""Layered hand-offs (``transport.layerwise``, node/layered.py): sender and receiver in one process
(real zmq, real transports), the forward played by the test, which writes and marks each layer.

A layer goes as soon as it is marked computed, arrives bitwise, and the hand-off's timeline shows
bytes in flight before the forward ended; a forward that stops, or a request aborted mid-way,
ends the hand-off in bounded time with the decode pool full again.
"""

from __future__ import annotations

import socket
import threading
import time

import msgspec
import numpy as np
import pytest
import torch

from lmcache_pd import transport as transports
from lmcache_pd.config import config_from_dict
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.layout import KVLayout, PoolLayout, plan_cache_to_pool
from lmcache_pd.node.layered import LayerMarks
from lmcache_pd.node.timeline import hidden_fraction, prefill_phases
from tests.integration.relay import pump
from tests.unit.nodes import BLOCK, LAYERS, PAGE, Node, first_chunk, last_chunk, make_cfg, spin_cycles


def layered(n: Node, tid: str, p_blocks: list[int], d_blocks: list[int], num_tokens: int) -> LayerMarks:
    """A layered hand-off in one piece (its ``Pieces``: ``layered.last_pieces``)."""
    marks = LayerMarks(LAYERS)
    h = Handoff(tid, "decode-0", num_tokens, "d" * 32)
    n.sender.reserve(h)
    layered.last_pieces = n.sender.submit_layered(SendSpec(f"p-{tid}", h, tuple(p_blocks), layered=True), marks)
    n.receiver.submit_load(LoadSpec(f"d-{tid}", Handoff(tid, "prefill-0", num_tokens, "d" * 32), tuple(d_blocks)))
    return marks


class LateStamp:
    """Stands in for a GPU stamp (device_clock.Stamp) that the GPU passes ``after_s`` from now, at
    wall clock ``at``."""

    def __init__(self, after_s: float, at: float):
        self.ready_at, self.at = time.monotonic() + after_s, at

    def done(self) -> bool:
        return time.monotonic() >= self.ready_at

    def wall(self) -> float:
        assert self.done(), "read before the GPU passed it"
        return self.at


def layer_in_blocks(n: Node, layer: int, p_blocks: list[int], d_blocks: list[int]) -> bool:
    """The decode's blocks hold the prefill's ``layer``, bitwise."""
    return all(torch.equal(n.p_layers[layer][p].view(torch.uint8), n.d_layers[layer][d].view(torch.uint8))
               for p, d in zip(p_blocks, d_blocks))


def wait_until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


@pytest.fixture
def told(monkeypatch) -> list[list[int]]:
    """The layers named by each Landed the sender sends (``DecodePeer.landed``, spied on)."""
    from lmcache_pd.node.peer import DecodePeer

    seen: list[list[int]] = []
    real = DecodePeer.landed

    async def spy(self, transfer_id, pages=0, layers=None):
        seen.append(list(layers or []))
        await real(self, transfer_id, pages, layers)
    monkeypatch.setattr(DecodePeer, "landed", spy)
    return seen


@pytest.mark.parametrize("name", ["tcp", "loopback", "nixl"])
def test_each_layer_goes_as_it_is_computed_and_arrives_bitwise(name):
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = Node(make_cfg(name))
    try:
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        marks = layered(n, "l1", p_blocks, d_blocks, 2 * BLOCK + 3)  # the prompt ends inside its last block
        marks.layer(0)
        wait_until(lambda: n.in_pool(0, p_blocks))  # layer 0 is in the pool ...
        assert not n.in_pool(1, p_blocks)
        for b in p_blocks:  # ... while the forward computes layer 1 (new content, written now)
            n.p_layers[1][b].view(torch.uint8).copy_(torch.randint(0, 256, n.p_layers[1][b].view(torch.uint8).shape,
                                                                   dtype=torch.uint8))
        computing_1 = time.time()
        marks.layer(1)
        time.sleep(0.05)
        marks.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.num_bytes == ld.num_bytes == 3 * PAGE
        n.assert_moved(p_blocks, d_blocks)  # layer 1 as written after layer 0 had landed
        assert s.first_byte_at < s.computed_at and hidden_fraction(s) > 0.5, s
        # The timeline has each layer: 0 went while 1 was computed, both before the forward's end.
        sent_0, sent_1 = s.layers_sent_at
        assert s.first_byte_at == sent_0 < computing_1 <= sent_1 < s.computed_at, s
        assert prefill_phases(s)["layers"] == pytest.approx(sent_1 - sent_0)
        assert n.pool_full()
    finally:
        n.close()


@pytest.mark.parametrize("name", ["tcp", "loopback", "nixl"])
@pytest.mark.parametrize("scatter_landed", [True, False])
def test_the_decode_scatters_each_layer_as_it_lands_while_the_next_is_computed(scatter_landed, name):
    """``pool.scatter_landed``: layer 0's batch lands whole (tcp's receiver sees it; over a
    one-sided transport the sender says so, Landed(layers)), and the loader copies it into
    vLLM's blocks at once, while the prefill still computes layer 1 (so before TransferDone);
    off, nothing reaches the blocks before TransferDone."""
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    cfg = make_cfg(name)
    cfg = msgspec.structs.replace(cfg, pool=msgspec.structs.replace(cfg.pool, scatter_landed=scatter_landed))
    n = Node(cfg)
    try:
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        marks = layered(n, "early", p_blocks, d_blocks, 3 * BLOCK)

        marks.layer(0)
        wait_until(lambda: n.in_pool(0, p_blocks))  # layer 0 is in the pool
        if scatter_landed:
            wait_until(lambda: layer_in_blocks(n, 0, p_blocks, d_blocks))  # ... and in vLLM's blocks, layer 1 not computed yet
        else:
            time.sleep(0.3)
            assert not layer_in_blocks(n, 0, p_blocks, d_blocks), "scattered before TransferDone with pool.scatter_landed off"
        assert not any(torch.equal(n.p_layers[1][p].view(torch.uint8), n.d_layers[1][d].view(torch.uint8))
                       for p, d in zip(p_blocks, d_blocks))
        marks.layer(1)
        marks.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        n.assert_moved(p_blocks, d_blocks)
        # Layer 0 at least (seen above); the last layer races its own TransferDone.
        assert (ld.early_layers >= 1) if scatter_landed else (ld.early_layers == 0), ld
        assert ld.num_bytes == 3 * PAGE
        assert n.pool_full()
    finally:
        n.close()


@pytest.mark.parametrize("name", ["loopback", "nixl"])
def test_over_a_one_sided_transport_landed_names_each_layer_but_the_last_which_transferdone_covers(name, told):
    """The decode cannot see a one-sided transport's batches land, so the sender tells it of each
    layer (Landed) and it scatters that layer at once; the layer that completes the hand-off is
    not told: its TransferDone follows at once and says it (one message, not two), and the
    decode scatters it then, bitwise."""
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = Node(make_cfg(name))
    try:
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        marks = layered(n, "told", p_blocks, d_blocks, 3 * BLOCK - 1)
        marks.layer(0)
        wait_until(lambda: told == [[0]])  # layer 0 landed: told, while layer 1 is not computed
        wait_until(lambda: layer_in_blocks(n, 0, p_blocks, d_blocks))  # ... and scattered on it
        marks.layer(1)
        marks.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert told == [[0]], told  # the last layer: TransferDone's
        assert ld.early_layers == 1, ld  # layer 0 scattered on Landed, layer 1 on TransferDone
        n.assert_moved(p_blocks, d_blocks)
        assert n.pool_full()
    finally:
        n.close()


@pytest.mark.parametrize("landed_on_shared_gpu", [False, True])
def test_a_decode_whose_pool_shares_our_gpu_is_told_no_layer_before_transferdone(landed_on_shared_gpu, told, caplog):
    """Where the decode's pool is on our GPU (``Transport.shares_device``; loopback says so when
    told to), its scatter of each layer told would stall our forward (the GPU switching between
    the processes): the sender tells it nothing, and the decode scatters the hand-off whole on
    TransferDone, bitwise. With ``transport.landed_on_shared_gpu`` it is told as between GPUs."""
    cfg = make_cfg("loopback", options={"shares_device": True})
    cfg = msgspec.structs.replace(cfg, transport=msgspec.structs.replace(
        cfg.transport, landed_on_shared_gpu=landed_on_shared_gpu))
    n = Node(cfg)
    try:
        caplog.set_level("INFO", logger="lmcache_pd.node.lanes")
        p_blocks, d_blocks = [5, 6, 30], [11, 12, 40]
        marks = layered(n, "shared", p_blocks, d_blocks, 3 * BLOCK - 1)
        marks.layer(0)
        wait_until(lambda: n.in_pool(0, p_blocks))  # layer 0 is in the pool
        if landed_on_shared_gpu:
            wait_until(lambda: told == [[0]])
            wait_until(lambda: layer_in_blocks(n, 0, p_blocks, d_blocks))  # scattered during the "forward"
        else:
            time.sleep(0.3)
            assert told == [], told
            assert not layer_in_blocks(n, 0, p_blocks, d_blocks), "scattered during the forward on a shared GPU"
        marks.layer(1)
        marks.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert told == ([[0]] if landed_on_shared_gpu else []), told
        assert ld.early_layers == (1 if landed_on_shared_gpu else 0), ld
        n.assert_moved(p_blocks, d_blocks)
        assert n.pool_full()
        assert ("has its pool on this GPU" in caplog.text) is not landed_on_shared_gpu, caplog.text
    finally:
        n.close()


@pytest.mark.parametrize("name", ["tcp", "loopback", "nixl"])
def test_a_chunked_prompts_first_piece_lands_while_its_last_chunk_computes(name):
    """Chunked prefill: the blocks the first chunk's forward completes go once it computed every
    layer, in one batch, and are in the decode pool before the last chunk's forward starts; the
    last chunk's piece goes layer by layer and ends the hand-off. Everything lands bitwise, and
    (``pool.scatter_landed``) each layer is scattered once both chunks' pages of it landed."""
    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = Node(make_cfg(name))
    try:
        p_blocks, d_blocks = [5, 6, 30, 31], [11, 12, 40, 41]
        pieces = first_chunk(n, "chunked", p_blocks, d_blocks, 3 * BLOCK + 3, split=2)
        wait_until(lambda: n.sender.transport.stats.batches >= 1)  # the first chunk's blocks are in the pool:
        assert n.sender.transport.stats.batches == 1  # one batch, every layer (only the last chunk's is on the path)
        assert n.sender.drain() == [], "the hand-off ended before its last chunk"
        last = last_chunk(n, pieces, p_blocks, split=2)  # its forward writes its blocks now
        last.layer(0)
        # Layer 0's pages landed in two batches, one per chunk: scattered at once (tcp's receiver
        # saw both; the others' sender said so once both were DONE).
        wait_until(lambda: all(torch.equal(n.p_layers[0][p].view(torch.uint8), n.d_layers[0][d].view(torch.uint8))
                               for p, d in zip(p_blocks, d_blocks)))
        last.layer(1)
        last.forward_done()
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.num_bytes == ld.num_bytes == 4 * PAGE and s.pieces == 2
        assert s.first_byte_at < s.last_chunk_at < s.computed_at, s  # bytes flew before the last chunk began
        n.assert_moved(p_blocks, d_blocks)
        assert ld.early_layers >= 1, ld
        assert n.pool_full()
    finally:
        n.close()


def gated_relay(target_port: int) -> tuple[socket.socket, threading.Event]:
    """A TCP relay to ``target_port`` that moves bytes only while its gate is set."""
    srv = socket.create_server(("127.0.0.1", 0))
    gate = threading.Event()
    gate.set()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", target_port))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pump, args=(a, b), kwargs={"gate": gate}, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, gate


@pytest.mark.parametrize("post_layers", [False, True], ids=["a batch per layer", "posted"])
def test_a_preempted_handoff_stops_reading_its_blocks_before_the_forward_and_the_decode_recomputes(post_layers):
    """vLLM frees a preempted request's blocks, and the step's forward may write them: the
    worker abandons the hand-off first (``KVSender.abandon``, on vLLM's thread). No batch starts
    after that (posted: no layer is posted, ``LayerPosts.seal``), and it returns only once the
    batch in flight (held in a relay on the data plane) stopped reading; the hand-off fails
    naming the preemption, the decode recomputes, and the pool is full again."""
    cfg = make_cfg("tcp", pool_mib=4, data_s=5)
    cfg = msgspec.structs.replace(cfg, transport=msgspec.structs.replace(cfg.transport, post_layers=post_layers))
    srv, gate = gated_relay(cfg.decode[0].data_port)
    data = msgspec.to_builtins(cfg)
    data["decode"][0]["data_advertise"] = f"127.0.0.1:{srv.getsockname()[1]}"
    n = Node(config_from_dict(data, source="test"))
    submitted, sent = [], []  # batches submitted (the first: the warm-up's); posted layers the stream sent
    t = n.sender.transport
    real_submit, real_prepare = t.submit, t.prepare_layers

    def submit(*args, **kwargs):
        handle = real_submit(*args, **kwargs)
        submitted.append(handle)
        return handle

    def prepare(*args, **kwargs):
        posts = real_prepare(*args, **kwargs)
        submitted.append(posts.handle)
        stream, layer_of = posts._stream, {id(plan): layer for layer, plan in posts._plans.items()}
        real_run = stream._run

        def run(handle, src, plan, *rest):
            sent.append(layer_of.get(id(plan)))
            real_run(handle, src, plan, *rest)
        stream._run = run
        return posts
    t.submit, t.prepare_layers = submit, prepare
    try:
        n.handoff("warm", [1], [2], num_tokens=BLOCK)  # the data connection through the relay is open
        assert all(r.ok for r in sum(n.results(1, 1), []))
        gate.clear()
        p_blocks = list(range(4, 20))
        marks = layered(n, "pre", p_blocks, list(range(20, 36)), len(p_blocks) * BLOCK)
        if post_layers:
            wait_until(lambda: len(submitted) == 2)  # prepared: the marks post from now on
        marks.layer(0)
        wait_until(lambda: len(submitted) == 2 and any(s.busy is submitted[1] for s in t._peers[1].streams))
        # (layer 0's 1 MiB is on its way, held in the relay)
        pieces = layered.last_pieces
        out: list[bool] = []
        abandon = threading.Thread(target=lambda: out.append(n.sender.abandon("pre", pieces, "request preempted")))
        abandon.start()
        abandon.join(0.5)
        assert abandon.is_alive(), "abandon returned while a batch still read the blocks"
        marks.layer(1)  # the next layer is computed: it must not go
        time.sleep(0.1)
        assert len(submitted) == 2 and sent == ([0] if post_layers else []), (submitted, sent)
        gate.set()
        abandon.join(5)
        assert out == [True]
        assert submitted[-1].state.terminal and submitted[-1].t_done > 0
        (s,), (ld,) = n.results(1, 1, timeout_s=10)
        assert not s.ok and "preempted" in s.error, s.error
        assert not ld.ok
        assert len(submitted) == 2 and sent == ([0] if post_layers else []), (submitted, sent)
        assert n.pool_full()
    finally:
        gate.set()
        n.close()
        srv.close()


def test_a_forward_that_stops_fails_the_handoff_naming_data_s_and_the_decode_recomputes():
    n = Node(make_cfg(data_s=0.5))
    try:
        marks = layered(n, "stall", [5, 6], [11, 12], 2 * BLOCK)
        marks.layer(0)  # layer 1 never comes
        (s,), (ld,) = n.results(1, 1, timeout_s=10)
        assert not s.ok and "timeouts.data_s" in s.error, s.error
        assert not ld.ok
        assert n.pool_full()
    finally:
        n.close()


def test_an_aborted_request_stops_its_layered_handoff_and_the_pages_return():
    n = Node(make_cfg())
    try:
        marks = layered(n, "gone", [5, 6], [11, 12], 2 * BLOCK)
        marks.layer(0)
        wait_until(lambda: n.in_pool(0, [5, 6]))
        t0 = time.monotonic()
        n.sender.unreserve("gone")  # the scheduler's unreserve of an aborted request
        (s,), (ld,) = n.results(1, 1, timeout_s=5)
        assert not s.ok and not ld.ok
        assert time.monotonic() - t0 < 2.0
        assert n.pool_full()
    finally:
        n.close()


def test_between_chunks_the_senders_loop_sleeps_and_the_decodes_end_wakes_it(monkeypatch):
    """A chunked prompt's first piece landed and the next chunk computes: nothing of the hand-off
    is in flight, and the sender's thread sleeps (it looked four times a second, on the prefill's
    core). The decode side ending the hand-off then (Ended) wakes it at once: the hand-off fails
    and the pages return without waiting for its next look."""
    from lmcache_pd.node import layered as layered_module
    from tests.threads_os import wakeups

    n = Node(make_cfg(heartbeat_s=20, peer_s=60, lease_s=60, transfer_s=30, data_s=30))
    try:
        p_blocks, d_blocks = [5, 6, 30, 31], [11, 12, 40, 41]
        first_chunk(n, "idle", p_blocks, d_blocks, 3 * BLOCK + 3, split=2)
        wait_until(lambda: n.in_pool(1, p_blocks[:2]))
        sender = next(t for t in threading.enumerate() if t.name.startswith("pd-sender"))
        time.sleep(0.3)
        before = wakeups(sender)
        time.sleep(2.0)
        assert wakeups(sender) - before <= 4, wakeups(sender) - before
        monkeypatch.setattr(layered_module, "_IDLE_S", 30.0)  # its next look is far: only a wake-up ends it soon
        time.sleep(1.1)  # (the loop's current wait, of the old length, ends first)
        t0 = time.monotonic()
        n.receiver.discard("idle", "the decode's request was aborted")
        (s,), (ld,) = n.results(1, 1, timeout_s=10)
        assert not s.ok and "aborted" in s.error and not ld.ok
        assert time.monotonic() - t0 < 1.0
        assert n.pool_full()
    finally:
        n.close()


def test_an_earlier_chunks_marks_wake_the_senders_loop_once_its_last_layer_is_computed():
    """An earlier chunk's piece goes whole once every layer is marked: its other marks must not
    wake the sender's loop (on CPU that loop runs on the forward's core; on a GPU it would take
    the GIL from the thread launching the forward). The last chunk's marks each wake it (a
    transport that cannot post layers sends each as it is marked); the forward's end wakes it."""
    from lmcache_pd.node.layered import Pieces

    woken: list[str] = []
    pieces = Pieces()
    pieces.bind(lambda: woken.append("x"))
    earlier, last = LayerMarks(32), LayerMarks(32)
    pieces.add((1, 2), 0, earlier, final=False)
    assert len(woken) == 1  # a new piece
    for i in range(31):
        earlier.layer(i)
    assert len(woken) == 1, "an earlier chunk's incomplete marks woke the loop"
    earlier.layer(31)
    assert len(woken) == 2 and len(earlier.since(0)) == 32
    earlier.layer(31)  # (layers sharing one KV tensor mark it twice: no wake-up)
    earlier.forward_done()
    assert len(woken) == 3
    pieces.add((1, 2, 3), 2, last, final=True)
    for i in range(32):
        last.layer(i)
    assert len(woken) == 4 + 32


def test_per_layer_plans_add_up_to_the_whole_plan():
    kv = KVLayout(num_layers=3, num_blocks=10, block_bytes=64, block_stride=64, layer_offsets=(0, 640, 1280))
    pool = PoolLayout(3, 8, 64)
    whole = plan_cache_to_pool(kv, pool, blocks=[2, 3, 7], pages=[0, 1, 5])
    parts = [plan_cache_to_pool(kv, pool, blocks=[2, 3, 7], pages=[0, 1, 5], layers=[i]) for i in range(3)]

    def bytes_of(plans) -> set[tuple[int, int]]:  # (src byte, dst byte) pairs the plans copy
        return {(s + k, d + k) for p in plans for s, d, n in zip(p.src_offsets, p.dst_offsets, p.lengths)
                for k in range(0, int(n), 16)}
    assert bytes_of(parts) == bytes_of([whole])
    assert sum(p.nbytes for p in parts) == whole.nbytes
    assert set(np.concatenate([p.dst_offsets for p in parts[1:2]]) // (8 * 64)) == {1}  # layer 1's pool rows only
    with pytest.raises(ValueError, match="layer out of range"):
        plan_cache_to_pool(kv, pool, blocks=[2], pages=[0], layers=[3])


def test_the_forwards_end_in_the_timeline_is_the_gpus_when_the_forward_has_a_stamp():
    """On a GPU the host returns from the forward before its kernels end: the sender waits for
    the stamp the worker recorded after them and takes its time as the prompt computed."""
    n = Node(make_cfg("loopback"))
    try:
        marks = layered(n, "stamped", [5, 6], [11, 12], 2 * BLOCK)
        for i in range(LAYERS):
            marks.layer(i)
        host_end = time.time()
        marks.forward_done(host_end, LateStamp(0.2, host_end + 0.123))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert abs(s.computed_at - (host_end + 0.123)) < 1e-6, s.computed_at - host_end
    finally:
        n.close()


def test_a_whole_handoff_sent_as_the_forward_ends_starts_its_timeline_at_the_gpus_end_too():
    """A hand-off under ``transport.layerwise_min_mib`` goes whole when the forward returns (the
    worker's wait_for_save), before its kernels end: its timeline starts at the stamp after them,
    as a layered one's, so that both say the same of the transfer exposed after the prompt."""
    n = Node(make_cfg("loopback"))
    try:
        host_end = time.time()
        spec = SendSpec("p-w", Handoff("w", "decode-0", 2 * BLOCK, "d" * 32), (5, 6), computed_at=host_end)
        n.sender.submit(spec, computed=LateStamp(0.2, host_end + 0.123))
        n.receiver.submit_load(LoadSpec("d-w", Handoff("w", "prefill-0", 2 * BLOCK, "d" * 32), (11, 12)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert abs(s.computed_at - (host_end + 0.123)) < 1e-6, s.computed_at - host_end
    finally:
        n.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU stamps untested here")
def test_on_a_gpu_the_timeline_has_the_gpus_forward_end_and_bytes():
    """The host marks every layer and ends the forward at once, while the GPU still spins
    through two 20 ms layers: with host times all of the transfer would look exposed (first
    byte at the submit, forward end at the host's); from the GPU's stamps (cuda_ipc's batches,
    the worker's forward end) layer 0 moved before the forward ended, so most of it is hidden."""
    from lmcache_pd.device_clock import clock_for

    n = Node(make_cfg("cuda_ipc"))
    try:
        n.handoff("warm", [1], [5], num_tokens=BLOCK)
        assert all(r.ok for r in sum(n.results(1, 1), []))
        cycles = spin_cycles(20_000)
        forward = torch.cuda.Stream()
        marks = layered(n, "gpu", [5, 6], [11, 12], 2 * BLOCK)
        clock = clock_for(torch.device("cuda", 0))
        begun = clock.stamp(forward)
        host_end = time.time()
        with torch.cuda.stream(forward):
            for i in range(LAYERS):
                torch.cuda._sleep(cycles)
                ready = torch.cuda.Event(enable_timing=True)
                ready.record(forward)
                marks.layer(i, ready)
        stamp = clock.stamp(forward)
        marks.forward_done(host_end, stamp)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        n.assert_moved([5, 6], [11, 12])
        span = begun.seconds_to(stamp)  # the forward as the GPU timed it
        layer0 = begun.event.elapsed_time(marks.since(0)[0][1]) / 1e3
        assert span > 0.004 and layer0 > 0.002, (span, layer0)
        assert s.computed_at - host_end >= 0.8 * span, (s.computed_at - host_end, span)
        assert s.first_byte_at - host_end >= 0.8 * layer0, (s.first_byte_at - host_end, layer0)  # after layer 0
        assert hidden_fraction(s) > 0.9, (s.first_byte_at - host_end, s.last_byte_at - host_end, s.computed_at - host_end)
    finally:
        n.close()
