"""Scheduler-side roles of the connector (EngineCore process; never touches the network).

Prefill (kv_producer), per request carrying ``PrefillParams``:
  1. the request computes its prompt normally and finishes (max_tokens=1); the step that
     computes its last prompt chunk also carries its Handoff, so that the workers allocate
     the decode pages while that forward runs. With ``transport.layerwise`` every step that
     completes blocks of the prompt carries them instead (a layered piece, SendSpec): the
     workers send each layer of them as the forward computes it, chunk after chunk; a
     preemption gives such a hand-off up before the step's forward (``abandons``);
  2. ``request_finished`` returns delay_free=True and the ``DecodeParams`` the proxy forwards to
     the decode instance, and queues a SendSpec for the workers (next step's metadata);
  3. the workers report ``finished_sending`` when the hand-off ended (either way): blocks freed.
     A request that ends any other way after its reservation gets an unreserve instead.
Decode (kv_consumer), per request carrying ``DecodeParams``:
  1. ``get_num_new_matched_tokens`` claims the prompt (minus local prefix hits) as external,
     loaded asynchronously: vLLM parks the request in WAITING_FOR_REMOTE_KVS. Parameters from
     the prefill's answer are checked against the prompt here; early ones (the proxy's
     ``dispatch=concurrent``: sent before the prefill answered) only by the loader. The
     prefill's prompt may be a prefix of this one: with ``proxy.first_token=prefill`` the
     proxy appends the token the prefill sampled, and the decode computes only that token;
  2. ``update_state_after_alloc`` queues a LoadSpec with the request's new blocks (once: a
     failed load is recomputed by vLLM, never loaded twice);
  3. the workers report ``finished_recving`` (and ``failed_recving`` on failure -> vLLM
     recomputes, kv_load_failure_policy=recompute); vLLM recomputes only the last prompt token;
  4. ``request_finished`` returns what happened (bytes, times, prompt tokens computed here) in
     the response's ``kv_transfer_params.lmcache_pd``.
With decode-side reuse on (``cache.decode_skip``), both roles also hash each prompt's full
chunks: the prefill side sends the chain hashes in its Allocate, and the decode side, which
copies the chunks its own tiers hold instead of receiving them, verifies them against its own;
a decode request that ends normally saves its prompt's new chunks (blocks held until saved).
The roles ask prefix reuse through one seam each (prefix.py), never the config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache_pd import protocol as P
from lmcache_pd._types import ReqId, TransferId
from lmcache_pd.config import PDConfig
from lmcache_pd.connector.compat import resumed_requests
from lmcache_pd.connector.metadata import LoadOutcome, PDConnectorMetadata, PDWorkerMeta
from lmcache_pd.connector.prefix import PrefixReuse, ReceivedReuse, prefix_reuse, received_reuse
from lmcache_pd.handoff import CacheSaveSpec, Handoff, LoadSpec, SendSpec

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class SchedulerRole:
    """Defaults: a request that is not a P/D hand-off passes through untouched."""

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        return PDConnectorMetadata()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        pass

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]:
        """External tokens of a request by where they come from (a cache tier's name, or "p2p")."""
        return {}


def scheduled_spans(so: SchedulerOutput) -> dict[ReqId, tuple[int, int]]:
    """Per request scheduled this step: (tokens computed before it, tokens it computes)."""
    computed = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
    cached = so.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    return {req_id: (computed[req_id], n) for req_id, n in so.num_scheduled_tokens.items() if req_id in computed}


def track_blocks(so: SchedulerOutput, blocks: dict[ReqId, list[int]]) -> None:
    """Bring each tracked request's block ids (``blocks``, edited in place) up to this step:
    a new request's are all in its NewRequestData, a running one's new blocks extend its list
    (or replace it, resumed after a preemption). One KV cache group (the connector's model)."""
    for new in so.scheduled_new_reqs:
        if new.req_id in blocks:
            blocks[new.req_id] = list(new.block_ids[0]) if new.block_ids else []
    cached = so.scheduled_cached_reqs
    resumed = resumed_requests(cached) if cached.req_ids else set()
    for req_id, ids in zip(cached.req_ids, cached.new_block_ids):
        if req_id not in blocks or ids is None:
            continue
        if req_id in resumed:
            blocks[req_id] = list(ids[0])
        else:
            blocks[req_id].extend(ids[0])


@dataclass
class _PrefillReq:
    handoff: Handoff
    reserved: bool = False
    layered: bool = False
    """Its hand-off is under way layer by layer (a piece went in some step's metadata)."""
    sent_blocks: int = 0
    """Layered: the leading blocks the pieces so far cover."""
    abandoned: bool = False
    """Layered: preempted with pieces out; the hand-off was given up (the decode side recomputes)."""


class PrefillScheduler(SchedulerRole):
    def __init__(self, cfg: PDConfig, *, instance: str, block_size: int, prefix: PrefixReuse | None = None):
        """``prefix``: prefix reuse (prefix.py; default: what ``cfg.cache`` asks for)."""
        self.cfg = cfg
        self.instance = instance
        self.block_size = block_size
        self.prefix = prefix if prefix is not None else prefix_reuse(cfg, instance=instance, block_size=block_size)
        self._decode_peers = {d.name for d in cfg.decode}
        self._reqs: dict[ReqId, _PrefillReq] = {}
        self.layerwise = cfg.transport.layerwise
        self._blocks: dict[ReqId, list[int]] = {}  # with layerwise: each tracked request's blocks so far
        self._sends: list[SendSpec] = []
        self._reserves: list[Handoff] = []
        self._unreserves: list[TransferId] = []
        self._abandons: list[TransferId] = []

    def _params(self, request: Request) -> P.PrefillParams | None:
        params = P.params_from_dict(request.kv_transfer_params, P.PrefillParams)
        if params is None or not params.do_remote_decode:
            return None
        if params.decode_peer not in self._decode_peers:
            log.warning("request %s names unknown decode peer %r: no hand-off", request.request_id,
                        params.decode_peer)
            return None
        return params

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.prefix.matched_tokens(request, num_computed_tokens)

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]:
        return self.prefix.hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.prefix.after_alloc(request, blocks, num_external_tokens)
        # Called when vLLM schedules the request (again, after a preemption): track it once.
        if request.request_id in self._reqs or request.prompt_token_ids is None:
            return
        params = self._params(request)
        if params is not None:
            self._reqs[request.request_id] = self._track(request, params)
            if self.layerwise:
                self._blocks[request.request_id] = []

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        if self._reqs:
            so = scheduler_output
            # vLLMs that name the step's preempted requests let a hand-off go chunk by chunk:
            # a preemption frees the blocks its pieces read, and the workers must hear of it
            # before that step's forward (older vLLMs: the last chunk's step only).
            chunks = self.layerwise and self.cfg.transport.layerwise_chunks and hasattr(so, "preempted_req_ids")
            for req_id in getattr(so, "preempted_req_ids", None) or ():
                self._preempted(req_id)
            if self._blocks:
                track_blocks(so, self._blocks)
            for req_id, (start, n) in scheduled_spans(so).items():
                r = self._reqs.get(req_id)
                if r is None or r.abandoned:
                    continue
                last = start + n >= r.handoff.num_tokens
                if self.layerwise and (last or chunks):
                    self._send_piece(req_id, r, start + n, last)
                if last and not r.reserved:  # it goes whole: its pages are reserved during this forward
                    r.reserved = True
                    self._reserves.append(r.handoff)
        meta = PDConnectorMetadata(sends=self._sends, reserves=self._reserves, unreserves=self._unreserves,
                                   abandons=self._abandons)
        self._sends, self._reserves, self._unreserves, self._abandons = [], [], [], []
        meta.cache_loads, meta.cache_saves, meta.cache_releases = self.prefix.take()
        return meta

    def _send_piece(self, req_id: ReqId, r: _PrefillReq, computed: int, last: bool) -> None:
        """With ``transport.layerwise``: the blocks this step's forward completes go as it
        computes them (the workers reserve the decode pages at the first piece; an earlier
        chunk's piece goes in one batch after its forward, the last chunk's layer by layer:
        node/layered.py). A block the chunk leaves half written goes with the next chunk's
        piece; the last chunk's piece ends the hand-off. Without its blocks known (too few), a
        hand-off not yet under way goes whole once the request finished."""
        blocks = self._blocks.get(req_id)
        end = -(-r.handoff.num_tokens // self.block_size) if last else computed // self.block_size
        if blocks is None or len(blocks) < end or (end <= r.sent_blocks and not last):
            return
        r.layered = r.reserved = True
        self._sends.append(SendSpec(req_id, r.handoff, tuple(blocks[:end]), layered=True,
                                    first_block=r.sent_blocks, final=last))
        r.sent_blocks = end
        if last:
            self._blocks.pop(req_id, None)

    def _preempted(self, req_id: ReqId) -> None:
        """vLLM preempted the request in this step and freed its blocks: a layered hand-off under
        way is given up before this step's forward reuses them (its pieces cannot be resent:
        the decode side refuses a transfer id twice), and the decode side recomputes. One that
        sent nothing yet starts again from the first block when the request is scheduled again."""
        r = self._reqs.get(req_id)
        if r is None or r.abandoned:
            return
        if r.layered:
            r.abandoned = True
            self._abandons.append(r.handoff.transfer_id)
            self._blocks.pop(req_id, None)
        r.sent_blocks = 0

    def _track(self, request: Request, params: P.PrefillParams) -> _PrefillReq:
        assert request.prompt_token_ids is not None
        return _PrefillReq(Handoff(params.transfer_id, params.decode_peer, request.num_prompt_tokens,
                                   P.prompt_digest(request.prompt_token_ids), self.prefix.handoff_chains(request),
                                   request.cache_salt, params.decode_sent))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        r = self._reqs.pop(request.request_id, None)
        self._blocks.pop(request.request_id, None)
        out = self._hand_off(request, block_ids, r)
        if out is None and r is not None and r.reserved:
            self._unreserves.append(r.handoff.transfer_id)  # stops a layered hand-off under way, too
        # The workers report the request in finished_sending once the hand-off and the save
        # (both, if both) are done with its blocks; a layered hand-off reads them already.
        saving = self.prefix.on_finished(request, block_ids)
        return out is not None or saving or (r is not None and r.layered), out

    def _hand_off(self, request: Request, block_ids: list[int], r: _PrefillReq | None) -> dict[str, Any] | None:
        """Queue the hand-off of a finished request; returns the DecodeParams for the proxy."""
        from vllm.v1.request import RequestStatus

        if r is None:  # never seen scheduled (update_state_after_alloc tracks every hand-off)
            params = self._params(request)
            if params is None or request.prompt_token_ids is None:
                return None
            r = self._track(request, params)
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return None  # aborted or errored: nothing to hand off, free the blocks now
        h = r.handoff
        if len(block_ids) * self.block_size < h.num_tokens:
            return None
        if r.abandoned:  # preempted mid-way: the decode side learnt it was given up, and recomputes
            log.info("request %s was preempted during its layered hand-off %s: the decode side recomputes it",
                     request.request_id, h.transfer_id)
        elif not r.layered:  # a layered one is under way since the step that computed its first chunk
            self._sends.append(SendSpec(request.request_id, h, tuple(block_ids), computed_at=time.time()))
        out = P.DecodeParams(transfer_id=h.transfer_id, num_tokens=h.num_tokens, prompt_digest=h.prompt_digest,
                             prefill_peer=self.instance)
        return {f: getattr(out, f) for f in out.__struct_fields__}


@dataclass
class _DecodeReq:
    transfer_id: str
    num_prompt_tokens: int
    loading: bool = False
    outcome: LoadOutcome | None = None
    prompt_tokens_computed: int = 0
    chains: tuple[bytes, ...] = ()
    """The received prompt's chain hashes (decode-side reuse): its save needs them again."""
    first_step: bool = False
    """Its first step after the load (the one that computes its first token) was marked."""


class DecodeScheduler(SchedulerRole):
    def __init__(self, cfg: PDConfig, *, instance: str, block_size: int, reuse: ReceivedReuse | None = None):
        """``reuse``: decode-side reuse of received prompts (prefix.py; default: what ``cfg.cache`` asks for)."""
        self.cfg = cfg
        self.instance = instance
        self.block_size = block_size
        self.reuse = reuse if reuse is not None else received_reuse(cfg, block_size=block_size)
        self._reqs: dict[ReqId, _DecodeReq] = {}
        self._digests: dict[ReqId, str] = {}
        self._loads: list[LoadSpec] = []
        self._cancels: list[ReqId] = []
        self._discards: list[str] = []
        self._saves: list[CacheSaveSpec] = []

    def _params(self, request: Request) -> P.DecodeParams | None:
        params = P.params_from_dict(request.kv_transfer_params, P.DecodeParams)
        if params is None or not params.do_remote_prefill or request.request_id in self._reqs:
            return None  # not ours, or already attempted (a failed load is recomputed, not retried)
        return params

    def _digest(self, request: Request, num_tokens: int) -> str:
        """Digest of the prompt's first ``num_tokens`` (the same count for every call of a request)."""
        assert request.prompt_token_ids is not None
        digest = self._digests.get(request.request_id)
        if digest is None:  # vLLM asks about a waiting request at every step: hash each prompt once
            digest = self._digests[request.request_id] = P.prompt_digest(request.prompt_token_ids[:num_tokens])
        return digest

    def _handed(self, request: Request, params: P.DecodeParams) -> int:
        """Leading prompt tokens whose KV the hand-off brings; 0: it does not match this prompt.

        The prefill's prompt is this one or a prefix of it: with ``proxy.first_token=prefill``
        the proxy appends the token the prefill sampled, which this instance computes (as the
        first step of a colocated decode would). Early parameters (``dispatch=concurrent``) do
        not say yet: the whole prompt is claimed, and the loader checks it."""
        if request.prompt_token_ids is None:
            return 0
        if params.early:
            return request.num_prompt_tokens
        n = params.num_tokens
        if not 0 < n <= request.num_prompt_tokens or self._digest(request, n) != params.prompt_digest:
            return 0
        return n

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = self._params(request)
        if params is None:
            return 0, False
        n = self._handed(request, params) - num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]:
        return {"p2p": num_external_tokens} if num_external_tokens else {}

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = self._params(request)
        if params is None:
            return
        handed = self._handed(request, params)
        digest = self._digest(request, handed) if handed else ""
        self._digests.pop(request.request_id, None)
        req = _DecodeReq(params.transfer_id, request.num_prompt_tokens)
        self._reqs[request.request_id] = req
        if num_external_tokens <= 0 or not handed:
            # vLLM overrode our count (e.g. prompt logprobs) or the prompt differs: free the pages now.
            self._discards.append(params.transfer_id)
            return
        req.loading = True
        # The loader compares this decode's own prompt (count, digest) with the reservation's.
        handoff = Handoff(params.transfer_id, params.prefill_peer, handed, digest,
                          self.reuse.chains(request, handed), request.cache_salt)
        req.chains = handoff.chains
        self._loads.append(LoadSpec(request.request_id, handoff, tuple(blocks.get_unhashed_block_ids())))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        first_steps = self._count_prompt_compute(scheduler_output)
        meta = PDConnectorMetadata(loads=self._loads, cancels=self._cancels, discards=self._discards,
                                   cache_saves=self._saves, first_steps=first_steps)
        self._loads, self._cancels, self._discards, self._saves = [], [], [], []
        return meta

    def _count_prompt_compute(self, so: SchedulerOutput) -> list[str]:
        """Record how many prompt tokens vLLM schedules for each hand-off request on this instance.

        This is vLLM's own scheduling decision (``num_scheduled_tokens``), which its prompt-token
        metrics do not show: they count the recomputed last token as transferred.
        Returns the transfer ids of the loaded requests scheduled for the first time since their
        load ended: this step computes their first token.
        """
        if not self._reqs:  # called every engine step: nothing to count without hand-offs
            return []
        first: list[str] = []
        for req_id, (start, n_sched) in scheduled_spans(so).items():
            req = self._reqs.get(req_id)
            if req is not None:
                req.prompt_tokens_computed += max(0, min(start + n_sched, req.num_prompt_tokens) - start)
                if req.outcome is not None and req.outcome.ok and not req.first_step:
                    req.first_step = True
                    first.append(req.transfer_id)
        return first

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, PDWorkerMeta):
            for req_id, outcome in meta.loads.items():
                req = self._reqs.get(req_id)
                if req is not None:
                    req.outcome, req.loading = outcome, False

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req = self._reqs.pop(request.request_id, None)
        self._digests.pop(request.request_id, None)
        if req is None:
            params = P.params_from_dict(request.kv_transfer_params, P.DecodeParams)
            if params is not None and params.do_remote_prefill:
                # Rejected or aborted before it was scheduled: the pages will never be read.
                self._discards.append(params.transfer_id)
            return False, None
        if req.loading:
            self._cancels.append(request.request_id)  # aborted while waiting for its KV
        o = req.outcome
        saving = self._save(request, block_ids, req)
        report = {
            "transfer_id": req.transfer_id,
            "loaded": bool(o and o.ok),
            "bytes": o.num_bytes if o else 0,
            "transfer_s": o.transfer_s if o else 0.0,
            "wait_s": o.waited_s if o else 0.0,
            "error": o.error if o else "",
            "prompt_tokens": req.num_prompt_tokens,
            "prompt_tokens_computed": req.prompt_tokens_computed,
            "cache_tokens": o.cache_tokens if o else 0,
        }
        # With a save queued, vLLM keeps the blocks until the worker reports it in finished_sending.
        return saving, {"lmcache_pd": report}

    def _save(self, request: Request, block_ids: list[int], req: _DecodeReq) -> bool:
        """Queue the save of the prompt's chunks into this instance's tiers (for the next turn's
        hand-off to skip them). Only after a normal end: then every prompt block holds valid KV
        (loaded, or recomputed after a failed load); an aborted request's may not."""
        from vllm.v1.request import RequestStatus

        if req.outcome is None or request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                                          RequestStatus.FINISHED_STOPPED):
            return False
        save = self.reuse.save(request, block_ids, req.chains)
        if save is not None:
            self._saves.append(save)
        return save is not None
