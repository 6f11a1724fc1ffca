"""Worker-side roles of the connector (one per vLLM worker process, i.e. per TP rank).

Prefill: ``register_kv_caches`` starts a KVSender over vLLM's KV buffer; each step's
``start_load_kv`` hands it the step's reservations (pages allocated while the forward runs)
and the new SendSpecs; ``get_finished`` reports ended hand-offs as
``finished_sending`` (vLLM then frees the blocks). Nothing here waits on the network.
Decode: ``register_kv_caches`` starts a KVReceiver (pool, control server, transport);
``start_load_kv`` submits LoadSpecs; ``get_transfer_results`` reports every submitted load in
``finished_recving`` exactly once, failed ones also in ``failed_recving`` (vLLM recomputes).
With ``cache.enabled`` both roles run a CacheIO (tiers, lookups, loads, saves) and, with a
``cache_port``, its HTTP control API; a request whose blocks a save still reads is reported
in ``finished_sending`` once the save has copied them (as a prefill's hand-off is).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from prometheus_client.registry import Collector

from lmcache_pd import protocol as P
from lmcache_pd._types import ReqId, TransferId
from lmcache_pd.config import PDConfig, check_exposure, keyring
from lmcache_pd.connector.kv_describe import describe_kv, layer_indices
from lmcache_pd.connector.metadata import LoadOutcome, PDConnectorMetadata, PDWorkerMeta
from lmcache_pd.device_clock import clock_for
from lmcache_pd.handoff import CacheSaveSpec, Handoff, SendSpec, lookup_hold
from lmcache_pd.layout import KVLayout, blocks_for_tokens
from lmcache_pd.node.cache_io import CacheIO, NoCacheIO
from lmcache_pd.node.layered import LayerMarks, Pieces
from lmcache_pd.node.receiver import KVReceiver
from lmcache_pd.node.sender import KVSender
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.node.worker_api import WorkerAPI

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)


class WorkerRole:
    """Defaults: no-ops (the role of a scheduler-side connector, which has no worker)."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        pass

    def start_load_kv(self, meta: PDConnectorMetadata) -> None:
        pass

    def get_transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        return set(), set(), set()

    def build_worker_meta(self) -> PDWorkerMeta | None:
        return None

    def before_forward(self, meta: PDConnectorMetadata) -> None:
        """vLLM bound the step's metadata: its forward is about to start."""

    def save_kv_layer(self, layer_name: str, meta: PDConnectorMetadata) -> None:
        """vLLM's forward has written this layer's KV for the step (called after each attention;
        ``meta``: the step's metadata)."""

    def wait_for_save(self) -> None:
        """vLLM's forward of the step has ended."""

    def take_failed_blocks(self) -> set[int]:
        """Blocks of the loads that failed since the last call (how vLLM 0.24 learns of a failed
        load, connector/compat.py); empty on roles that load nothing."""
        return set()

    def shutdown(self) -> None:
        pass


