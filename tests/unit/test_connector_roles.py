"""The connector's scheduler-side roles, driven with vLLM's own Request and KVCacheBlocks objects.

These are the per-request decisions vLLM's engine calls many times per request; the end-to-end
tests show the whole path, these pin down the edge cases one by one.
"""

from __future__ import annotations

import time

import msgspec
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (run scripts/setup)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from lmcache_pd import protocol as P  # noqa: E402
from lmcache_pd.connector.metadata import LoadOutcome, PDWorkerMeta  # noqa: E402
from lmcache_pd.connector.scheduler_side import DecodeScheduler, PrefillScheduler  # noqa: E402
from tests.unit.nodes import make_cfg  # noqa: E402

BS = 16


def request(req_id: str, n: int, kv: dict | None) -> Request:
    sp = SamplingParams(max_tokens=8, extra_args={"kv_transfer_params": kv} if kv else None)
    return Request(req_id, list(range(10, 10 + n)), sp, None)


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks(([KVCacheBlock(i) for i in ids],))


def decode_params(n: int, tid: str = "t1") -> dict:
    return {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": tid, "num_tokens": n,
            "prompt_digest": P.prompt_digest(list(range(10, 10 + n))), "prefill_peer": "prefill-0"}


@pytest.fixture
def prefill():
    return PrefillScheduler(make_cfg(), instance="prefill-0", block_size=BS)


@pytest.fixture
def decode():
    return DecodeScheduler(make_cfg(), instance="decode-0", block_size=BS)


