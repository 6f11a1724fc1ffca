"""The prefill worker driven as vLLM drives it (bind -> save_kv_layer per layer -> wait_for_save,
per step), over a real sender and receiver (tcp, one process): which hand-offs go layer by layer
and which whole, a chunked prompt's pieces, and what a preemption or an abort before the last
chunk leaves (blocks reported free to vLLM, the decode side told).

The scheduler's decisions that produce these steps are in test_connector_roles.py.
"""

from __future__ import annotations

import time

import msgspec
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (run scripts/setup)")

from tests.unit.nodes import make_cfg  # noqa: E402


def prefill_worker(*, layerwise_min_mib: int, transport: str = "tcp", options: dict | None = None, **settings):
    """A PrefillWorker over the sender of a Node (real sender and receiver, tcp unless said), with
    the Node's layers named as vLLM names them; the Node's pool is 2 MiB. ``settings``: more of
    ``transport``'s section."""
    from lmcache_pd.connector.worker_side import PrefillWorker
    from tests.unit.nodes import LAYERS, Node

    cfg = make_cfg(transport, options=options, pool_mib=2, layerwise=True)
    cfg = msgspec.structs.replace(cfg, transport=msgspec.structs.replace(cfg.transport,
                                                                       layerwise_min_mib=layerwise_min_mib, **settings))
    node = Node(cfg)
    worker = PrefillWorker(None, cfg, instance="prefill-0")
    worker.sender = node.sender
    worker._layer_of = {f"model.layers.{i}.attn": i for i in range(LAYERS)}
    return node, worker


def test_a_small_layered_handoff_goes_whole_at_the_forwards_end_and_a_large_one_layer_by_layer():
    """``transport.layerwise_min_mib``: a hand-off under it, whose last chunk this forward
    computes, goes whole once the forward ended (``wait_for_save``: one batch instead of one per
    layer); one at or over it goes layer by layer as vLLM's forward marks its layers. Both land
    bitwise (real sender and receiver, tcp)."""
    import dataclasses

    from lmcache_pd.connector.metadata import PDConnectorMetadata
    from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
    from tests.unit.nodes import BLOCK, LAYERS, PAGE

    node, worker = prefill_worker(layerwise_min_mib=1)
    n_large = 2**20 // PAGE  # exactly 1 MiB: layered
    small = Handoff("small", "decode-0", 2 * BLOCK, "d" * 32)
    large = Handoff("large", "decode-0", n_large * BLOCK, "d" * 32)
    p_small, d_small = [3, 4], [20, 21]
    p_large, d_large = list(range(10, 10 + n_large)), list(range(30, 30 + n_large))
    try:
        for h, blocks_ in ((small, d_small), (large, d_large)):
            node.receiver.submit_load(LoadSpec(f"d-{h.transfer_id}", dataclasses.replace(h, peer="prefill-0"),
                                               tuple(blocks_)))
        meta = PDConnectorMetadata(sends=[SendSpec("p-small", small, tuple(p_small), layered=True),
                                          SendSpec("p-large", large, tuple(p_large), layered=True)],
                                   reserves=[small, large])
        for i in range(LAYERS):  # the forward over the last chunk: its first hook starts the step
            worker.save_kv_layer(f"model.layers.{i}.attn", meta)
        sends: list = []
        loads: list = []
        deadline = time.monotonic() + 15
        while not loads:  # every layer marked: the large one lands while the forward still runs
            assert time.monotonic() < deadline, sends
            sends += node.sender.drain()
            loads += node.receiver.drain()
            time.sleep(0.005)
        assert [r.transfer_id for r in loads] == ["large"], "the small one went before the forward ended"
        # The large one's record waits for the forward's end: its timeline starts there.
        time.sleep(0.1)
        assert sends + node.sender.drain() == []
        end = time.time()
        worker.wait_for_save()  # the forward ended
        more, loads_ = node.results(2, 1)
        by_id = {s.transfer_id: s for s in sends + more}
        assert by_id["large"].ok and by_id["large"].layered
        assert by_id["large"].last_byte_at < end <= by_id["large"].computed_at, by_id["large"]
        assert by_id["small"].ok and not by_id["small"].layered
        assert by_id["small"].computed_at > 0  # its timeline starts at the forward's end
        assert all(r.ok for r in loads + loads_), loads + loads_
        node.assert_moved(p_small, d_small)
        node.assert_moved(p_large, d_large)
    finally:
        node.close()


