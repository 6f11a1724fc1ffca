"""Prefill side of a hand-off: push a request's KV into a decode peer's pool (L5).

Per hand-off (one coroutine on the sender's loop thread; vLLM's forward loop never waits):
  1. link to the decode peer: control handshake (compat hash, incarnation) and transport
     connect, once per peer and again when the peer restarts;
  2. Allocate pages in the decode pool (the decode side queues us while its pool is full).
     The Allocate carries the prompt's chunk chain hashes; the decode side answers how many
     leading blocks its own cache holds (``skip_pages``), and those are not sent.
     The connector reserves them ahead (:meth:`reserve`), while the forward that computes the
     last prompt chunk runs, so that the round trip is off the hand-off's path; a reservation
     the hand-off never takes is cancelled (:meth:`unreserve`) or, at the latest, dropped after
     ``timeouts.transfer_s``;
  3. submit the range plan (vLLM blocks -> pool pages) to the transport and wait for DONE; a
     large hand-off goes as several groups of pages (``transport.group_mib``), each announced
     with a one-way Landed as it arrives, so that the decode side scatters while the rest flies
     (groups.py); a layered one goes piece by piece and layer by layer (layered.py);
  4. TransferDone on the control plane: only now may the decode side read the pages.
Any failure sends a best-effort Cancel (the pages come back at once) and ends the hand-off as
failed; the decode side then recomputes. Every step has a deadline from ``timeouts.*``, and the
whole hand-off one more (their sum, :meth:`KVSender.handoff_deadline_s`): vLLM's blocks are held
no longer than that, whatever happens (the lease on prefill-side blocks).
Hand-offs waiting for decode pages are bounded per peer (``backpressure.prefill_queue``): past
it a hand-off fails at once and its blocks are freed, so one decode instance whose pool stays
full cannot fill this instance's KV cache with blocks waiting for it (and starve the others).
Every link is kept alive by heartbeats (``timeouts.heartbeat_s``), which also renew the leases of
its pages; a link whose heartbeat goes unanswered, whose connection drops, or whose peer
answers with a new incarnation is dropped, and the next hand-off opens a new session.
Results are collected with :meth:`drain`, which the connector calls once per engine step.
Every message to a decode peer goes through its ``DecodePeer`` (peer.py), which also owns the
peer's in-flight hand-offs; ``Links`` (links.py) opens and drops peers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState, BlockId, PeerName, TransferId
from lmcache_pd.errors import PDError, PeerLost, TransferError, TransferTimeout
from lmcache_pd.handoff import Handoff, SendSpec
from lmcache_pd.layout import KVLayout, RangePlan, blocks_for_tokens
from lmcache_pd.node.armed import signal_of
from lmcache_pd.node.groups import send_groups
from lmcache_pd.node.handoff_log import HandoffLog
from lmcache_pd.node.layered import LayerMarks, Pieces, piece_plan, send_layers
from lmcache_pd.node.links import Links
from lmcache_pd.node.loop import LoopThread
from lmcache_pd.node.peer import DecodePeer, Grant
from lmcache_pd.node.reservations import Reservations
from lmcache_pd.node.send_result import SendResult
from lmcache_pd.node.timeline import Timeline
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.ops import cache_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Launched:
    """A hand-off planned and submitted on the caller's thread (KVSender._launch)."""

    grant: Grant
    plan: RangePlan
    handle: object
    t0: float
    started_at: float
    first_byte_at: float


