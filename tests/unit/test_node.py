"""Sender and receiver together (real zmq, real transports, in one process).

Hand-offs arrive bitwise; every failure ends in a bounded time with its cause named, and the
decode pool always comes back to full capacity.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import msgspec
import pytest
import torch
from prometheus_client import generate_latest

from lmcache_pd.errors import PeerLost
from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
from lmcache_pd.layout import blocks_for_tokens
from lmcache_pd.node.cache_io import NoCacheIO
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.timeline import DECODE_PHASES, PREFILL_PHASES, decode_phases, hidden_fraction, prefill_phases
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.node.worker_api import WorkerAPI
from tests.unit.nodes import BLOCK, CPT, LAYERS, PAGE, Node, late_forward, make_cfg


def test_handoff_is_bitwise(node):
    node.handoff("t1", [5, 6, 7, 30], [11, 12, 13, 40], num_tokens=3 * BLOCK + 5)
    (s,), (ld,) = node.results(1, 1)
    assert s.ok and ld.ok, (s.error, ld.error)
    assert s.num_bytes == ld.num_bytes == 4 * PAGE
    node.assert_moved([5, 6, 7, 30], [11, 12, 13, 40])
    assert node.pool_full()


@pytest.mark.parametrize("name", ["tcp", "loopback", "nixl", "cuda_ipc"])
def test_handoff_between_per_layer_buffers_is_bitwise(name):
    # vLLM 0.24 hands the connector one buffer per layer on both sides; the spacers between
    # them are memory that is not vLLM's, and must not change.
    from lmcache_pd import transport as transports

    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = Node(make_cfg(name), per_layer=True)
    try:
        assert len(n.sender.kv.extents) == LAYERS and len(n.receiver.kv.extents) == LAYERS
        spacers = [t.clone() for t in n._spacers]
        n.handoff("pl", [5, 6, 7, 30], [11, 12, 13, 40], num_tokens=3 * BLOCK + 5)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        n.assert_moved([5, 6, 7, 30], [11, 12, 13, 40])
        untouched = [b for b in range(48) if b not in (11, 12, 13, 40)]
        assert all(bool((t[untouched].view(torch.uint8) == 0xEE).all()) for t in n.d_layers)
        assert all(torch.equal(a, b) for a, b in zip(n._spacers, spacers))
        assert n.pool_full()
    finally:
        n.close()


@pytest.mark.parametrize("name", ["cuda_ipc", "nixl"])
def test_gpu_copy_waits_for_the_forward_that_wrote_the_blocks(name):
    # vLLM's forward may still be running on its own stream when the hand-off starts; the
    # connector passes an event recorded there, and the copy must not read the blocks before it.
    from lmcache_pd import transport as transports

    ok, why = transports.available(name)
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs CUDA and transport {name!r}: {why or 'no CUDA device'}")
    n = Node(make_cfg(name), device="cuda")
    try:
        n.handoff("warm", [1], [5], num_tokens=BLOCK)  # links the peers and builds the kernels first
        assert all(r.ok for r in sum(n.results(1, 1), []))
        # Values made beforehand: nothing in the "forward" below may block the host (a copy
        # from pageable memory would, and the hand-off would then start after the forward).
        values = [torch.randn(t[4].shape, device="cuda").to(t.dtype) for t in n.p_layers]
        torch.cuda.synchronize()
        ready = late_forward(n, (4, 9), values)
        n.sender.submit(SendSpec("p-ev", Handoff("ev", "decode-0", 2 * BLOCK, "e" * 32), (4, 9)), ready)
        n.receiver.submit_load(LoadSpec("d-ev", Handoff("ev", "prefill-0", 2 * BLOCK, "e" * 32), (1, 2)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        torch.cuda.synchronize()
        n.assert_moved([4, 9], [1, 2])
    finally:
        n.close()


@pytest.mark.parametrize("name", ["tcp", "loopback", "nixl", "cuda_ipc"])
@pytest.mark.parametrize("skip", [0, 11])
def test_streamed_handoff_is_bitwise(name, skip):
    # 1 MiB groups are 8 pages: 21 pages go as 8 + 8 + 5; with a local prefix hit of 11 blocks
    # the decode needs only the tail, from the middle of the second group on.
    from lmcache_pd import transport as transports

    ok, why = transports.available(name)
    if not ok:
        pytest.skip(f"transport {name!r} unavailable here: {why}")
    n = Node(make_cfg(name, pool_mib=4, group_mib=1))
    try:
        p_blocks = [int(b) for b in torch.randperm(40)[:21]]
        d_blocks = [int(b) for b in torch.randperm(48)[:21]]
        n.handoff("t1", p_blocks, d_blocks[skip:], num_tokens=20 * BLOCK + 3)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert s.num_bytes == 21 * PAGE and ld.num_bytes == (21 - skip) * PAGE
        n.assert_moved(p_blocks[skip:], d_blocks[skip:])
        assert n.pool_full()
    finally:
        n.close()


def test_streamed_groups_are_scattered_while_the_rest_is_in_flight():
    # Each loopback batch takes 0.3 s, so the loader has scattered a group long before the next lands.
    n = Node(make_cfg("loopback", options={"delay_s": 0.3}, pool_mib=4, group_mib=1))
    try:
        n.handoff("t1", list(range(1, 21)), list(range(21, 41)), num_tokens=20 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert ld.groups == 3, "the decode side waited for the whole hand-off instead of streaming it"
        n.assert_moved(list(range(1, 21)), list(range(21, 41)))
        assert n.pool_full()
    finally:
        n.close()


def test_scatter_is_planned_while_the_pages_fly():
    # The loopback transfer takes 0.3 s: the loader has the pages' ids long before they land.
    n = Node(make_cfg("loopback", options={"delay_s": 0.3}, pool_mib=4, group_mib=0))
    try:
        n.receiver.submit_load(LoadSpec("d-t1", Handoff("t1", "prefill-0", 20 * BLOCK, "d" * 32), tuple(range(21, 41))))
        n.sender.submit(SendSpec("p-t1", Handoff("t1", "decode-0", 20 * BLOCK, "d" * 32), tuple(range(1, 21))))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert ld.planned_ahead, "the scatter was planned only after the pages had landed"
        n.assert_moved(list(range(1, 21)), list(range(21, 41)))
        assert n.pool_full()
    finally:
        n.close()


def test_failure_mid_stream_ends_both_sides_and_pages_return():
    # The second group fails after the first has landed (and may be mid-scatter on the decode side).
    n = Node(make_cfg("loopback", options={"delay_s": 0.2, "fail_every": 2}, pool_mib=4, group_mib=1))
    try:
        n.handoff("t1", list(range(1, 21)), list(range(21, 41)), num_tokens=20 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert not s.ok and "scripted failure" in s.error
        assert not ld.ok and "canceled by prefill" in ld.error
        assert n.pool_full()
        n.sender.transport.options = msgspec.structs.replace(n.sender.transport.options, fail_every=0)
        n.handoff("t2", [1, 2], [3, 4], num_tokens=2 * BLOCK)  # and the pair keeps serving
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok
    finally:
        n.close()


def test_decode_with_a_local_prefix_hit_loads_only_the_tail(node):
    before = node.d_layers[0][11].clone()
    node.handoff("t1", [5, 6, 7], [12, 13], num_tokens=3 * BLOCK)  # decode already has block 0 (its 11)
    (s,), (ld,) = node.results(1, 1)
    assert s.ok and ld.ok
    node.assert_moved([6, 7], [12, 13])
    assert torch.equal(node.d_layers[0][11].view(torch.uint8), before.view(torch.uint8))


def test_load_may_be_asked_before_the_prefill_sends(node):
    node.receiver.submit_load(LoadSpec("d-early", Handoff("early", "prefill-0", BLOCK, "x" * 32), (3,)))
    time.sleep(0.3)
    node.sender.submit(SendSpec("p-early", Handoff("early", "decode-0", BLOCK, "x" * 32), (9,)))
    (s,), (ld,) = node.results(1, 1)
    assert s.ok and ld.ok
    node.assert_moved([9], [3])


def test_many_concurrent_handoffs_larger_than_the_pool_do_not_deadlock(node):
    # Pool: 8 pages. Six hand-offs of 5 pages each: they must queue and all complete.
    for k in range(6):
        node.handoff(f"t{k}", list(range(1 + 5 * k, 6 + 5 * k)), list(range(1 + 5 * k, 6 + 5 * k)), 5 * BLOCK)
    sends, loads = node.results(6, 6, timeout_s=30)
    assert all(s.ok for s in sends) and all(ld.ok for ld in loads), [s.error for s in sends]
    node.assert_moved(list(range(1, 31)), list(range(1, 31)))
    assert node.pool_full()


def test_request_larger_than_the_pool_fails_fast_on_both_sides(node):
    t0 = time.monotonic()
    node.handoff("huge", list(range(1, 10)), list(range(1, 10)), 9 * BLOCK)  # 9 pages > 8
    (s,), (ld,) = node.results(1, 1)
    assert not s.ok and "pool.size_mib" in s.error
    assert not ld.ok and time.monotonic() - t0 < node.cfg.timeouts.transfer_s
    assert node.pool_full()


def test_prompt_mismatch_is_refused_and_pages_return(node):
    node.handoff("t1", [5], [5], BLOCK, digest="a" * 32, load_digest="b" * 32)
    (s,), (ld,) = node.results(1, 1)
    assert not ld.ok and "different prompt" in ld.error
    # The loader checks as soon as the pages are granted, so the prefill side is usually told
    # (Ended) before it transfers, or its batch is refused; if its transfer won the race, it
    # completed into pages nobody reads.
    assert s.ok or "ended the hand-off" in s.error or "refused" in s.error, s.error
    assert torch.all(node.d_layers[0][5].view(torch.uint8) == 0xEE)
    assert node.pool_full()


def test_no_prefill_ever_comes_times_out_naming_the_field():
    n = Node(make_cfg(transfer_s=0.5))
    try:
        t0 = time.monotonic()
        n.receiver.submit_load(LoadSpec("d-x", Handoff("never", "prefill-0", BLOCK, "d" * 32), (1,)))
        _, (ld,) = n.results(0, 1)
        assert not ld.ok and "timeouts.transfer_s" in ld.error and 0.45 < time.monotonic() - t0 < 2
        # A prefill arriving after the decode gave up is refused: no pages are taken for nobody.
        n.sender.submit(SendSpec("p-x", Handoff("never", "decode-0", BLOCK, "d" * 32), (1,)))
        (s,), _ = n.results(1, 0)
        assert not s.ok and n.pool_full()
    finally:
        n.close()


def test_decode_not_running_fails_within_the_handshake_deadline_then_fast():
    n = Node(make_cfg(handshake_s=0.5), start_receiver=False)
    try:
        t0 = time.monotonic()
        n.sender.submit(SendSpec("p-1", Handoff("t1", "decode-0", BLOCK, "d" * 32), (1,)))
        (s,), _ = n.results(1, 0)
        assert not s.ok and "timeouts.handshake_s" in s.error and time.monotonic() - t0 < 2
        t1 = time.monotonic()
        n.sender.submit(SendSpec("p-2", Handoff("t2", "decode-0", BLOCK, "d" * 32), (1,)))
        (s2,), _ = n.results(1, 0)
        assert not s2.ok and "down" in s2.error and time.monotonic() - t1 < 0.3
    finally:
        n.close()


def test_unknown_decode_peer_fails_at_once():
    n = Node(make_cfg())
    try:
        n.sender.submit(SendSpec("p-1", Handoff("t1", "decode-7", BLOCK, "d" * 32), (1,)))
        (s,), _ = n.results(1, 0, timeout_s=2)
        assert not s.ok and "decode-7" in s.error
    finally:
        n.close()


def test_incompatible_peer_is_refused_naming_the_field():
    n = Node(make_cfg(), compat=msgspec.structs.replace(CPT, dtype="torch.float16/auto"))
    try:
        n.handoff("t1", [1], [1], BLOCK)
        (s,), _ = n.results(1, 0)
        assert not s.ok and "dtype" in s.error
        assert n.receiver.server.stats.refused_handshakes == 1
    finally:
        n.close()


def test_transport_failure_cancels_and_the_decode_recomputes_at_once():
    n = Node(make_cfg("loopback", options={"fail_every": 1}))
    try:
        t0 = time.monotonic()
        n.handoff("t1", [1, 2], [1, 2], 2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert not s.ok and "scripted failure" in s.error
        assert not ld.ok and "canceled by prefill" in ld.error and time.monotonic() - t0 < 1.5
        assert n.pool_full()
    finally:
        n.close()


def test_slow_transport_passes_its_deadline_and_pages_return():
    n = Node(make_cfg("loopback", options={"delay_s": 1.0}, data_s=0.3))
    try:
        n.handoff("t1", [1], [1], BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert not s.ok and "timeouts.data_s" in s.error and not ld.ok
        assert n.pool_full(3)
    finally:
        n.close()


def test_restarted_decode_is_re_handshaken():
    cfg = make_cfg()
    n = Node(cfg)
    try:
        n.handoff("t1", [1], [1], BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok
        old = n.receiver
        old.close()
        n.receiver = KVReceiver(Worker("decode-0", 0, CPT), NodeConfig.of(cfg), kv=old.kv, kv_buffer=old.kv_buffer)
        n.receiver.start()
        assert n.receiver.worker.incarnation != old.worker.incarnation
        n.handoff("t2", [2, 3], [2, 3], 2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        n.assert_moved([2, 3], [2, 3])
    finally:
        n.close()


def test_blocks_for_a_partial_last_block():
    assert blocks_for_tokens(3 * BLOCK + 5, BLOCK) == 4


def test_handoff_log_records_both_ends(tmp_path):
    cfg = msgspec.structs.replace(make_cfg(), handoff_log=str(tmp_path / "h-{instance}-{rank}.jsonl"))
    n = Node(cfg)
    try:
        n.handoff("logged", [1, 2], [3, 4], 2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok
        sent = [json.loads(x) for x in (tmp_path / "h-prefill-0-0.jsonl").read_text().splitlines()]
        got = [json.loads(x) for x in (tmp_path / "h-decode-0-0.jsonl").read_text().splitlines()]
        assert [(r["role"], r["transfer_id"], r["ok"], r["num_bytes"]) for r in sent] == \
            [("prefill", "logged", True, 2 * PAGE)]
        assert [(r["role"], r["transfer_id"], r["ok"], r["num_bytes"]) for r in got] == \
            [("decode", "logged", True, 2 * PAGE)]
    finally:
        n.close()


def test_every_handoff_records_its_timeline_in_order_and_in_the_metrics():
    """Both ends mark each phase on one clock, in order; each worker's /metrics shows the phases
    (node/timeline.py) of the hand-offs that succeeded."""
    n = Node(make_cfg())
    try:
        computed = time.time()
        n.sender.submit(SendSpec("p-t", Handoff("t", "decode-0", 2 * BLOCK, "d" * 32), (1, 2), computed_at=computed))
        n.receiver.submit_load(LoadSpec("d-t", Handoff("t", "prefill-0", 2 * BLOCK, "d" * 32), (3, 4)))
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok
        assert computed == s.computed_at <= s.started_at <= s.granted_at <= s.first_byte_at <= s.last_byte_at \
            <= s.done_at
        assert ld.submitted_at <= ld.ready_at <= ld.done_at
        # tcp's receiver saw every layer land in every page: the load ended on that, before
        # TransferDone, and before the sender heard its last batch acknowledged (its last byte's mark).
        assert ld.signaled and s.first_byte_at <= ld.ready_at
        assert set(prefill_phases(s)) == set(PREFILL_PHASES) - {"layers"}  # (a layered hand-off's)
        assert set(decode_phases(ld)) == set(DECODE_PHASES) - {"first_token"}  # (marked steps later)
        assert hidden_fraction(s) == 0.0  # sent after its prompt was computed: nothing hidden
        n.receiver.first_token("t", ld.done_at + 0.02)  # the decode computed the request's first token
        n.receiver.first_token("t", ld.done_at + 0.03)  # marked once: a second mark is no hand-off's
        n.receiver.first_token("never-loaded", time.time())
        for role, collector, phases in (("prefill", n.sender.timeline.collector, set(PREFILL_PHASES) - {"layers"}),
                                        ("decode", n.receiver.timeline.collector, DECODE_PHASES)):
            text = generate_latest(WorkerAPI(NoCacheIO(), instance="x", rank=0, host="127.0.0.1", port=0,
                                             collectors=(collector,)).registry).decode()
            for phase in phases:
                assert f'lmcache_pd_handoff_phase_seconds_count{{phase="{phase}",role="{role}"}} 1.0' in text, text
        text = generate_latest(WorkerAPI(NoCacheIO(), instance="x", rank=0, host="127.0.0.1", port=0,
                                         collectors=(n.receiver.timeline.collector,)).registry).decode()
        assert 'lmcache_pd_handoff_phase_seconds_bucket{le="0.025",phase="first_token",role="decode"} 1.0' in text
        assert 'lmcache_pd_handoff_phase_seconds_bucket{le="0.01",phase="first_token",role="decode"} 0.0' in text
    finally:
        n.close()


def test_the_hidden_fraction_is_the_transfer_run_before_the_prompt_was_computed():
    def marks(first: float, last: float, computed: float) -> SimpleNamespace:
        return SimpleNamespace(first_byte_at=first, last_byte_at=last, computed_at=computed)
    assert hidden_fraction(marks(10.0, 12.0, 13.0)) == 1.0  # all of it under the prefill's compute
    assert hidden_fraction(marks(10.0, 12.0, 11.5)) == 0.75
    assert hidden_fraction(marks(10.0, 12.0, 9.0)) == 0.0
    assert hidden_fraction(marks(10.0, 12.0, 0.0)) is None  # not known


def test_node_objects_read_a_worker_identity_and_the_node_config_only():
    cfg = make_cfg()
    node_cfg = NodeConfig.of(cfg)
    d = cfg.decode[0]
    assert [name for name, _ in node_cfg.decodes] == ["decode-0"]  # prefills are never addressed
    assert node_cfg.control_endpoint("decode-0", 2) == f"tcp://{d.host}:{d.control_port + 2}"
    with pytest.raises(PeerLost, match="'prefill-0' is not a decode instance"):
        node_cfg.listener("prefill-0")
    a, b = Worker("prefill-0", 1, CPT), Worker("prefill-0", 1, CPT)
    assert a.incarnation != b.incarnation and a.identity == f"prefill-0/1/{a.incarnation}"
    with pytest.raises(AttributeError):
        a.rank = 2  # frozen: a node object's identity cannot drift
    with pytest.raises(PeerLost, match="'prefill-0' is not a decode instance"):
        KVReceiver(a, node_cfg, kv=None, kv_buffer=None)  # a receiver only runs on a decode instance


def test_a_decode_advertises_the_data_address_its_config_names_and_prefills_connect_there():
    # decode-0 listens on its data_port; prefill workers reach it through a relay on another
    # port (data_advertise): the hand-off's bytes go through the relay.
    import socket
    import threading

    from lmcache_pd.config import config_from_dict
    from tests.integration.relay import pump

    cfg = make_cfg("tcp")
    relay = socket.create_server(("127.0.0.1", 0))
    relayed: list[int] = []

    def serve() -> None:
        conn, _ = relay.accept()
        relayed.append(1)
        up = socket.create_connection(("127.0.0.1", cfg.decode[0].data_port))
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    data = msgspec.to_builtins(cfg)
    data["decode"][0]["data_advertise"] = f"127.0.0.1:{relay.getsockname()[1]}"
    n = Node(config_from_dict(data, source="test"))
    try:
        n.handoff("adv", [1, 2], [3, 4], num_tokens=2 * BLOCK)
        (s,), (ld,) = n.results(1, 1)
        assert s.ok and ld.ok, (s.error, ld.error)
        assert relayed, "the prefill connected to the listening port, not to the advertised one"
        n.assert_moved([1, 2], [3, 4])
    finally:
        n.close()
        relay.close()


def test_a_load_from_a_prefill_whose_handshake_was_refused_ends_at_once_naming_why():
    # timeouts.transfer_s is 30 s: a load that waited for KV that cannot come would end only then
    # (every request of an incompatible P/D pair held 30 s before the decode recomputed it).
    n = Node(make_cfg(transfer_s=30), compat=msgspec.structs.replace(CPT, dtype="torch.float16/auto"))
    try:
        t0 = time.monotonic()
        n.handoff("t1", [1], [1], BLOCK)  # the decode's request waits while the prefill is refused
        (s,), (ld,) = n.results(1, 1)
        assert not s.ok and "dtype" in s.error
        assert not ld.ok and "refused prefill prefill-0's handshake" in ld.error and "dtype" in ld.error, ld.error
        assert time.monotonic() - t0 < 5
        # The decode's request of the next one comes after the refusal (proxy.dispatch=sequential).
        t1 = time.monotonic()
        n.receiver.submit_load(LoadSpec("d-t2", Handoff("t2", "prefill-0", BLOCK, "d" * 32), (2,)))
        _, (ld2,) = n.results(0, 1)
        assert not ld2.ok and "refused prefill prefill-0's handshake" in ld2.error and time.monotonic() - t1 < 2
        # Another prefill's loads still wait for their KV: only the refused peer's end early.
        n.receiver.submit_load(LoadSpec("d-t3", Handoff("t3", "prefill-1", BLOCK, "d" * 32), (3,)))
        time.sleep(1.0)
        assert n.receiver.drain() == []
        assert n.pool_full()
    finally:
        n.close()