def _one_step(worker, node, spec, handoff) -> tuple:
    """One forward over ``spec`` (its layers marked, then its end), as vLLM runs it; returns the
    hand-off's SendResult and LoadResult once both ended, and whether it had gone before the
    forward's end."""
    from lmcache_pd.connector.metadata import PDConnectorMetadata
    from tests.unit.nodes import LAYERS

    meta = PDConnectorMetadata(sends=[spec], reserves=[handoff])
    for i in range(LAYERS):
        worker.save_kv_layer(f"model.layers.{i}.attn", meta)
    deadline = time.monotonic() + 0.5
    early: list = []
    while not early and time.monotonic() < deadline:  # a layered one lands while the forward "runs"
        early += node.receiver.drain()
        time.sleep(0.005)
    worker.wait_for_save()
    (s,), loads = node.results(1, 0 if early else 1)
    return s, (early or loads)[0], bool(early)


@pytest.mark.parametrize("layerwise_on_shared_gpu", [False, True])
def test_a_handoff_to_a_decode_whose_pool_is_on_our_gpu_goes_whole_at_the_forwards_end(layerwise_on_shared_gpu):
    """``transport.layerwise_on_shared_gpu`` off (the default): once the link to the decode says
    its pool is on our GPU (``Transport.shares_device``; loopback says so when told to), a layered
    hand-off over ``layerwise_min_mib`` goes whole as the forward ends (a device-local copy has
    little to hide, and per-layer work costs the forward more). The first one, before any link,
    goes layer by layer, and so does one whose decode already waits for it (``decode_sent``: the
    proxy sent its request at once; the last layer lands before the forward's tail ends). On:
    every one goes layer by layer. All land bitwise."""
    import dataclasses

    from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
    from tests.unit.nodes import BLOCK

    node, worker = prefill_worker(layerwise_min_mib=0, transport="loopback", options={"shares_device": True},
                                  layerwise_on_shared_gpu=layerwise_on_shared_gpu)
    try:
        assert not node.sender.shares_gpu("decode-0")  # no link yet
        assert not node.sender.shares_gpu("decode-9")  # no such decode
        cases = [([3, 4, 5], [20, 21, 22], False), ([6, 7, 8], [23, 24, 25], False), ([9, 10, 11], [26, 27, 28], True)]
        for i, (p_blocks, d_blocks, decode_sent) in enumerate(cases):
            h = Handoff(f"h{i}", "decode-0", 3 * BLOCK, "d" * 32, decode_sent=decode_sent)
            node.receiver.submit_load(LoadSpec(f"d-{i}", dataclasses.replace(h, peer="prefill-0"), tuple(d_blocks)))
            s, ld, early = _one_step(worker, node, SendSpec(f"p-{i}", h, tuple(p_blocks), layered=True), h)
            assert s.ok and ld.ok, (s.error, ld.error)
            node.assert_moved(p_blocks, d_blocks)
            layered = i == 0 or decode_sent or layerwise_on_shared_gpu
            assert s.layered is layered and early is layered, (i, s)
        assert node.sender.shares_gpu("decode-0")  # the link says so now
    finally:
        node.close()