class _PDWorker(WorkerRole):
    def __init__(self, vllm_config: VllmConfig, cfg: PDConfig, *, instance: str):
        self.vllm_config = vllm_config
        self.cfg = cfg
        self.instance = instance
        self.tp_rank = _tp_rank()
        self.keys = keyring(cfg)
        check_exposure(cfg, self.keys, instance)  # before any port is bound
        self.cache_io: CacheIO | NoCacheIO = NoCacheIO()  # the real one once started, if cache.enabled
        self.api: WorkerAPI | None = None
        self.users = _BlockUsers()
        self._stream_logged = False
        self._load_blocks: dict[ReqId, tuple[int, ...]] = {}  # blocks each submitted load fills
        self._failed_blocks: set[int] = set()

    def _loading(self, req_id: ReqId, block_ids: tuple[int, ...]) -> None:
        self._load_blocks[req_id] = block_ids

    def _loaded(self, req_id: ReqId, ok: bool) -> None:
        blocks = self._load_blocks.pop(req_id, ())
        if not ok:
            self._failed_blocks.update(blocks)

    def take_failed_blocks(self) -> set[int]:
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    def describe(self, kv_caches: dict[str, torch.Tensor]) -> tuple[KVLayout, torch.Tensor, P.CompatInfo]:
        model = self.cfg.model.served_name or self.cfg.model.path
        return describe_kv(self.vllm_config, kv_caches, transport=self.cfg.transport.name, model=model,
                           tp_rank=self.tp_rank)

    def _start_cache(self, layout: KVLayout, buffer: torch.Tensor, compat: P.CompatInfo) -> None:
        if not self.cfg.cache.enabled:
            return
        self.cache_io = CacheIO(self.cfg.cache, instance=self.instance, rank=self.tp_rank,
                                compat=msgspec.structs.asdict(compat), kv=layout, kv_buffer=buffer,
                                block_size=compat.block_size, record_key=self.keys.records_key)
        self.cache_io.start()

    def _start_api(self) -> None:
        """The worker's HTTP API (hand-off state, metrics, the cache's control API), if it has a port."""
        inst = self.cfg.instance(self.instance)
        if inst.cache_port is not None:
            self.api = WorkerAPI(self.cache_io, instance=self.instance,
                                 rank=self.tp_rank, host=inst.host,
                                 port=inst.cache_port + self.tp_rank, keys=self.keys, status=self.status,
                                 collectors=self._collectors())
            self.api.start()

    def status(self) -> dict[str, Any]:
        """What /pd/stats shows: this worker's hand-off path (sections of numbers)."""
        return {"blocks": {"held_requests": self.users.held}}

    def _collectors(self) -> tuple[Collector, ...]:
        """More for /metrics: the hand-off timeline's histograms, once the role's node exists."""
        return ()

    def _cache_tiers(self) -> str:
        return self.cache_io.tiers

    def _submit_saves(self, saves: list[CacheSaveSpec], ready: torch.cuda.Event | None) -> None:
        for save in saves:
            self.users.add(save.req_id)
            self.cache_io.submit_save(save, ready)

    def _ready_event(self, buffer: torch.Tensor) -> torch.cuda.Event | None:
        """An event after the work queued so far on vLLM's stream (the forwards that wrote the
        blocks): our copies are ordered after it without blocking the forward loop."""
        if not buffer.is_cuda:
            return None
        stream = torch.cuda.current_stream(buffer.device)
        if not self._stream_logged:  # which stream vLLM's forward runs on (docs/transports.md)
            self._stream_logged = True
            log.info("worker %d: vLLM's forward stream is %s (the default stream: %s)", self.tp_rank, stream,
                     stream == torch.cuda.default_stream(buffer.device))
        ready = torch.cuda.Event()
        ready.record(stream)
        return ready

    def _stop_cache(self) -> None:
        if self.api is not None:
            self.api.close()
        self.cache_io.close()