class KVSender:
    def __init__(self, worker: Worker, cfg: NodeConfig, *, kv: KVLayout, kv_buffer: torch.Tensor,
                 keys: auth.Keyring | None = None):
        """``keys``: derived from the deployment's secret (config.keyring); None: no secret."""
        self.worker = worker
        self.cfg = cfg
        self.keys = keys if keys is not None else auth.Keyring(None)
        self.t = cfg.timeouts
        self.kv = kv
        self.kv_buffer = kv_buffer
        self.transport = transports.create(cfg.transport.name, cfg.transport.options, keys=self.keys,
                                           encrypt=cfg.auth.encrypt)
        self.region = -1
        self._loop = LoopThread(f"pd-sender-{worker.rank}")
        self.links = Links(worker, cfg, kv=kv, keys=self.keys, transport=self.transport, on_ended=self._on_ended)
        self._ended: collections.OrderedDict[tuple[PeerName, TransferId], str] = collections.OrderedDict()
        """Hand-offs the decode side ended while we wrote them (P.Ended): stop, and confirm."""
        self._results: list[SendResult] = []
        self._results_lock = threading.Lock()
        self._started: dict[TransferId, float] = {}  # wall clock at each hand-off's start (timeline)
        self._sent = self._failed = 0
        self._abandoned = 0  # given up before the last chunk: the request was preempted
        self._reserved = Reservations(self._allocate_pages)
        self._background: set[asyncio.Task[None]] = set()
        self._beats: asyncio.Task[None] | None = None
        self._handoff_log = HandoffLog(cfg.handoff_log, instance=worker.instance, rank=worker.rank, role="prefill")
        self.timeline = Timeline.prefill()
        self._layered: dict[TransferId, Handoff] = {}
        """Layered hand-offs under way (loop thread): an unreserve stops them."""
        self._launch_here = not cfg.integrity.verify  # (whose digest is computed on the loop's side)

    def start(self) -> None:
        self.region = self.transport.register(self.kv_buffer, self.kv.extents)
        self._loop.start()
        self._loop.call(self._start(), 5.0)

    async def _start(self) -> None:
        self.links.start()
        self._beats = asyncio.get_running_loop().create_task(self._heartbeats(), name="pd-heartbeat")

    def submit(self, spec: SendSpec, ready: torch.cuda.Event | None = None) -> None:
        """Start a hand-off (thread-safe, returns at once).

        ``ready``: a CUDA event recorded on vLLM's stream after the forward that wrote these
        blocks; the copy is ordered after it (on the GPU by stream-ordered transports, else by
        waiting for it here, on the sender's thread).
        With its pages reserved and granted, the hand-off is planned and submitted here, on the
        caller's thread (:meth:`_launch`; on a GPU only by a stream-ordered transport, which
        orders it after ``ready`` on the device); the sender's loop then only waits for it and
        sends TransferDone.
        """
        launched = self._launch(spec, ready) if self._launch_here else None
        self._loop.submit(self._send(spec, ready, launched=launched))

    def _launch(self, spec: SendSpec, ready: torch.cuda.Event | None) -> _Launched | None:
        """Plan and submit a one-group hand-off whose reserved pages are granted, now. None when
        it cannot go this way (not reserved or granted yet, several groups, an error): the
        sender's loop then does every step."""
        if ready is not None and not self.transport.capabilities.stream_ordered:
            return None  # the loop waits for the forward's event first
        tid = spec.handoff.transfer_id
        n_pages = blocks_for_tokens(spec.handoff.num_tokens, self.worker.compat.block_size)
        grant = self._reserved.take_granted(tid)
        if grant is None:
            return None
        if (len(spec.block_ids) < n_pages or grant.skip + len(grant.pages) != n_pages
                or len(self._group_ends(len(grant.pages))) != 1):
            self._reserved.put_back(tid, grant)  # the loop's steps refuse it, or stream it, as usual
            return None
        t0, started_at = time.monotonic(), time.time()
        try:
            dest, layout, to, first = grant.target()
            plan = grant.peer.plan(self.kv, layout, blocks=spec.block_ids[first:n_pages], to=to)
            last = ({"signal": signal_of(grant.pages, grant.generation)}
                    if grant.peer.signals and grant.pages and not grant.blocks else {})
            first_byte_at = time.time()
            handle = self.transport.submit(dest, self.region, plan, timeout_s=self.t.data_s,
                                           after=ready, ticket=P.ticket(tid, grant.generation), **last)
        except Exception:  # noqa: BLE001 - e.g. the link was re-made meanwhile: the loop's steps say why
            log.debug("hand-off %s not launched on the caller's thread", tid, exc_info=True)
            self._reserved.put_back(tid, grant)
            return None
        return _Launched(grant, plan, handle, t0, started_at, first_byte_at)

    def submit_layered(self, spec: SendSpec, marks: LayerMarks) -> Pieces:
        """Start a layered hand-off with its first piece (thread-safe, returns at once): each
        layer of ``spec``'s blocks goes as ``marks`` says the forward computed it
        (node/layered.py). Add the next chunks' pieces to the returned :class:`Pieces`; the
        hand-off ends after its final one (``spec.final``)."""
        pieces = Pieces()
        pieces.add(spec.block_ids, spec.first_block, marks, spec.final)
        self._loop.submit(self._send(spec, None, pieces))
        return pieces

    def abandon(self, transfer_id: TransferId, pieces: Pieces, reason: str) -> bool:
        """vLLM is about to reuse a layered hand-off's blocks (its request was preempted): let no
        more of its batches start, give it up (the decode side recomputes), and wait, on the
        caller's thread, until none reads the blocks. False if some still did after
        ``timeouts.data_s`` (every batch has that deadline)."""
        pieces.stop(reason)
        self._count_abandoned()
        self.unreserve(transfer_id, reason)
        return pieces.wait_quiet(self.t.data_s + 1.0)

    def _count_abandoned(self) -> None:
        with self._results_lock:
            self._abandoned += 1

    def give_up(self, handoff: Handoff, reason: str) -> None:
        """A hand-off that never started will not come: tell its decode peer, over a link opened
        for it if need be (thread-safe; the peer's load recomputes at once). Counted as
        abandoned: the worker gives a hand-off up only when vLLM preempted its request."""
        self._count_abandoned()
        self._loop.submit(self._give_up(handoff, reason))

    async def _give_up(self, h: Handoff, reason: str) -> None:
        try:
            await (await self.links.get(h.peer)).cancel(h.transfer_id, reason)
        except (PDError, OSError) as e:  # its load there ends with timeouts.transfer_s instead
            log.info("could not tell %s that hand-off %s will not come: %s", h.peer, h.transfer_id, e)

    def reserve(self, handoff: Handoff) -> Future[None]:
        """Allocate a coming hand-off's decode pages now (thread-safe, returns at once).

        The hand-off with the same transfer id then finds its pages granted. The future ends
        when the pages are granted, or with the allocation's error (the hand-off then fails
        the same way, and the decode side recomputes)."""
        return self._loop.submit(self._reserved.reserve(handoff))

    def unreserve(self, transfer_id: TransferId, reason: str = "request ended without a hand-off") -> None:
        """The hand-off will not come (request aborted): give its reserved pages back, and stop
        it if it is a layered one already under way."""
        self._loop.submit(self._unreserve(transfer_id, reason))

    def handoff_deadline_s(self) -> float:
        """The longest a hand-off can take: every deadline it may meet, one after the other."""
        t = self.t
        return 2 * t.handshake_s + t.alloc_s + t.data_s + 3 * t.control_s

    def status(self) -> dict[str, dict[str, int]]:
        """Links, hand-offs and transport counters (for the worker API; thread-safe)."""
        async def links() -> dict[str, int]:
            ls = self.links.up()
            return {"peers": len(ls), "inflight": sum(peer.inflight for peer in ls),
                    "waiting_for_pages": sum(peer.waiting for peer in ls), "reserved": len(self._reserved),
                    "dropped_replies_total": sum(peer.client.malformed for peer in ls)}
        try:
            out = {"links": self._loop.call(links(), 2.0)}
        except Exception:  # noqa: BLE001 - a busy or stopped loop: report what is known
            out = {}
        with self._results_lock:
            out["handoffs"] = {"sent_total": self._sent, "failed_total": self._failed,
                               "abandoned_total": self._abandoned}
        t = self.transport.stats
        out["transport"] = {"batches_total": t.batches, "bytes_total": t.bytes, "failures_total": t.failures,
                            "encrypted": int(self.transport.encrypt)}
        return out

    def drain(self) -> list[SendResult]:
        with self._results_lock:
            out, self._results = self._results, []
        return out

    def close(self) -> None:
        self._loop.close(self._shutdown())
        self.transport.close()

    async def _shutdown(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
        for task in list(self._background):
            task.cancel()
        await self._reserved.close("prefill instance shutting down")
        await self.links.close()

    def _on_ended(self, peer: PeerName, msg: P.Ended) -> None:
        """The decode side ended a hand-off we may still be writing (on the loop thread): the
        hand-off stops at its next check and its Cancel confirms that no more bytes come."""
        self._ended[(peer, msg.transfer_id)] = msg.reason
        while len(self._ended) > 4096:
            self._ended.popitem(last=False)

    def _check_ended(self, h: Handoff) -> None:
        reason = self._ended.get((h.peer, h.transfer_id))
        if reason is not None:
            raise TransferError(f"the decode side ended the hand-off: {reason}", transfer_id=h.transfer_id,
                                peer=h.peer)

    # --- reservations (reservations.py) ---------------------------------------------------
    async def _allocate_pages(self, h: Handoff) -> Grant:
        grant = await self._allocate(h, blocks_for_tokens(h.num_tokens, self.worker.compat.block_size))
        grant.peer.track(h.transfer_id)  # heartbeats renew the pages' lease until the hand-off ends
        return grant

    async def _unreserve(self, transfer_id: TransferId, reason: str) -> None:
        layered = self._layered.get(transfer_id)
        if layered is not None:  # it stops at its next check, and its Cancel returns the pages
            self._ended[(layered.peer, transfer_id)] = reason
        await self._reserved.give_back(transfer_id, reason)

    async def _take_reservation(self, spec: SendSpec, n_pages: int) -> tuple[Grant, bool]:
        """The pages reserved for this hand-off (and True), else allocated now (and False)."""
        grant = await self._reserved.take(spec.handoff.transfer_id)
        if grant is None:
            return await self._allocate_pages(spec.handoff), False
        if grant.skip + len(grant.pages) != n_pages:  # both come from the same request: a bug if ever seen
            grant.peer.untrack(spec.handoff.transfer_id)
            await grant.peer.cancel(spec.handoff.transfer_id, "reservation of the wrong size")
            raise TransferError(f"reserved {grant.skip} + {len(grant.pages)} pages, the hand-off needs {n_pages}",
                                transfer_id=spec.handoff.transfer_id)
        return grant, True

    # --- one hand-off ---------------------------------------------------------------------
    async def _send(self, spec: SendSpec, ready: torch.cuda.Event | None = None,
                    pieces: Pieces | None = None, launched: _Launched | None = None) -> None:
        t0 = launched.t0 if launched is not None else time.monotonic()
        self._started[spec.handoff.transfer_id] = launched.started_at if launched is not None else time.time()
        # A layered hand-off also waits for the forwards that compute its layers: data_s more
        # from each piece on (a chunked prompt's last piece may come many steps later).
        limit = self.handoff_deadline_s() + (self.t.data_s if pieces is not None else 0.0)
        if pieces is not None:
            self._layered[spec.handoff.transfer_id] = spec.handoff
        try:
            async with asyncio.timeout(limit) as deadline:
                loop = asyncio.get_running_loop()
                renew = lambda: deadline.reschedule(max(deadline.when() or 0.0, loop.time() + limit))  # noqa: E731
                await self._send_steps(spec, ready, t0, pieces, launched, renew)
        except TimeoutError:  # a step outlived its own deadline: a bug, but the blocks must come back
            # (the steps' own ``finally`` already took the transfer off its link's heartbeats)
            log.error("hand-off %s outlived %.1f s (the sum of its timeouts.*): abandoned", spec.handoff.transfer_id, limit)
            await self._cancel_any(None, spec.handoff, "hand-off abandoned")
            self._result(SendResult(spec.req_id, spec.handoff.transfer_id, False, error=f"hand-off took over {limit:g} s"))
        finally:
            self._layered.pop(spec.handoff.transfer_id, None)

    async def _send_steps(self, spec: SendSpec, ready: torch.cuda.Event | None, t0: float,
                          pieces: Pieces | None, launched: _Launched | None, renew) -> None:
        peer: DecodePeer | None = None
        try:
            if launched is not None:  # planned and submitted on the caller's thread
                self._reserved.forget(spec.handoff.transfer_id)
                peer = launched.grant.peer
                plans, ends = [launched.plan], (len(launched.grant.pages),)
                _, last_byte_at = await send_groups(self.transport, self.region, peer, plans, ends, spec.handoff,
                                                    ticket=b"", data_s=self.t.data_s, submitted=[launched.handle],
                                                    **self._watch(spec))
                first_byte_at = launched.handle.began_at or launched.first_byte_at
                await self._done(spec, launched.grant, True, plans, None, t0, launched.t0, launched.started_at,
                                 (first_byte_at, last_byte_at), time.monotonic() - launched.t0, None, on_caller=True)
                return
            n_pages = blocks_for_tokens(spec.handoff.num_tokens, self.worker.compat.block_size)
            if len(spec.block_ids) < n_pages and spec.final:  # (a first piece of several has fewer)
                await self._unreserve(spec.handoff.transfer_id, "hand-off refused")
                raise TransferError(f"{len(spec.block_ids)} blocks for {spec.handoff.num_tokens} tokens",
                                    transfer_id=spec.handoff.transfer_id)
            grant, reserved = await self._take_reservation(spec, n_pages)
            peer, pages = grant.peer, grant.pages
            self._check_ended(spec.handoff)
            t_alloc, granted_at = time.monotonic(), time.time()
            # Where the bytes go: the decode's pool pages, or (direct) its vLLM blocks for the
            # last pages, the blocks before them not sent (the decode holds them).
            dest, layout, to, first = grant.target()
            blocks = spec.block_ids[first:n_pages]
            digested = pages[len(pages) - len(to):]  # the pages the bytes sent stand for
            ticket = P.ticket(spec.handoff.transfer_id, grant.generation)
            # The last batch ends with the reservation's device-side signal: the decode's scatter
            # waits for it on the GPU (node/armed.py). A direct hand-off has no scatter.
            signal = signal_of(pages, grant.generation) if peer.signals and pages and not grant.blocks else None
            t_data = time.monotonic()
            if pieces is None:
                ends = self._group_ends(len(to)) if not grant.blocks else (len(to),)
                plans = [peer.plan(self.kv, layout, blocks=blocks[a:b], to=to[a:b])
                         for a, b in zip((0, *ends[:-1]), ends)]
                digest = self._digest(blocks, digested, peer, ready)  # reads the blocks while they fly
                span = await send_groups(self.transport, self.region, peer, plans, ends, spec.handoff,
                                         ticket=ticket, data_s=self.t.data_s, ready=ready, signal=signal,
                                         dest=dest, **self._watch(spec))
            else:
                # Over a one-sided transport the decode learns of each layer landed from us
                # (Landed), to scatter it during the forward; a direct hand-off has nothing to scatter.
                tell = not (signal or grant.blocks or self.transport.capabilities.admits_writes)
                *span, plans = await send_layers(
                    self.transport, dest, self.region,
                    lambda piece, layer: piece_plan(self.kv, layout, piece, layer, to, first, plan=peer.plan),
                    pieces, self.kv.num_layers,
                    data_s=self.t.data_s, ticket=ticket, signal=signal, renew=renew, **self._watch(spec),
                    landed=functools.partial(peer.landed, spec.handoff.transfer_id, 0) if tell else None)
                final = pieces.final
                assert final is not None and len(final.blocks) >= n_pages
                blocks = final.blocks[first:n_pages]
                digest = self._digest(blocks, digested, peer, None)  # every layer is computed by now
            await self._done(spec, grant, reserved, plans, digest, t0, t_alloc, granted_at, tuple(span),
                             time.monotonic() - t_data, pieces)
        except (PDError, OSError) as e:
            log.warning("hand-off %s to %s failed, decode will recompute: %s", spec.handoff.transfer_id, spec.handoff.peer, e)
            await self._cancel_any(peer, spec.handoff, str(e))
            self._result(SendResult(spec.req_id, spec.handoff.transfer_id, False, error=str(e)))
        except Exception as e:  # noqa: BLE001 - a bug must not leave vLLM's blocks held forever
            log.exception("hand-off %s crashed", spec.handoff.transfer_id)
            await self._cancel_any(peer, spec.handoff, repr(e))
            self._result(SendResult(spec.req_id, spec.handoff.transfer_id, False, error=repr(e)))
        finally:
            if peer is not None:
                peer.untrack(spec.handoff.transfer_id)

    async def _done(self, spec: SendSpec, grant: Grant, reserved: bool, plans: list[RangePlan],
                    digest: asyncio.Future[int] | None, t0: float, t_alloc: float, granted_at: float,
                    span: tuple[float, float], seconds: float, pieces: Pieces | None, *,
                    on_caller: bool = False) -> None:
        """Every byte is in the decode pool (``span``: its first and last byte): TransferDone, then the result."""
        nbytes = sum(p.nbytes for p in plans)
        first_byte_at, last_byte_at = span
        checked = await digest if digest is not None else None
        t_done = time.monotonic()
        await grant.peer.transfer_done(spec.handoff.transfer_id, nbytes, seconds, checked)
        log.info("sent %s: %d B in %.2f ms (%.2f GB/s, %d %s; %d of %d blocks held by the decode side), "
                 "hand-off %.2f ms", spec.handoff.transfer_id, nbytes, seconds * 1e3, nbytes / max(seconds, 1e-9) / 1e9,
                 len(plans), "layers" if pieces is not None else "groups", grant.skip, grant.skip + len(grant.pages),
                 (time.monotonic() - t0) * 1e3)
        self._result(SendResult(spec.req_id, spec.handoff.transfer_id, True, nbytes, seconds,
                                allocate_s=t_alloc - t0, done_s=time.monotonic() - t_done, reserved=reserved,
                                skipped_pages=grant.skip, granted_at=granted_at,
                                computed_at=await self._computed_at(spec, pieces),
                                first_byte_at=first_byte_at, last_byte_at=last_byte_at, layered=pieces is not None,
                                on_caller=on_caller, pieces=len(pieces) if pieces is not None else 0,
                                direct=bool(grant.blocks),
                                last_chunk_at=pieces.final.added_at if pieces is not None and pieces.final else 0.0))

    async def _computed_at(self, spec: SendSpec, pieces: Pieces | None) -> float:
        """When the prompt's last chunk was computed. A layered hand-off whose last forward has
        not reported its end yet landed before it: now is a lower bound (all of it hidden). On a
        GPU the end is the GPU's (a stamp after the forward's kernels, ``LayerMarks.stamp``),
        not the host's return from the forward call, once it passed (within ``timeouts.data_s``)."""
        final = pieces.final if pieces is not None else None
        if final is None:
            return spec.computed_at
        marks = final.marks
        if marks.stamp is not None:
            deadline = time.monotonic() + self.t.data_s
            while not marks.stamp.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.0002)
            if marks.stamp.done():
                return marks.stamp.wall()
        return marks.computed_at or time.time()

    async def _cancel_any(self, peer: DecodePeer | None, h: Handoff, reason: str) -> None:
        """Tell the decode side the hand-off will not come, whether or not pages were granted
        (none granted: the Cancel leaves a tombstone, so its load recomputes at once instead of
        waiting for timeouts.transfer_s). Only over a link that is up: this never opens one."""
        peer = peer or self.links.find(h.peer)
        if peer is not None:
            await peer.cancel(h.transfer_id, reason)

    def _result(self, r: SendResult) -> None:
        r = dataclasses.replace(r, started_at=self._started.pop(r.transfer_id, 0.0), done_at=time.time())
        self.timeline.observe(r)
        with self._results_lock:
            self._results.append(r)
            if r.ok:
                self._sent += 1
            else:
                self._failed += 1
        self._handoff_log.append(r)

    async def _allocate(self, h: Handoff, n_pages: int) -> Grant:
        for attempt in (1, 2):
            peer = await self.links.get(h.peer)
            try:
                return await peer.allocate(h, n_pages)
            except PeerLost:
                # The connection dropped (the decode instance died or restarted): open a new session once.
                await self.links.drop(h.peer, peer)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _digest(self, blocks: tuple[BlockId, ...], pages: list[int], peer: DecodePeer,
                ready: torch.cuda.Event | None) -> asyncio.Future[int] | None:
        """With ``integrity.verify``: the digest of what this hand-off sends, computed on a worker
        thread while the transfer runs (after the forward that wrote the blocks)."""
        if not self.cfg.integrity.verify:
            return None

        def compute() -> int:
            if ready is not None:
                ready.synchronize()
            return cache_digest(self.kv, self.kv_buffer, blocks, peer.pool, pages)
        return asyncio.get_running_loop().run_in_executor(None, compute)

    def _group_ends(self, n_pages: int) -> tuple[int, ...]:
        """Where each group of a streamed hand-off ends (exclusive page counts, increasing)."""
        mib = self.cfg.transport.group_mib
        per = max(1, (mib << 20) // self.kv.page_bytes) if mib else n_pages
        return tuple(min(a + per, n_pages) for a in range(0, n_pages, per))

    def _watch(self, spec: SendSpec) -> dict:
        """What a transfer loop (groups.py, layered.py) calls: ``check`` raises once the decode
        side ended the hand-off, ``failed`` for a batch that ended otherwise than DONE."""
        return {"check": lambda: self._check_ended(spec.handoff),
                "failed": lambda state, handle: self._check_state(state, handle, spec)}

    def _check_state(self, state: BatchState, handle, spec: SendSpec) -> None:
        if state == BatchState.TIMEOUT:
            raise TransferTimeout("data transfer", config_field="timeouts.data_s", seconds=self.t.data_s,
                                  transfer_id=spec.handoff.transfer_id, peer=spec.handoff.peer)
        if state != BatchState.DONE:
            raise TransferError(f"transport {self.transport.name}: {handle.error or state.name}",
                                transfer_id=spec.handoff.transfer_id, peer=spec.handoff.peer)

    async def _heartbeats(self) -> None:
        """Keep every link alive and renew the decode-side leases of its in-flight hand-offs;
        detect restarted or vanished peers; drop reservations no hand-off took within
        ``timeouts.transfer_s`` (the decode side has stopped waiting by then)."""
        while True:
            await asyncio.sleep(self.t.heartbeat_s)
            stale = time.monotonic() - self.t.transfer_s
            for tid, give_back in self._reserved.stale(stale):
                log.warning("reservation %s unused for timeouts.transfer_s=%.1f s: pages given back", tid,
                            self.t.transfer_s)
                # Not awaited here: a reservation still queued for pages must not stall heartbeats.
                self._spawn(give_back)
            self.links.beat()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