def test_the_worker_extends_a_chunked_handoff_piece_by_piece_and_abandons_a_preempted_one_before_its_forward():
    """The prefill worker, driven as vLLM drives it (bind -> one save_kv_layer per layer ->
    wait_for_save, per step): a chunked hand-off's first piece lands during its own step, the
    last chunk's piece ends it, bitwise; a hand-off whose request the next step preempts is
    given up in that step's bind, before its forward, and its blocks are reported free to vLLM
    once vLLM says the request finished (real sender and receiver, tcp)."""
    import dataclasses

    from lmcache_pd.connector.metadata import PDConnectorMetadata
    from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
    from tests.unit.nodes import BLOCK, LAYERS, PAGE

    node, worker = prefill_worker(layerwise_min_mib=0)

    def step(meta: PDConnectorMetadata) -> None:
        worker.before_forward(meta)
        for i in range(LAYERS):
            worker.save_kv_layer(f"model.layers.{i}.attn", meta)
        worker.wait_for_save()

    chunked = Handoff("chunked", "decode-0", 3 * BLOCK, "d" * 32)
    pre = Handoff("pre", "decode-0", 3 * BLOCK, "d" * 32)
    gone = Handoff("gone", "decode-0", 3 * BLOCK, "d" * 32)  # aborted after its first chunk
    p_blocks, d_blocks = [3, 4, 5], [20, 21, 22]
    try:
        for h, blocks_ in ((chunked, d_blocks), (pre, [30, 31, 32])):
            node.receiver.submit_load(LoadSpec(f"d-{h.transfer_id}", dataclasses.replace(h, peer="prefill-0"),
                                               tuple(blocks_)))
        step(PDConnectorMetadata(sends=[SendSpec("p-chunked", chunked, (3, 4), layered=True, final=False),
                                        SendSpec("p-pre", pre, (6, 7), layered=True, final=False),
                                        SendSpec("p-gone", gone, (9,), layered=True, final=False)]))
        deadline = time.monotonic() + 10
        while node.sender.transport.stats.batches < 3:  # the three first pieces landed (one batch each)
            assert time.monotonic() < deadline, node.sender.transport.stats
            time.sleep(0.005)
        step(PDConnectorMetadata(sends=[SendSpec("p-chunked", chunked, tuple(p_blocks), layered=True,
                                                 first_block=2)], abandons=["pre"]))
        worker.start_load_kv(PDConnectorMetadata(unreserves=["gone"]))  # the scheduler's word of its abort
        sends: list = []
        real_drain = node.sender.drain
        node.sender.drain = lambda: (out := real_drain(), sends.extend(out))[0]  # what the worker drains
        deadline = time.monotonic() + 15
        while len(sends) < 3:
            assert time.monotonic() < deadline, sends
            assert worker.get_transfer_results(set())[0] == set()  # not before vLLM says they finished
            time.sleep(0.005)
        _, loads = node.results(0, 2)
        by_id = {s.transfer_id: s for s in sends}
        assert by_id["chunked"].ok and by_id["chunked"].pieces == 2 and by_id["chunked"].num_bytes == 3 * PAGE
        assert not by_id["pre"].ok and "preempted" in by_id["pre"].error
        assert not by_id["gone"].ok
        assert {ld.req_id: ld.ok for ld in loads} == {"d-chunked": True, "d-pre": False}
        node.assert_moved(p_blocks, d_blocks)
        assert worker._pieces == {}
        assert node.sender.status()["handoffs"]["abandoned_total"] == 1  # the preempted one, not the aborted one
        sending, _, _ = worker.get_transfer_results({"p-chunked", "p-pre", "p-gone"})
        assert sending == {"p-chunked", "p-pre", "p-gone"}
    finally:
        node.close()


def test_a_small_chunked_handoff_given_up_before_its_last_chunk_still_frees_its_blocks():
    """A hand-off under ``layerwise_min_mib`` starts only with its last chunk, but vLLM keeps its
    blocks from the first piece on (the scheduler says delay_free): aborted, or preempted,
    before its last chunk, the worker still reports the request in finished_sending once vLLM
    says it finished (vLLM asserts it holds every request reported), and the decode side hears
    at once that the preempted one will not come."""
    import dataclasses

    from lmcache_pd.connector.metadata import PDConnectorMetadata
    from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
    from tests.unit.nodes import BLOCK

    node, worker = prefill_worker(layerwise_min_mib=1)
    aborted = Handoff("aborted", "decode-0", 3 * BLOCK, "d" * 32)
    preempted = Handoff("preempted", "decode-0", 3 * BLOCK, "d" * 32)
    try:
        node.receiver.submit_load(LoadSpec("d-preempted", dataclasses.replace(preempted, peer="prefill-0"),
                                           (30, 31, 32)))
        meta = PDConnectorMetadata(sends=[SendSpec("p-aborted", aborted, (3,), layered=True, final=False),
                                          SendSpec("p-preempted", preempted, (6,), layered=True, final=False)])
        worker.before_forward(meta)
        worker.wait_for_save()
        assert worker.get_transfer_results(set())[0] == set()
        t0 = time.monotonic()
        worker.before_forward(PDConnectorMetadata(abandons=["preempted"]))
        worker.start_load_kv(PDConnectorMetadata(unreserves=["aborted"]))
        assert worker.get_transfer_results({"p-aborted", "p-preempted"})[0] == {"p-aborted", "p-preempted"}
        _, (ld,) = node.results(0, 1, timeout_s=5)
        assert not ld.ok and "preempted" in ld.error and time.monotonic() - t0 < 2.0, ld
        assert worker._pieces == {} and node.sender.transport.stats.batches == 0
        assert node.sender.status()["handoffs"]["abandoned_total"] == 1
    finally:
        node.close()