class _BlockUsers:
    """Requests whose vLLM blocks a hand-off or a save still reads (vLLM keeps them: delay_free).

    A request goes into ``finished_sending`` once every use ended and vLLM has told us it
    finished (its contract); only ours are remembered, or the sets would grow with every request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # vLLM's thread changes it, the worker API reads it
        self._uses: collections.Counter[ReqId] = collections.Counter()
        self._released: set[ReqId] = set()  # every use ended
        self._finished: set[ReqId] = set()  # of those, the ones vLLM told us have finished

    def add(self, req_id: ReqId) -> None:
        with self._lock:
            self._uses[req_id] += 1

    @property
    def held(self) -> int:
        """Requests whose blocks vLLM keeps for us now (in use, or used and not yet reported)."""
        with self._lock:
            return len(self._uses.keys() | self._released)

    def end(self, req_id: ReqId) -> None:
        with self._lock:
            self._uses[req_id] -= 1
            if self._uses[req_id] <= 0:
                del self._uses[req_id]
                self._released.add(req_id)

    def sending(self, finished_req_ids: set[str]) -> set[str]:
        with self._lock:
            self._finished |= {r for r in finished_req_ids if r in self._uses or r in self._released}
            done = self._released & self._finished
            self._released -= done
            self._finished -= done
            return done


class PrefillWorker(_PDWorker):
    def __init__(self, vllm_config: VllmConfig, cfg: PDConfig, *, instance: str):
        super().__init__(vllm_config, cfg, instance=instance)
        self.sender: KVSender | None = None
        self._layer_of: dict[str, int] = {}
        self._forward: list[LayerMarks] = []
        """Layered pieces whose layers this step's forward computes (vLLM's thread only)."""
        self._pieces: dict[TransferId, tuple[ReqId, Handoff, Pieces | None]] = {}
        """Layered hand-offs whose last chunk is still to come, from their first piece on (None:
        one going whole, ``_whole``, which starts only with its last chunk); vLLM keeps their
        blocks for us from then on (vLLM's thread only)."""
        self._at_end: list[SendSpec] = []
        """Hand-offs going whole (``_whole``) whose last chunk this step's forward computes: they
        go once it ended (vLLM's thread only)."""
        self._begun: PDConnectorMetadata | None = None
        """The step whose reservations and layered hand-offs have started."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layer_of = layer_indices(kv_caches)
        layout, buffer, compat = self.describe(kv_caches)
        self.sender = KVSender(Worker(self.instance, self.tp_rank, compat), NodeConfig.of(self.cfg),
                               kv=layout, kv_buffer=buffer, keys=self.keys)
        self.sender.start()
        self._start_cache(layout, buffer, compat)
        self._start_api()
        log.info("prefill worker %d: %d layers in %d buffer(s), page %d B, transport %s, cache %s", self.tp_rank,
                 layout.num_layers, len(layout.extents) or 1, layout.page_bytes, self.cfg.transport.name,
                 self._cache_tiers())

    def before_forward(self, meta: PDConnectorMetadata) -> None:
        """Before the forward: the preempted requests' blocks may be written by it, so their
        layered hand-offs stop reading them first (a wait only while a batch of theirs flies)."""
        if self.sender is None:
            return
        for tid in meta.abandons:
            self._give_up(tid, "request preempted: its blocks were freed")
        self._begin(meta)

    def _give_up(self, tid: TransferId, why: str) -> None:
        """End a layered hand-off before its last chunk: one under way stops reading the blocks
        before this returns (its failed result ends its use of them); one not started yet ends
        its use now, and the decode side hears it will not come (it recomputes at once)."""
        assert self.sender is not None
        entry = self._pieces.pop(tid, None)
        if entry is None:
            return
        req_id, handoff, pieces = entry
        if pieces is None:
            self.sender.give_up(handoff, why)
            self.users.end(req_id)
        elif not self.sender.abandon(tid, pieces, why):
            log.error("hand-off %s of request %s still read its blocks after timeouts.data_s", tid, req_id)

    def _begin(self, meta: PDConnectorMetadata) -> None:
        """Once per step, before its forward (``bind_connector_metadata``; at the latest at its
        first layer's ``save_kv_layer``): reserve the decode pages of the hand-offs whose last
        chunk this forward computes, and start or extend the layered ones with this forward's
        piece."""
        if self._begun is meta or self.sender is None:
            return
        self._begun = meta
        for r in meta.reserves:
            self.sender.reserve(r)
        for spec in meta.sends:
            if spec.layered:
                self._piece(spec)

    def _piece(self, spec: SendSpec) -> None:
        """A layered piece: this forward completes ``spec``'s blocks from ``first_block`` on."""
        assert self.sender is not None
        tid = spec.handoff.transfer_id
        entry = self._pieces.get(tid)
        if entry is None:  # the first piece: from now on vLLM keeps the blocks until we report them
            self.users.add(spec.req_id)
            entry = self._pieces[tid] = (spec.req_id, spec.handoff, None)
            whole = self._whole(spec)
        else:  # (decided at the first piece: a layered one has its Pieces from then on)
            whole = entry[2] is None
        if whole and spec.final:  # whole once the last chunk's forward ended (its launch laid out at the grant)
            self.sender.reserve(spec.handoff, tuple(spec.block_ids))
            self._at_end.append(spec)
        elif not whole:
            marks = LayerMarks(self.sender.kv.num_layers)
            self._forward.append(marks)
            if entry[2] is not None:
                entry[2].add(spec.block_ids, spec.first_block, marks, spec.final)
            else:
                self.sender.reserve(spec.handoff)  # its Allocate goes out before the forward's first layer
                self._pieces[tid] = (spec.req_id, spec.handoff, self.sender.submit_layered(spec, marks))
        if spec.final:
            del self._pieces[tid]

    def start_load_kv(self, meta: PDConnectorMetadata) -> None:
        if self.sender is None:
            return
        self._begin(meta)
        for tid in meta.unreserves:  # (an aborted request: vLLM keeps its blocks until the hand-off stopped)
            entry = self._pieces.pop(tid, None)
            if entry is not None and entry[2] is None:  # one going whole, not started: its blocks are free now
                self.users.end(entry[0])
            self.sender.unreserve(tid)
        for load in meta.cache_loads:
            self._loading(load.req_id, load.block_ids)
            self.cache_io.submit_load(load)
        for req_id in meta.cache_releases:
            self.cache_io.release(lookup_hold(req_id))
        sends = [spec for spec in meta.sends if not spec.layered]
        if not sends and not meta.cache_saves:
            return
        # The blocks were written by forwards queued on vLLM's current stream before now.
        ready = self._ready_event(self.sender.kv_buffer)
        for spec in sends:
            self.users.add(spec.req_id)
            self.sender.submit(spec, ready)
        self._submit_saves(meta.cache_saves, ready)

    def save_kv_layer(self, layer_name: str, meta: PDConnectorMetadata) -> None:
        self._begin(meta)
        index = self._layer_of.get(layer_name)
        if not self._forward or index is None or self.sender is None:
            return
        ready = self._ready_event(self.sender.kv_buffer)  # on a GPU: after the kernels that wrote it
        for marks in self._forward:
            marks.layer(index, ready)

    def _whole(self, spec: SendSpec) -> bool:
        """A layered hand-off that goes whole at its last chunk's forward end instead: below
        ``transport.layerwise_min_mib`` (one batch per layer would cost more than it hides), or
        to a decode whose pool is on our GPU that is not waiting for it yet (its request comes
        after our answer: ``Handoff.decode_sent`` false; ``transport.layerwise_on_shared_gpu`` off).
        A decode that waits gains from layers: the last one lands before the forward's tail ends."""
        assert self.sender is not None
        t, h = self.cfg.transport, spec.handoff
        pages = blocks_for_tokens(h.num_tokens, self.sender.worker.compat.block_size)
        return (pages * self.sender.kv.page_bytes < t.layerwise_min_mib * 2**20
                or (not t.layerwise_on_shared_gpu and not h.decode_sent and self.sender.shares_gpu(h.peer)))

    def wait_for_save(self) -> None:
        """The forward ended: every layer is computed, whether or not its hook ran (a full CUDA
        graph runs none), so the layers not marked yet go now, and the hand-offs going whole (``_whole``) go."""
        if not (self._forward or self._at_end) or self.sender is None:
            return
        buffer = self.sender.kv_buffer
        # On a GPU a timing event: it orders the copies, and gives the timeline the GPU's end of
        # the forward, not this call's (the kernels may still run).
        stamp = clock_for(buffer.device).stamp() if buffer.is_cuda else None
        ready = stamp.event if stamp is not None else None
        done_at = time.time()
        for marks in self._forward:
            for index in range(marks.num_layers):
                marks.layer(index, ready)
            marks.forward_done(done_at, stamp)
        for spec in self._at_end:
            self.sender.submit(dataclasses.replace(spec, layered=False, computed_at=done_at), ready, computed=stamp)
        self._forward, self._at_end = [], []

    def status(self) -> dict[str, Any]:
        out = super().status()
        if self.sender is not None:
            out.update(self.sender.status())
        return out

    def _collectors(self) -> tuple[Collector, ...]:
        return (self.sender.timeline.collector,) if self.sender is not None else ()

    def get_transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        if self.sender is None:
            return set(), set(), set()
        for r in self.sender.drain():
            self.users.end(r.req_id)
        recving: set[str] = set()
        failed: set[str] = set()
        for c in self.cache_io.drain():
            if c.kind == "save":
                self.users.end(c.req_id)
                continue
            recving.add(c.req_id)
            self._loaded(c.req_id, c.ok)
            if not c.ok:
                failed.add(c.req_id)
                log.info("cache load for %s failed (%s): vLLM recomputes it", c.req_id, c.error)
        return self.users.sending(finished_req_ids), recving, failed

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self._stop_cache()


class DecodeWorker(_PDWorker):
    def __init__(self, vllm_config: VllmConfig, cfg: PDConfig, *, instance: str):
        super().__init__(vllm_config, cfg, instance=instance)
        self.receiver: KVReceiver | None = None
        self._outcomes: dict[ReqId, LoadOutcome] = {}
        self._first_steps: list[tuple[str, torch.cuda.Event | None]] = []
        """Hand-offs whose first token a step computes: marked once that step's forward ended."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout, buffer, compat = self.describe(kv_caches)
        self._start_cache(layout, buffer, compat)
        self.receiver = KVReceiver(Worker(self.instance, self.tp_rank, compat), NodeConfig.of(self.cfg),
                                   kv=layout, kv_buffer=buffer, cache=self.cache_io, keys=self.keys)
        self.receiver.start()
        self._start_api()
        log.info("decode worker %d: %d layers in %d buffer(s), page %d B, transport %s, cache %s", self.tp_rank,
                 layout.num_layers, len(layout.extents) or 1, layout.page_bytes, self.cfg.transport.name,
                 self._cache_tiers())

    def start_load_kv(self, meta: PDConnectorMetadata) -> None:
        if self.receiver is None:
            return
        for tid in meta.discards:
            self.receiver.discard(tid, "decode will not load it")
        for spec in meta.loads:
            self._loading(spec.req_id, spec.block_ids)
            self.receiver.submit_load(spec)
        for req_id in meta.cancels:
            self.receiver.cancel_load(req_id)
        if meta.cache_saves:
            self._submit_saves(meta.cache_saves, self._ready_event(self.receiver.kv_buffer))
        self._first_steps += [(tid, None) for tid in meta.first_steps]

    def status(self) -> dict[str, Any]:
        out = super().status()
        if self.receiver is not None:
            out.update(self.receiver.status())
        return out

    def _collectors(self) -> tuple[Collector, ...]:
        return (self.receiver.timeline.collector,) if self.receiver is not None else ()

    def get_transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        if self.receiver is None:
            return set(), set(), set()
        self._mark_first_tokens()
        recving: set[str] = set()
        failed: set[str] = set()
        for r in self.receiver.drain():
            recving.add(r.req_id)
            self._loaded(r.req_id, r.ok)
            if not r.ok:
                failed.add(r.req_id)
            self._outcomes[r.req_id] = LoadOutcome(r.ok, r.num_bytes, r.transfer_s, r.waited_s, r.error,
                                                   r.cache_tokens)
        for c in self.cache_io.drain():
            if c.kind == "save":  # the decode side submits no cache loads of its own
                self.users.end(c.req_id)
        return self.users.sending(finished_req_ids), recving, failed

    def _mark_first_tokens(self) -> None:
        """After the step's forward (vLLM calls get_finished last): on CPU it has run, so now is
        its end; on a GPU it may still run, so an event recorded now says when, and its mark is
        taken at the first step that finds it complete (at most a step late)."""
        if not self._first_steps:
            return
        assert self.receiver is not None
        now, left = time.time(), []
        for tid, event in self._first_steps:
            if event is None and self.receiver.kv_buffer.is_cuda:
                event = torch.cuda.Event()
                event.record()
            if event is None or event.query():
                self.receiver.first_token(tid, now)
            else:
                left.append((tid, event))
        self._first_steps = left

    def build_worker_meta(self) -> PDWorkerMeta | None:
        if not self._outcomes:
            return None
        meta, self._outcomes = PDWorkerMeta(self._outcomes), {}
        return meta

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        self._stop_cache()


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - not initialised (unit tests): a single rank
        return 0
