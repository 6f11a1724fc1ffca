"""Decode side of a hand-off: the pool, its control server and the loader (L5).

At start the receiver pre-allocates the pool (``pool.size_mib``), registers it with the
transport, listens, and serves the control plane. A *load* is the decode worker asking for
the KV of one request:
  1. wait until the reservation named by the transfer id is READY (or failed, or the
     ``timeouts.transfer_s`` deadline passes: then the reservation is aborted); while it is
     still being written, scatter each group of pages the prefill side reports landed (under
     the pool's reader guard, so an abort meanwhile cannot hand those pages to anyone else);
  2. check that it holds the same prompt (token count and digest) as the decode request;
  3. claim it, scatter the pages not yet scattered into the decode's vLLM blocks, release them.
With the prefix cache on, the control server asks this worker's local tiers, at Allocate, how
many leading chunks of the prompt they hold (:meth:`hold`): those are held for the hand-off,
the prefill side sends only the rest, and the loader copies them from the tiers into the
request's blocks (keyed by the decode's own copy of the prompt, never by what the prefill
side sent), while the rest is in flight or just before its scatter.
While it waits, as soon as the pages are granted, the loader builds the scatter's range plan
(and, on a GPU, uploads it), so that only the copy itself follows the prefill's TransferDone.
One loader thread serves all loads, woken by the pool's condition; the vLLM forward loop only
calls :meth:`submit_load` and :meth:`drain`, which never block.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

import torch

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd import transport as transports
from lmcache_pd._types import PageState, ReqId, TransferId
from lmcache_pd.config import PDConfig
from lmcache_pd.control import curve
from lmcache_pd.control.allocator import PagePool, PoolStats
from lmcache_pd.control.server import ControlServer
from lmcache_pd.errors import PDError, TransferError
from lmcache_pd.handoff import CacheLoadSpec, LoadSpec
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan, blocks_for_tokens, plan_cache_to_pool
from lmcache_pd.node.cache_io import CacheIO, CacheMiss
from lmcache_pd.node.handoff_log import HandoffLog
from lmcache_pd.node.loads import LoadResult, LoadState, PreparedScatter
from lmcache_pd.node.write_gate import PoolGate
from lmcache_pd.ops import PreparedCopy, copy_ranges, pool_digest, prepare_copy, run_copy

log = logging.getLogger(__name__)


class KVReceiver:
    def __init__(self, cfg: PDConfig, *, instance: str, tp_rank: int, compat: P.CompatInfo,
                 kv: KVLayout, kv_buffer: torch.Tensor, cache: CacheIO | None = None,
                 keys: auth.Keyring | None = None):
        """``cache``: this worker's prefix cache (started by the caller), for decode-side reuse;
        ``keys``: derived from the deployment's secret (config.keyring); None: no secret."""
        inst = cfg.instance(instance)
        assert inst.control_port is not None and inst.data_port is not None  # checked by the config
        self.cfg = cfg
        self.instance = instance
        self.tp_rank = tp_rank
        self._handoff_log = HandoffLog(cfg.handoff_log, instance=instance, rank=tp_rank, role="decode")
        self.kv = kv
        self.kv_buffer = kv_buffer
        self.incarnation = uuid.uuid4().hex[:16]
        self.keys = keys if keys is not None else auth.Keyring(None)
        self.pool_layout = PoolLayout.sized(kv, cfg.pool.size_mib << 20)
        if self.pool_layout.num_pages == 0:
            raise TransferError(f"pool.size_mib={cfg.pool.size_mib} is below one page ({kv.page_bytes} B)")
        self.transport = transports.create(cfg.transport.name, cfg.transport.options, host=inst.host,
                                           port=inst.data_port + tp_rank, keys=self.keys,
                                           encrypt=cfg.auth.encrypt)
        # Pages of a hand-off ended mid-write: a transport that admits each batch holds them
        # only while a batch writes; one-sided ones until the prefill confirms or data_s passes.
        self.pool = PagePool(self.pool_layout.num_pages, lease_s=cfg.timeouts.lease_s,
                             quarantine_s=0.0 if self.transport.capabilities.admits_writes else cfg.timeouts.data_s)
        # Pre-allocated (and zeroed, so touched) now: the first hand-off pays no page faults.
        self.pool_buffer = self.transport.allocate(self.pool_layout.nbytes, kv_buffer.device)
        self.region = self.transport.register(self.pool_buffer)
        self.server: ControlServer | None = None
        self.compat = compat
        self.bind = f"tcp://{inst.host}:{inst.control_port + tp_rank}"
        self._loads: dict[ReqId, LoadState] = {}
        self._results: list[LoadResult] = []
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._loader = threading.Thread(target=self._run, name=f"pd-loader-{tp_rank}", daemon=True)
        self._stream: torch.cuda.Stream | None = None  # the loader's CUDA stream, made on first use
        self.cache = cache if cfg.cache.decode_skip else None
        self.digests_verified = self.digest_mismatches = 0  # integrity.verify

    def start(self) -> None:
        if self.transport.capabilities.listens:
            self.transport.listen(PoolGate(self.pool, self.pool_layout,
                                           lambda token: self.server.owner_of(token) if self.server else None))
        self.server = ControlServer(self.pool, bind=self.bind, compat=self.compat, incarnation=self.incarnation,
                                    page_bytes=self.pool_layout.page_bytes,
                                    descriptor=self.transport.export_descriptor(self.region),
                                    max_alloc_wait_s=self.cfg.timeouts.alloc_s, keys=self.keys,
                                    peer_s=self.cfg.timeouts.peer_s, max_waiting=self.cfg.backpressure.decode_queue,
                                    curve_secret=curve.server_keys(self.keys)[1] if self.cfg.auth.encrypt else None,
                                    prefix=self if self.cache is not None else None)
        self.server.start()
        self._loader.start()
        log.info("decode pool ready: %d pages of %d B (%.0f MiB), control %s, transport %s",
                 self.pool_layout.num_pages, self.pool_layout.page_bytes, self.pool_layout.nbytes / 2**20,
                 self.server.endpoint, self.transport.name)

    def close(self) -> None:
        self._stop.set()
        with self.pool.cond:
            self.pool.cond.notify_all()
        if self._loader.is_alive():
            self._loader.join(5.0)
        if self.server is not None:
            self.server.close()
        self.transport.close()

    # --- API for the decode worker (non-blocking) -------------------------------------------
    def submit_load(self, spec: LoadSpec) -> None:
        now = time.monotonic()
        # The blocks are the tail of the prompt's pages (a local prefix hit covers the rest).
        local = max(0, blocks_for_tokens(spec.handoff.num_tokens, self.kv_block_size) - len(spec.block_ids))
        with self.pool.cond:
            self._loads[spec.req_id] = LoadState(spec, now, now + self.cfg.timeouts.transfer_s, time.time(), local=local)
            self.pool.cond.notify_all()

    def cancel_load(self, req_id: ReqId) -> None:
        """The decode request was aborted while waiting: end its load now (reported as failed).

        The failure is reported (finished_recving, after which vLLM frees the blocks) only once
        nothing writes into the blocks any more: a load the loader is copying into right now is
        ended by the loader when that copy is done."""
        with self.pool.cond:
            load = self._loads.get(req_id)
            if load is not None and load.busy:
                load.canceled = "request aborted"
                return
            self._loads.pop(req_id, None)
        if load is not None:
            self._fail(load, "request aborted", time.monotonic())

    def discard(self, transfer_id: TransferId, reason: str) -> None:
        """The decode side will not load this hand-off: free its pages now (or refuse it later)."""
        self.pool.abort(transfer_id, reason=reason, now=time.monotonic())

    def drain(self, wait_s: float = 0.0) -> list[LoadResult]:
        """Results of ended loads. ``wait_s`` > 0 blocks up to that long for one (benchmarks and
        tests; vLLM's loop never waits)."""
        with self._lock:
            if wait_s > 0 and not self._results:
                self._recorded.wait_for(lambda: bool(self._results), wait_s)
            out, self._results = self._results, []
        return out

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    def status(self) -> dict[str, dict[str, int]]:
        """Pool, control-plane and transport counters (for the worker API; thread-safe)."""
        p = self.pool.stats()
        out: dict[str, dict[str, int]] = {"pool": {
            "pages": p.num_pages, "free_pages": p.free_pages, "allocated": p.allocated, "ready": p.ready,
            "consuming": p.consuming, "expired_total": p.expired_total, "aborted_total": p.aborted_total}}
        with self.pool.cond:
            out["loads"] = {"waiting": len(self._loads)}
        with self._lock:
            out["loads"].update(digests_verified_total=self.digests_verified,
                                digest_mismatches_total=self.digest_mismatches)
        if self.server is not None:
            out["control"] = {**dataclasses.asdict(self.server.stats), "sessions": self.server.sessions}
        t = self.transport.stats
        out["transport"] = {"batches_total": t.batches, "bytes_total": t.bytes, "failures_total": t.failures,
                            "refused_total": t.refused, "refused_batches_total": t.refused_batches,
                            "encrypted": int(self.transport.encrypt)}
        return out

    # --- decode-side reuse (called by the control server's thread) ----------------------------
    def hold(self, msg: P.Allocate) -> int:
        assert self.cache is not None
        per = self.cache.chunk_blocks
        if len(msg.chains) * self.cache.cfg.chunk_tokens > msg.num_tokens:
            return 0  # more full chunks than the prompt has tokens: not a prompt of this size
        usable = (msg.num_pages - 1) // per  # at least one page is always sent
        return self.cache.hold_prefix(_hold_owner(msg.transfer_id), msg.chains, msg.tenant, usable) * per

    def release(self, transfer_id: TransferId) -> None:
        if self.cache is not None:
            self.cache.release(_hold_owner(transfer_id))

    # --- loader thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            ready: list[LoadState] = []
            landed: list[LoadState] = []
            granted: list[LoadState] = []
            failed: list[tuple[LoadState, str]] = []
            with self.pool.cond:
                now = time.monotonic()
                for req_id, load in list(self._loads.items()):
                    verdict = self._check(load, now)
                    if verdict is None:
                        continue
                    if verdict in ("landed", "granted"):
                        (landed if verdict == "landed" else granted).append(load)
                        continue
                    del self._loads[req_id]
                    if verdict:
                        failed.append((load, verdict))
                    else:
                        ready.append(load)
                if not ready and not failed and not landed and not granted:
                    wait = min((ld.deadline for ld in self._loads.values()), default=now + 0.5) - now
                    self.pool.cond.wait(timeout=max(0.001, min(wait, 0.5)))
                    continue
                for load in (*landed, *granted):  # still in _loads while the loader copies into them
                    load.busy = True
            for load, error in failed:
                self._fail(load, error, time.monotonic())
            for load in landed:
                self._guarded(load, self._scatter_landed)
                self._idle(load)
            for load in ready:
                self._guarded(load, self._scatter)
            for load in granted:  # last: a load that became ready meanwhile goes first
                self._guarded(load, self._prepare)
                self._idle(load)

    def _idle(self, load: LoadState) -> None:
        """The loader is done copying into the load's blocks for now: a cancel that came
        meanwhile takes effect."""
        with self.pool.cond:
            load.busy = False
            canceled = load.canceled if self._loads.get(load.spec.req_id) is load else None
            if canceled is not None:
                del self._loads[load.spec.req_id]
        if canceled is not None:
            self._fail(load, canceled, time.monotonic())

    def _guarded(self, load: LoadState, step) -> None:
        try:
            step(load)
        except Exception as e:  # noqa: BLE001 - the loader must outlive a bug, or every load would hang
            log.exception("loader crashed on %s", load.spec.handoff.transfer_id)
            with self.pool.cond:
                self._loads.pop(load.spec.req_id, None)
            self._fail(load, f"internal error: {e!r}", time.monotonic())

    def _check(self, load: LoadState, now: float) -> str | None:
        """'' when ready to claim, 'landed' when new pages landed, 'granted' when its pages are
        known and its scatter not yet planned, an error text when it failed, None to keep waiting."""
        r = self.pool.lookup(load.spec.handoff.transfer_id)
        if r is not None and not load.bound:
            # Pages cover the blocks after the skipped ones; vLLM may hold more than those.
            load.next_page, load.bound = max(0, load.local - r.skip_pages), True
        if r is not None and r.state == PageState.READY:
            return ""
        if r is not None and r.state.failed:
            return f"hand-off ended: {r.reason}"
        if now >= load.deadline:
            return (f"no KV from prefill within {self.cfg.timeouts.transfer_s:g} s "
                    f"(raise `timeouts.transfer_s` to wait longer)")
        if r is not None and r.state == PageState.ALLOCATED and r.landed > load.next_page:
            return "landed"
        if r is not None and r.state == PageState.ALLOCATED and not load.planned:
            return "granted"
        return None

    def _fail(self, load: LoadState, error: str, now: float) -> None:
        self.pool.abort(load.spec.handoff.transfer_id, reason=error, now=now)  # frees pages or leaves a tombstone
        self.release(load.spec.handoff.transfer_id)
        log.warning("load of %s for %s failed, recomputing: %s", load.spec.handoff.transfer_id, load.spec.req_id, error)
        self._record(LoadResult(load.spec.req_id, load.spec.handoff.transfer_id, False, waited_s=now - load.t0, error=error,
                                submitted_at=load.submitted_at, ready_at=load.ready_at, done_at=time.time()))

    def _validate(self, load: LoadState, r) -> None:
        """Check once that the reservation holds this request's prompt."""
        spec = load.spec
        if load.checked:
            return
        if r.num_tokens != spec.handoff.num_tokens or r.prompt_digest != spec.handoff.prompt_digest:
            raise TransferError("prefill computed a different prompt (token count or digest differs)",
                                transfer_id=spec.handoff.transfer_id)
        n_pages = blocks_for_tokens(spec.handoff.num_tokens, self.kv_block_size)
        if r.skip_pages + len(r.pages) != n_pages or not 0 < len(spec.block_ids) <= n_pages:
            raise TransferError(f"{r.skip_pages} + {len(r.pages)} pages and {len(spec.block_ids)} blocks for "
                                f"{spec.handoff.num_tokens} tokens", transfer_id=spec.handoff.transfer_id)
        load.checked = True

    def _load_cached(self, load: LoadState, r) -> None:
        """Copy the blocks the prefill side skipped (whole chunks held here) from this worker's
        tiers into the request's blocks, once. They are keyed by the decode's own chain hashes:
        a prefill side that named other chunks makes the load miss and vLLM recompute."""
        if load.cached:
            return
        load.cached = True
        skip, spec = r.skip_pages, load.spec
        if skip <= load.local:  # nothing to copy: vLLM holds those blocks already
            self.release(spec.handoff.transfer_id)
            return
        assert self.cache is not None  # only a cache grants skipped pages
        per = self.cache.chunk_blocks
        first, last = load.local // per, skip // per
        try:
            if len(spec.handoff.chains) < last:
                raise TransferError(f"the prefill side skipped {last} chunks, this prompt has {len(spec.handoff.chains)}",
                                    transfer_id=spec.handoff.transfer_id)
            try:
                self.cache.load_now(CacheLoadSpec(spec.req_id, spec.handoff.chains[first:last], spec.handoff.tenant,
                                                  load.local % per, spec.block_ids[:skip - load.local]))
            except (CacheMiss, ValueError) as e:
                raise TransferError(f"decode cache: {e}", transfer_id=spec.handoff.transfer_id) from None
        finally:
            self.release(spec.handoff.transfer_id)
        load.cache_tokens = (skip - load.local) * self.kv_block_size

    def _scatter_pages(self, load: LoadState, r, upto: int) -> None:
        """Copy the reservation's pages ``[load.next_page, upto)`` into the load's blocks."""
        self._validate(load, r)
        self._load_cached(load, r)
        first = load.next_page
        if upto <= first:
            return
        t0 = time.monotonic()
        p = load.prepared
        if p is not None and (p.first, p.upto) == (first, upto):
            plan = p.plan
            self._copy(plan, p.copy)
            load.planned_ahead = True
        else:
            plan = self._plan(load, r, first, upto)
            self._copy(plan)
        load.prepared = None
        load.scatter_s += time.monotonic() - t0
        load.groups += 1
        load.nbytes += plan.nbytes
        load.next_page = upto

    def _plan(self, load: LoadState, r, first: int, upto: int) -> RangePlan:
        """Pool pages ``[first, upto)`` of the reservation -> the load's blocks."""
        offset = len(r.pages) - len(load.spec.block_ids)
        return plan_cache_to_pool(self.kv, self.pool_layout, blocks=load.spec.block_ids[first - offset:upto - offset],
                                  pages=r.pages[first:upto]).swapped()

    def _prepare(self, load: LoadState) -> None:
        """Plan (and on a GPU upload) the scatter of all pages still to come, while they fly."""
        load.planned = True
        r = self.pool.lookup(load.spec.handoff.transfer_id)
        if r is None or r.state != PageState.ALLOCATED:
            return
        try:
            self._validate(load, r)
            self._load_cached(load, r)  # while the rest of the prompt is in flight
        except PDError as e:  # the wrong prompt: refuse it now rather than after its transfer
            with self.pool.cond:
                self._loads.pop(load.spec.req_id, None)
            self._fail(load, str(e), time.monotonic())
            return
        first, upto = load.next_page, len(r.pages)
        group = self.cfg.transport.group_mib << 20
        if group and (upto - first) * self.pool_layout.page_bytes > group:
            return  # streamed: its groups are scattered as they land, each planned then
        plan = self._plan(load, r, first, upto)
        copy = None
        if self.kv_buffer.is_cuda:
            copy = prepare_copy(self.pool_buffer.data_ptr(), self.kv_buffer.data_ptr(), plan,
                                device=self.kv_buffer.device, stream=self._loader_stream())
        load.prepared = PreparedScatter(first, upto, plan, copy)

    def _scatter_landed(self, load: LoadState) -> None:
        """Scatter the pages that landed so far, while the prefill side is still writing."""
        r = self.pool.begin_read(load.spec.handoff.transfer_id)
        if r is None:  # ended or READY meanwhile: the next check says which
            return
        error = None
        try:
            self._scatter_pages(load, r, r.landed)
        except (PDError, ValueError) as e:
            error = str(e)
        finally:
            self.pool.end_read(r)  # whatever happened: a leaked guard would hold the pages forever
        if error is not None:
            with self.pool.cond:
                self._loads.pop(load.spec.req_id, None)
            self._fail(load, error, time.monotonic())

    def _scatter(self, load: LoadState) -> None:
        spec = load.spec
        load.ready_at = time.time()
        try:
            r = self.pool.claim(spec.handoff.transfer_id)
        except PDError as e:
            self._fail(load, str(e), time.monotonic())
            return
        try:
            self._verify(r)
            self._scatter_pages(load, r, len(r.pages))
        except (PDError, ValueError) as e:
            self.pool.release(spec.handoff.transfer_id, now=time.monotonic())
            self._fail(load, str(e), time.monotonic())
            return
        now = time.monotonic()
        self.pool.release(spec.handoff.transfer_id, now=now)
        self._record(LoadResult(spec.req_id, spec.handoff.transfer_id, True, load.nbytes, r.seconds,
                                now - load.t0, scatter_s=load.scatter_s, groups=load.groups,
                                planned_ahead=load.planned_ahead, cache_tokens=load.cache_tokens,
                                submitted_at=load.submitted_at, ready_at=load.ready_at, done_at=time.time()))

    def _verify(self, r) -> None:
        """With ``integrity.verify``: the pool pages hold what the prefill said it sent."""
        if not self.cfg.integrity.verify:
            return
        if r.digest is None:
            raise TransferError("the prefill sent no digest (set integrity.verify the same on every instance)",
                                transfer_id=r.transfer_id)
        if pool_digest(self.pool_layout, self.pool_buffer, r.pages) != r.digest:
            with self._lock:
                self.digest_mismatches += 1
            raise TransferError("the pages differ from what the prefill sent (integrity.verify)",
                                transfer_id=r.transfer_id)
        with self._lock:
            self.digests_verified += 1

    def _copy(self, plan: RangePlan, prepared: PreparedCopy | None = None) -> None:
        """Scatter pool pages into vLLM's blocks; on a GPU, complete before the pages go back.

        The copy runs on the loader's own stream: the target blocks belong to this request
        alone and the pages are READY, so it needs no order against vLLM's stream, and vLLM reads
        the blocks only after the load is reported, which happens after this returns.
        """
        if not self.kv_buffer.is_cuda:
            copy_ranges(self.pool_buffer, self.kv_buffer, plan)
            return
        stream = self._loader_stream()
        if prepared is not None:  # planned and uploaded on this stream while the pages flew
            run_copy(prepared, stream)
        else:
            with torch.cuda.stream(stream):
                copy_ranges(self.pool_buffer, self.kv_buffer, plan)
        stream.synchronize()

    def _loader_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.kv_buffer.device)
        return self._stream

    def _record(self, result: LoadResult) -> None:
        with self._lock:
            self._results.append(result)
            self._recorded.notify_all()
        self._handoff_log.append(result)

    @property
    def kv_block_size(self) -> int:
        return self.compat.block_size


def _hold_owner(transfer_id: TransferId) -> str:
    return f"handoff/{transfer_id}"