def test_prefill_hands_off_finished_requests_only(prefill):
    kv = {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"}
    r = request("p1", 40, kv)
    assert prefill.get_num_new_matched_tokens(r, 0) == (0, False)
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    before = time.time()
    delay, params = prefill.request_finished(r, [4, 5, 6])
    after = time.time()
    assert delay is True
    assert P.params_from_dict(params, P.DecodeParams) == P.DecodeParams(
        transfer_id="t1", num_tokens=40, prompt_digest=P.prompt_digest(list(range(10, 50))), prefill_peer="prefill-0")
    meta = prefill.build_connector_meta(SchedulerOutput.make_empty())
    assert [(s.req_id, s.block_ids, s.handoff.num_tokens) for s in meta.sends] == [("p1", (4, 5, 6), 40)]
    assert before <= meta.sends[0].computed_at <= after  # the hand-off's timeline starts when its prompt is computed
    assert prefill.build_connector_meta(SchedulerOutput.make_empty()).sends == []  # reset every step


@pytest.mark.parametrize(("status", "kv"), [
    (RequestStatus.FINISHED_ABORTED, {"do_remote_decode": True, "transfer_id": "t", "decode_peer": "decode-0"}),
    (RequestStatus.FINISHED_LENGTH_CAPPED, {"do_remote_decode": True, "transfer_id": "t", "decode_peer": "evil:1"}),
    (RequestStatus.FINISHED_LENGTH_CAPPED, {"do_remote_decode": True}),  # malformed
    (RequestStatus.FINISHED_LENGTH_CAPPED, None),  # not a P/D request
])
def test_prefill_frees_blocks_at_once_when_there_is_nothing_to_hand_off(prefill, status, kv):
    r = request("p1", 40, kv)
    r.status = status
    assert prefill.request_finished(r, [1, 2, 3]) == (False, None)
    assert prefill.build_connector_meta(SchedulerOutput.make_empty()).sends == []


def scheduled(req_id: str, computed: int, n: int, new: bool = False) -> SchedulerOutput:
    """One engine step that schedules ``n`` tokens of ``req_id`` after ``computed`` ones."""
    from types import SimpleNamespace

    so = SchedulerOutput.make_empty()
    if new:
        so.scheduled_new_reqs.append(SimpleNamespace(req_id=req_id, num_computed_tokens=computed))
    else:
        so.scheduled_cached_reqs.req_ids.append(req_id)
        so.scheduled_cached_reqs.num_computed_tokens.append(computed)
    so.num_scheduled_tokens[req_id] = n
    return so


def test_prefill_reserves_decode_pages_with_the_last_prompt_chunk_once(prefill):
    kv = {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"}
    r = request("p1", 40, kv)
    prefill.update_state_after_alloc(r, blocks([4, 5, 6]), 0)
    assert prefill.build_connector_meta(scheduled("p1", 0, 16, new=True)).reserves == []  # first chunk
    meta = prefill.build_connector_meta(scheduled("p1", 16, 24))  # the last chunk: reserve now
    assert [(x.transfer_id, x.peer, x.num_tokens, x.prompt_digest) for x in meta.reserves] == [
        ("t1", "decode-0", 40, P.prompt_digest(list(range(10, 50))))]
    # Preempted and scheduled again: the reservation stands, no second one.
    prefill.update_state_after_alloc(r, blocks([4, 5, 6]), 0)
    assert prefill.build_connector_meta(scheduled("p1", 0, 40, new=True)).reserves == []
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert prefill.request_finished(r, [4, 5, 6])[0] is True
    meta = prefill.build_connector_meta(SchedulerOutput.make_empty())
    assert [s.handoff.transfer_id for s in meta.sends] == ["t1"] and meta.unreserves == []


def test_prefill_gives_reserved_pages_back_when_the_request_ends_otherwise(prefill):
    kv = {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"}
    r = request("p1", 40, kv)
    prefill.update_state_after_alloc(r, blocks([4, 5, 6]), 0)
    prefill.build_connector_meta(scheduled("p1", 0, 40, new=True))
    r.status = RequestStatus.FINISHED_ABORTED
    assert prefill.request_finished(r, [4, 5, 6]) == (False, None)
    meta = prefill.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.sends == [] and meta.unreserves == ["t1"]
    # Aborted before its last chunk was scheduled: nothing was reserved, nothing to give back.
    r2 = request("p2", 40, {**kv, "transfer_id": "t2"})
    prefill.update_state_after_alloc(r2, blocks([7, 8, 9]), 0)
    prefill.build_connector_meta(scheduled("p2", 0, 16, new=True))
    r2.status = RequestStatus.FINISHED_ABORTED
    prefill.request_finished(r2, [7, 8, 9])
    assert prefill.build_connector_meta(SchedulerOutput.make_empty()).unreserves == []


def test_prefill_reserves_nothing_for_requests_that_are_not_hand_offs(prefill):
    for i, kv in enumerate([None, {"do_remote_decode": True, "transfer_id": "t", "decode_peer": "evil:1"}]):
        r = request(f"p{i}", 40, kv)
        prefill.update_state_after_alloc(r, blocks([1, 2, 3]), 0)
        assert prefill.build_connector_meta(scheduled(f"p{i}", 0, 40, new=True)).reserves == []


def test_decode_claims_the_prompt_and_loads_once(decode):
    r = request("d1", 40, decode_params(40))
    # Called repeatedly without side effects (vLLM may ask again when allocation fails).
    assert decode.get_num_new_matched_tokens(r, 0) == (40, True)
    assert decode.get_num_new_matched_tokens(r, 16) == (24, True)
    decode.update_state_after_alloc(r, blocks([7, 8, 9]), 40)
    meta = decode.build_connector_meta(SchedulerOutput.make_empty())
    assert [(s.req_id, s.handoff.transfer_id, s.block_ids) for s in meta.loads] == [("d1", "t1", (7, 8, 9))]
    # After the load (or a failed one), vLLM asks again: never a second load.
    assert decode.get_num_new_matched_tokens(r, 0) == (0, False)
    decode.update_state_after_alloc(r, blocks([7, 8, 9]), 0)
    assert decode.build_connector_meta(SchedulerOutput.make_empty()).loads == []


def test_decode_refuses_kv_for_another_prompt(decode):
    r = request("d1", 40, {**decode_params(40), "prompt_digest": "f" * 32})
    assert decode.get_num_new_matched_tokens(r, 0) == (0, False)
    r2 = request("d2", 39, decode_params(40))  # shorter than what the prefill computed
    assert decode.get_num_new_matched_tokens(r2, 0) == (0, False)
    r3 = Request("d3", [99, *range(11, 51)], r.sampling_params, None)  # 41 tokens, the first 40 differ
    r3.kv_transfer_params = decode_params(40)
    assert decode.get_num_new_matched_tokens(r3, 0) == (0, False)


def test_decode_continues_a_prompt_the_prefill_computed_a_prefix_of(decode):
    """proxy.first_token=prefill: the decode's prompt is the prefill's plus the token it sampled.
    The hand-off covers the prefill's 40 tokens; vLLM computes the 41st (the sampled token)."""
    r = request("d1", 41, decode_params(40))
    assert decode.get_num_new_matched_tokens(r, 0) == (40, True)
    assert decode.get_num_new_matched_tokens(r, 16) == (24, True)  # a local prefix hit of one block
    decode.update_state_after_alloc(r, blocks([7, 8, 9]), 40)
    (spec,) = decode.build_connector_meta(SchedulerOutput.make_empty()).loads
    assert (spec.handoff.num_tokens, spec.handoff.prompt_digest) == (40, P.prompt_digest(list(range(10, 50))))


def test_decode_sent_before_the_prefill_answered_loads_its_own_prompt(decode):
    """proxy.dispatch=concurrent: no token count or digest yet; the load carries the decode's own,
    for the loader to compare with what the prefill reserved pages for."""
    early = {**decode_params(40), "num_tokens": 0, "prompt_digest": ""}
    r = request("d1", 40, early)
    assert decode.get_num_new_matched_tokens(r, 0) == (40, True)
    decode.update_state_after_alloc(r, blocks([7, 8, 9]), 40)
    (spec,) = decode.build_connector_meta(SchedulerOutput.make_empty()).loads
    assert (spec.handoff.num_tokens, spec.handoff.prompt_digest) == (40, P.prompt_digest(list(range(10, 10 + 40))))
    # A late answer's parameters are still checked here: another prompt is refused before loading.
    r2 = request("d2", 39, decode_params(40, "t2"))
    assert decode.get_num_new_matched_tokens(r2, 0) == (0, False)


def test_decode_discards_pages_when_vllm_overrides_the_count(decode):
    r = request("d1", 40, decode_params(40))
    decode.update_state_after_alloc(r, blocks([]), 0)  # e.g. prompt logprobs: vLLM loads nothing
    meta = decode.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.loads == [] and meta.discards == ["t1"]


def test_decode_request_rejected_before_scheduling_frees_the_pages(decode):
    r = request("d1", 40, decode_params(40))
    r.status = RequestStatus.FINISHED_ABORTED
    assert decode.request_finished(r, []) == (False, None)
    assert decode.build_connector_meta(SchedulerOutput.make_empty()).discards == ["t1"]


def test_decode_abort_while_loading_cancels_the_load(decode):
    r = request("d1", 40, decode_params(40))
    decode.update_state_after_alloc(r, blocks([1, 2, 3]), 40)
    decode.build_connector_meta(SchedulerOutput.make_empty())
    r.status = RequestStatus.FINISHED_ABORTED
    delay, report = decode.request_finished(r, [1, 2, 3])
    assert delay is False and report["lmcache_pd"]["loaded"] is False
    assert decode.build_connector_meta(SchedulerOutput.make_empty()).cancels == ["d1"]


def test_decode_reports_the_outcome_and_prompt_tokens_it_computed(decode):
    from types import SimpleNamespace

    r = request("d1", 40, decode_params(40))
    decode.update_state_after_alloc(r, blocks([1, 2, 3]), 40)
    decode.build_connector_meta(SchedulerOutput.make_empty())
    out = SimpleNamespace(kv_connector_worker_meta=PDWorkerMeta({"d1": LoadOutcome(True, 3 * 1024, 0.01, 0.02, "")}))
    decode.update_connector_output(out)
    so = SchedulerOutput.make_empty()
    so.scheduled_cached_reqs.req_ids.append("d1")
    so.scheduled_cached_reqs.num_computed_tokens.append(39)  # vLLM recomputes the last prompt token
    so.num_scheduled_tokens["d1"] = 1
    decode.build_connector_meta(so)
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, report = decode.request_finished(r, [1, 2, 3])
    assert delay is False
    assert report["lmcache_pd"] == {"transfer_id": "t1", "loaded": True, "bytes": 3072, "transfer_s": 0.01,
                                    "wait_s": 0.02, "error": "", "prompt_tokens": 40, "prompt_tokens_computed": 1,
                                    "cache_tokens": 0}


def test_decode_marks_the_step_that_computes_a_loaded_requests_first_token_once(decode):
    from types import SimpleNamespace

    def step(*req_ids: str):
        so = SchedulerOutput.make_empty()
        for rid in req_ids:
            so.scheduled_cached_reqs.req_ids.append(rid)
            so.scheduled_cached_reqs.num_computed_tokens.append(39)
            so.num_scheduled_tokens[rid] = 1
        return decode.build_connector_meta(so)

    ok, bad = request("d1", 40, decode_params(40)), request("d2", 40, {**decode_params(40), "transfer_id": "t2"})
    for r in (ok, bad):
        decode.update_state_after_alloc(r, blocks([1, 2, 3]), 40)
    assert step().first_steps == []  # loading: nothing computes yet
    decode.update_connector_output(SimpleNamespace(kv_connector_worker_meta=PDWorkerMeta(
        {"d1": LoadOutcome(True, 3 * 1024, 0.01, 0.02, ""), "d2": LoadOutcome(False, 0, 0, 0.02, "boom")})))
    assert step().first_steps == []  # loaded, not scheduled in this step
    assert step("d1", "d2").first_steps == ["t1"]  # a failed load's first token is no hand-off's
    assert step("d1", "d2").first_steps == []  # once


def test_worker_meta_aggregates_tp_ranks():
    a = PDWorkerMeta({"r": LoadOutcome(True, 10, 0.1, 0.2, "")})
    b = PDWorkerMeta({"r": LoadOutcome(False, 10, 0.3, 0.1, "boom"), "s": LoadOutcome(True, 1, 0, 0, "")})
    m = a.aggregate(b)
    assert m.loads["r"] == LoadOutcome(False, 20, 0.3, 0.2, "boom") and m.loads["s"].ok


def test_a_failed_load_reports_its_blocks_once_and_a_good_one_none():
    # vLLM 0.24 learns of a failed load only from its blocks (get_block_ids_with_load_errors);
    # 0.32 from failed_recving. The worker keeps both, each reported once (connector/compat.py).
    import time

    from lmcache_pd.connector.metadata import PDConnectorMetadata
    from lmcache_pd.connector.worker_side import DecodeWorker
    from lmcache_pd.handoff import Handoff, LoadSpec, SendSpec
    from tests.unit.nodes import BLOCK, Node

    node = Node(make_cfg(transfer_s=1))
    worker = DecodeWorker(None, node.cfg, instance="decode-0")
    worker.receiver = node.receiver
    try:
        node.sender.submit(SendSpec("p-ok", Handoff("ok", "decode-0", 2 * BLOCK, "d" * 32), (5, 6)))
        worker.start_load_kv(PDConnectorMetadata(loads=[
            LoadSpec("d-ok", Handoff("ok", "prefill-0", 2 * BLOCK, "d" * 32), (11, 12)),
            LoadSpec("d-never", Handoff("never", "prefill-0", 3 * BLOCK, "d" * 32), (3, 4, 5))]))  # no prefill sends it
        recving: set[str] = set()
        failed: set[str] = set()
        deadline = time.monotonic() + 10
        while recving != {"d-ok", "d-never"}:
            assert time.monotonic() < deadline, recving
            _, r, f = worker.get_transfer_results(set())
            recving |= r
            failed |= f
            time.sleep(0.02)
        assert failed == {"d-never"}
        assert worker.take_failed_blocks() == {3, 4, 5}
        assert worker.take_failed_blocks() == set()
    finally:
        node.close()


def test_prefix_reuse_is_one_seam_null_when_the_cache_is_off():
    """The roles ask prefix reuse (connector/prefix.py) and never the config: with the cache off
    they hold the null seams; an injected one decides what vLLM is told and what a hand-off
    carries."""
    from lmcache_pd.connector.prefix import NoPrefixReuse, NoReceivedReuse

    cfg = make_cfg()
    assert not cfg.cache.enabled
    assert isinstance(PrefillScheduler(cfg, instance="prefill-0", block_size=BS).prefix, NoPrefixReuse)
    assert isinstance(DecodeScheduler(cfg, instance="decode-0", block_size=BS).reuse, NoReceivedReuse)

    class Stub(NoPrefixReuse):
        def matched_tokens(self, request, num_computed_tokens):
            return 32, True

        def handoff_chains(self, request):
            return (b"c1", b"c2")

    prefill = PrefillScheduler(cfg, instance="prefill-0", block_size=BS, prefix=Stub())
    r = request("p1", 40, {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"})
    assert prefill.get_num_new_matched_tokens(r, 0) == (32, True)
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    prefill.request_finished(r, [4, 5, 6])
    (send,) = prefill.build_connector_meta(SchedulerOutput.make_empty()).sends
    assert send.handoff.chains == (b"c1", b"c2")


def layered_prefill() -> PrefillScheduler:
    cfg = make_cfg()
    return PrefillScheduler(msgspec.structs.replace(cfg, transport=msgspec.structs.replace(cfg.transport, layerwise=True)),
                            instance="prefill-0", block_size=BS)


def scheduled_with_blocks(req_id: str, computed: int, n: int, block_ids: list[int], *, new: bool = False,
                          resumed: bool = False) -> SchedulerOutput:
    """``scheduled`` with the step's block ids: all of a new request's, a running one's new ones."""
    so = scheduled(req_id, computed, n, new=new)
    if new:
        so.scheduled_new_reqs[-1].block_ids = (list(block_ids),)
    else:
        so.scheduled_cached_reqs.new_block_ids.append((list(block_ids),))
        if resumed:
            so.scheduled_cached_reqs.resumed_req_ids.add(req_id)
    return so


def pieces_of(meta) -> list[tuple]:
    return [(s.req_id, s.block_ids, s.first_block, s.final, s.layered, s.handoff.transfer_id) for s in meta.sends]


def test_layerwise_sends_each_chunks_completed_blocks_as_a_piece_from_the_first_chunk_on():
    """Chunked prefill: each step's metadata carries the blocks its forward completes (a block
    the chunk leaves half written goes with the next chunk's); the last chunk's piece ends the
    hand-off. The finished request then queues no second hand-off, and vLLM keeps its blocks
    (the hand-off reads them). The workers reserve the decode pages at the first piece."""
    prefill = layered_prefill()
    kv = {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"}
    r = request("p1", 40, kv)  # 3 blocks of 16, the last one ends inside
    prefill.update_state_after_alloc(r, blocks([4, 5]), 0)
    meta = prefill.build_connector_meta(scheduled_with_blocks("p1", 0, 20, [4, 5], new=True))
    assert pieces_of(meta) == [("p1", (4,), 0, False, True, "t1")]  # block 5 is half written
    assert meta.reserves == []
    assert prefill.build_connector_meta(scheduled_with_blocks("p1", 20, 10, [])).sends == []  # no block completed
    meta = prefill.build_connector_meta(scheduled_with_blocks("p1", 30, 10, [6]))  # the last chunk
    assert pieces_of(meta) == [("p1", (4, 5, 6), 1, True, True, "t1")]
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, params = prefill.request_finished(r, [4, 5, 6])
    assert delay is True and params["transfer_id"] == "t1"
    meta = prefill.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.sends == [] and meta.unreserves == [] and meta.abandons == []


def test_a_preempted_layered_handoff_is_abandoned_before_the_forward_and_one_not_started_starts_again():
    """vLLM frees a preempted request's blocks in the step that preempts it: a hand-off with a
    piece out is given up in that step's metadata (the workers stop reading the blocks before
    its forward; the decode side recomputes), and the request, scheduled again, sends no more
    pieces. One that sent nothing yet starts again from the first block, in its new blocks."""
    prefill = layered_prefill()
    kv = {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"}
    r = request("p1", 40, kv)
    prefill.update_state_after_alloc(r, blocks([4, 5]), 0)
    assert pieces_of(prefill.build_connector_meta(scheduled_with_blocks("p1", 0, 20, [4, 5], new=True)))
    so = SchedulerOutput.make_empty()
    so.preempted_req_ids = {"p1"}
    assert prefill.build_connector_meta(so).abandons == ["t1"]
    prefill.update_state_after_alloc(r, blocks([7, 8]), 0)
    assert prefill.build_connector_meta(scheduled_with_blocks("p1", 0, 20, [7, 8], resumed=True)).sends == []
    assert prefill.build_connector_meta(scheduled_with_blocks("p1", 20, 20, [9])).sends == []
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, params = prefill.request_finished(r, [7, 8, 9])
    assert delay is True and params["transfer_id"] == "t1"  # the decode side finds it given up: recomputes
    meta = prefill.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.sends == [] and meta.abandons == []
    # Preempted before its first block was complete: nothing to give up.
    r2 = request("p2", 40, {**kv, "transfer_id": "t2"})
    prefill.update_state_after_alloc(r2, blocks([4]), 0)
    assert prefill.build_connector_meta(scheduled_with_blocks("p2", 0, 10, [4], new=True)).sends == []
    so = SchedulerOutput.make_empty()
    so.preempted_req_ids = {"p2"}
    assert prefill.build_connector_meta(so).abandons == []
    meta = prefill.build_connector_meta(scheduled_with_blocks("p2", 0, 40, [7, 8, 9], resumed=True))
    assert pieces_of(meta) == [("p2", (7, 8, 9), 0, True, True, "t2")]


@pytest.mark.parametrize("why", ["older vLLM", "transport.layerwise_chunks off"])
def test_without_preemption_news_or_with_chunks_off_the_handoff_goes_from_the_last_chunks_step(why):
    """A vLLM whose SchedulerOutput does not name preempted requests (older ones) cannot be
    told in time that a piece's blocks were freed, and ``transport.layerwise_chunks`` off asks
    for the same: the hand-off starts only in the step of the last chunk, with every block."""
    from types import SimpleNamespace

    def old(so: SchedulerOutput) -> SimpleNamespace | SchedulerOutput:
        if why != "older vLLM":
            return so
        return SimpleNamespace(scheduled_new_reqs=so.scheduled_new_reqs, scheduled_cached_reqs=so.scheduled_cached_reqs,
                               num_scheduled_tokens=so.num_scheduled_tokens)
    prefill = layered_prefill()
    if why != "older vLLM":
        t = msgspec.structs.replace(prefill.cfg.transport, layerwise_chunks=False)
        prefill = PrefillScheduler(msgspec.structs.replace(prefill.cfg, transport=t), instance="prefill-0",
                                   block_size=BS)
    r = request("p1", 40, {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"})
    prefill.update_state_after_alloc(r, blocks([4, 5]), 0)
    assert prefill.build_connector_meta(old(scheduled_with_blocks("p1", 0, 20, [4, 5], new=True))).sends == []
    meta = prefill.build_connector_meta(old(scheduled_with_blocks("p1", 20, 20, [6])))
    assert pieces_of(meta) == [("p1", (4, 5, 6), 0, True, True, "t1")]


def test_an_aborted_layered_handoff_is_stopped_and_its_blocks_kept_until_it_stopped():
    prefill = layered_prefill()
    kv = {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"}
    r = request("p1", 40, kv)
    prefill.update_state_after_alloc(r, blocks([4, 5, 6]), 0)
    assert prefill.build_connector_meta(scheduled_with_blocks("p1", 0, 40, [4, 5, 6], new=True)).sends[0].layered
    r.status = RequestStatus.FINISHED_ABORTED
    assert prefill.request_finished(r, [4, 5, 6]) == (True, None)  # the sender still reads them
    meta = prefill.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.sends == [] and meta.unreserves == ["t1"]


def test_a_layered_handoff_whose_blocks_are_not_known_goes_whole_with_its_pages_reserved():
    """Layered, but the scheduler does not know enough of the request's blocks at its last
    chunk (vLLM did not list them): no piece; the decode pages are reserved during that
    forward all the same, and the finished request's hand-off goes whole."""
    prefill = layered_prefill()
    r = request("p1", 40, {"do_remote_decode": True, "transfer_id": "t1", "decode_peer": "decode-0"})
    prefill.update_state_after_alloc(r, blocks([4, 5, 6]), 0)
    meta = prefill.build_connector_meta(scheduled_with_blocks("p1", 0, 40, [4], new=True))
    assert meta.sends == [] and [h.transfer_id for h in meta.reserves] == ["t1"]
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert prefill.request_finished(r, [4, 5, 6])[0] is True
    (send,) = prefill.build_connector_meta(SchedulerOutput.make_empty()).sends
    assert (send.block_ids, send.layered) == ((4, 5, 6), False)
