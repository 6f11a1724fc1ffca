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
To a decode of a wider TP a hand-off has several lanes, one per decode rank that holds some
of this rank's KV heads (links.Lane): steps 2 to 4 run on every lane at once (lanes.py), and
the hand-off is ok only when every lane is.
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
import logging
import threading
import time
from concurrent.futures import Future

import torch

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd import transport as transports
from lmcache_pd._types import BatchState, PeerName, TransferId
from lmcache_pd.device_clock import Stamp
from lmcache_pd.errors import PDError, PeerLost, TransferError, TransferTimeout
from lmcache_pd.handoff import Handoff, SendSpec
from lmcache_pd.layout import KVLayout, RangePlan, blocks_for_tokens
from lmcache_pd.node.groups import send_groups
from lmcache_pd.node.handoff_log import HandoffLog
from lmcache_pd.node.lanes import LaneIO, LaneSent, each, layers_sent, send_lane
from lmcache_pd.node.layered import LayerMarks, Pieces, forward_reported
from lmcache_pd.node.links import Lane, Links
from lmcache_pd.node.loop import LoopThread
from lmcache_pd.node.on_caller import Launched, Launcher
from lmcache_pd.node.peer import Grant
from lmcache_pd.node.reservations import Reservations
from lmcache_pd.node.send_result import SendResult
from lmcache_pd.node.timeline import Timeline, forward_end
from lmcache_pd.node.worker import NodeConfig, Worker

log = logging.getLogger(__name__)


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
        self._loop = LoopThread(f"pd-sender-{worker.rank}")
        self.links = Links(worker, cfg, kv=kv, keys=self.keys, transport=self.transport, on_ended=self._on_ended)
        self._ended: collections.OrderedDict[tuple[PeerName, TransferId], str] = collections.OrderedDict()
        """Hand-offs the decode side ended while we wrote them (P.Ended): stop, and confirm."""
        self._results: list[SendResult] = []
        self._results_lock = threading.Lock()
        self._started: dict[TransferId, float] = {}  # wall clock at each hand-off's start (timeline)
        self._ends: dict[TransferId, Stamp] = {}  # a whole hand-off's forward end on the GPU (timeline)
        self._sent = self._failed = 0
        self._abandoned = 0  # given up before the last chunk: the request was preempted
        self._reserved = Reservations(self._allocate_pages, lambda h, grants, blocks: self._launcher.prepare(h, grants, blocks))
        self._background: set[asyncio.Task[None]] = set()
        self._beats: asyncio.Task[None] | None = None
        self._handoff_log = HandoffLog(cfg.handoff_log, instance=worker.instance, rank=worker.rank, role="prefill")
        self.timeline = Timeline.prefill()
        self._layered: dict[TransferId, tuple[Handoff, Pieces]] = {}
        """Layered hand-offs under way (loop thread): an unreserve stops them."""
        self._launch_here = not cfg.integrity.verify  # (whose digest is computed on the loop's side)
        self._io = LaneIO(self.transport, kv, kv_buffer, data_s=self.t.data_s, group_mib=cfg.transport.group_mib,
                          verify=cfg.integrity.verify, watch=self._watch,
                          landed_on_shared_gpu=cfg.transport.landed_on_shared_gpu, post_layers=cfg.transport.post_layers)
        self._launcher = Launcher(self._io, self._reserved, worker.compat.block_size)

    def start(self) -> None:
        self._io.region = self.transport.register(self.kv_buffer, self.kv.extents)
        self._loop.start()
        self._loop.call(self._start(), 5.0)

    async def _start(self) -> None:
        self.links.start()
        self._beats = asyncio.get_running_loop().create_task(self._heartbeats(), name="pd-heartbeat")

    def submit(self, spec: SendSpec, ready: torch.cuda.Event | None = None, *, computed: Stamp | None = None) -> None:
        """Start a hand-off (thread-safe, returns at once).

        ``ready``: a CUDA event recorded on vLLM's stream after the forward that wrote these
        blocks; the copy is ordered after it (on the GPU by stream-ordered transports, else by
        waiting for it here, on the sender's thread). ``computed``: that forward's end on the
        GPU, where the timeline starts (as a layered hand-off's; else ``spec.computed_at``).
        With its pages reserved and granted, the hand-off is planned and submitted here, on the
        caller's thread (on_caller.py; on a GPU only by a stream-ordered transport, which
        orders it after ``ready`` on the device); the sender's loop then only waits for it and
        sends TransferDone.
        """
        if computed is not None:
            self._ends[spec.handoff.transfer_id] = computed
        launched = self._launcher.launch(spec, ready) if self._launch_here else None
        self._loop.submit(self._send(spec, ready, launched=launched))

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
        async def tell(lane: Lane) -> None:
            try:
                await (await self.links.get(h.peer, lane)).cancel(h.transfer_id, reason)
            except (PDError, OSError) as e:  # its load there ends with timeouts.transfer_s instead
                log.info("could not tell %s rank %d that hand-off %s will not come: %s", h.peer, lane.rank,
                         h.transfer_id, e)
        try:
            lanes = self.links.lanes(h.peer)
        except PDError as e:
            log.info("hand-off %s given up: %s", h.transfer_id, e)
            return
        await asyncio.gather(*(tell(lane) for lane in lanes))

    def reserve(self, handoff: Handoff, blocks: tuple[int, ...] | None = None) -> Future[None]:
        """Allocate a coming hand-off's decode pages now (thread-safe, returns at once).

        The hand-off with the same transfer id then finds its pages granted; ``blocks``, the
        blocks it will send when known: its launch is then laid out at the grant (on_caller.py). The future ends
        when the pages are granted, or with the allocation's error (the hand-off then fails
        the same way, and the decode side recomputes)."""
        return self._loop.submit(self._reserved.reserve(handoff, blocks))

    def unreserve(self, transfer_id: TransferId, reason: str = "request ended without a hand-off") -> None:
        """The hand-off will not come (request aborted): give its reserved pages back, and stop
        it if it is a layered one already under way."""
        self._loop.submit(self._unreserve(transfer_id, reason))

    def shares_gpu(self, peer: PeerName) -> bool:
        """Whether decode instance ``peer``'s pool is on our GPU, in another process
        (``Transport.shares_device``) for every lane, as its links say (any thread: it only reads
        them). False while a lane has no link: before the first hand-off to it, or after a drop;
        and for a name that is no decode of the deployment (its hand-off fails saying so)."""
        try:
            links = [self.links.find(peer, lane.rank) for lane in self.links.lanes(peer)]
        except PeerLost:
            return False
        return bool(links) and all(link is not None and self.transport.shares_device(link.peer_id, self._io.region)
                                   for link in links)

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
        hand-off stops at its next check (woken for it) and its Cancel confirms no more bytes."""
        self._ended[(peer, msg.transfer_id)] = msg.reason
        if (layered := self._layered.get(msg.transfer_id)) is not None:
            layered[1].wake()
        while len(self._ended) > 4096:
            self._ended.popitem(last=False)

    def _check_ended(self, h: Handoff) -> None:
        reason = self._ended.get((h.peer, h.transfer_id))
        if reason is not None:
            raise TransferError(f"the decode side ended the hand-off: {reason}", transfer_id=h.transfer_id,
                                peer=h.peer)

    # --- reservations (reservations.py) ---------------------------------------------------
    async def _allocate_pages(self, h: Handoff) -> tuple[Grant, ...]:
        """Pages on every lane of the hand-off (one per decode rank it writes to; a lane that
        fails gives the others' pages back)."""
        n_pages = blocks_for_tokens(h.num_tokens, self.worker.compat.block_size)
        grants = await each([self._allocate(h, lane, n_pages) for lane in self.links.lanes(h.peer)],
                            undo=lambda g: g.peer.cancel(h.transfer_id, "the hand-off's other lane failed"))
        for grant in grants:
            grant.peer.track(h.transfer_id)  # heartbeats renew the pages' lease until the hand-off ends
        return tuple(grants)

    async def _unreserve(self, transfer_id: TransferId, reason: str) -> None:
        if (layered := self._layered.get(transfer_id)) is not None:
            # It stops at its next check, woken for it now; its Cancel returns the pages.
            self._ended[(layered[0].peer, transfer_id)] = reason
            layered[1].wake()
        await self._reserved.give_back(transfer_id, reason)

    async def _take_reservation(self, spec: SendSpec, n_pages: int) -> tuple[tuple[Grant, ...], bool]:
        """The pages reserved for this hand-off, one grant per lane (and True), else allocated
        now (and False)."""
        grants = await self._reserved.take(spec.handoff.transfer_id)
        if grants is None:
            return await self._allocate_pages(spec.handoff), False
        for grant in grants:
            if grant.skip + len(grant.pages) != n_pages:  # both come from the same request: a bug if ever seen
                await self._cancel_any(grants, spec.handoff, "reservation of the wrong size")
                for g in grants:
                    g.peer.untrack(spec.handoff.transfer_id)
                raise TransferError(f"reserved {grant.skip} + {len(grant.pages)} pages, the hand-off needs "
                                    f"{n_pages}", transfer_id=spec.handoff.transfer_id)
        return grants, True

    # --- one hand-off ---------------------------------------------------------------------
    async def _send(self, spec: SendSpec, ready: torch.cuda.Event | None = None,
                    pieces: Pieces | None = None, launched: Launched | None = None) -> None:
        t0 = launched.t0 if launched is not None else time.monotonic()
        self._started[spec.handoff.transfer_id] = launched.started_at if launched is not None else time.time()
        # A layered hand-off also waits for the forwards that compute its layers: data_s more
        # from each piece on (a chunked prompt's last piece may come many steps later).
        limit = self.handoff_deadline_s() + (self.t.data_s if pieces is not None else 0.0)
        if pieces is not None:
            self._layered[spec.handoff.transfer_id] = (spec.handoff, pieces)
        try:
            async with asyncio.timeout(limit) as deadline:
                loop = asyncio.get_running_loop()
                renew = lambda: deadline.reschedule(max(deadline.when() or 0.0, loop.time() + limit))  # noqa: E731
                await self._send_steps(spec, ready, t0, pieces, launched, renew)
        except TimeoutError:  # a step outlived its own deadline: a bug, but the blocks must come back
            # (the steps' own ``finally`` already took the transfer off its link's heartbeats)
            log.error("hand-off %s outlived %.1f s (the sum of its timeouts.*): abandoned", spec.handoff.transfer_id, limit)
            await self._cancel_any((), spec.handoff, "hand-off abandoned")
            self._result(SendResult(spec.req_id, spec.handoff.transfer_id, False, error=f"hand-off took over {limit:g} s"))
        finally:
            self._layered.pop(spec.handoff.transfer_id, None)

    async def _send_steps(self, spec: SendSpec, ready: torch.cuda.Event | None, t0: float,
                          pieces: Pieces | None, launched: Launched | None, renew) -> None:
        grants: tuple[Grant, ...] = ()
        try:
            if launched is not None:  # planned and submitted on the caller's thread
                self._reserved.forget(spec.handoff.transfer_id)
                grants = launched.grants
                if launched.error:  # (what was submitted stops, then every lane is told: below)
                    for _, _, handle in launched.lanes:
                        handle.close()
                    raise TransferError(launched.error, transfer_id=spec.handoff.transfer_id)
                sent = await each([self._landed(spec, launched, *lane) for lane in launched.lanes])
                await self._done(spec, sent, True, t0, launched.t0, launched.started_at, None, on_caller=True,
                                 prepared=launched.prepared == len(launched.lanes))
                return
            n_pages = blocks_for_tokens(spec.handoff.num_tokens, self.worker.compat.block_size)
            if len(spec.block_ids) < n_pages and spec.final:  # (a first piece of several has fewer)
                await self._unreserve(spec.handoff.transfer_id, "hand-off refused")
                raise TransferError(f"{len(spec.block_ids)} blocks for {spec.handoff.num_tokens} tokens",
                                    transfer_id=spec.handoff.transfer_id)
            grants, reserved = await self._take_reservation(spec, n_pages)
            self._check_ended(spec.handoff)
            t_alloc, granted_at = time.monotonic(), time.time()
            lanes = await each([send_lane(self._io, spec, g, n_pages, ready, pieces, renew) for g in grants])
            await self._done(spec, lanes, reserved, t0, t_alloc, granted_at, pieces)
        except (PDError, OSError) as e:
            log.warning("hand-off %s to %s failed, decode will recompute: %s", spec.handoff.transfer_id, spec.handoff.peer, e)
            await self._cancel_any(grants, spec.handoff, str(e))
            self._result(SendResult(spec.req_id, spec.handoff.transfer_id, False, error=str(e)))
        except Exception as e:  # noqa: BLE001 - a bug must not leave vLLM's blocks held forever
            log.exception("hand-off %s crashed", spec.handoff.transfer_id)
            await self._cancel_any(grants, spec.handoff, repr(e))
            self._result(SendResult(spec.req_id, spec.handoff.transfer_id, False, error=repr(e)))
        finally:
            for grant in grants:
                grant.peer.untrack(spec.handoff.transfer_id)

    async def _landed(self, spec: SendSpec, launched: Launched, grant: Grant, plan: RangePlan,
                      handle) -> LaneSent:
        """A lane submitted on the caller's thread, once its bytes are in the decode's pool."""
        _, last_byte_at = await send_groups(self.transport, self._io.region, grant.peer, [plan], (len(grant.pages),),
                                            spec.handoff, ticket=b"", data_s=self.t.data_s, submitted=[handle],
                                            **self._watch(spec))
        return LaneSent(grant, [plan], None, (handle.began_at or launched.started_at, last_byte_at),
                        time.monotonic() - launched.t0)

    async def _done(self, spec: SendSpec, lanes: list[LaneSent], reserved: bool, t0: float, t_alloc: float,
                    granted_at: float, pieces: Pieces | None, *, on_caller: bool = False,
                    prepared: bool = False) -> None:
        """Every lane's bytes are in its decode rank's pool: TransferDone on each, then the result."""
        tid = spec.handoff.transfer_id
        checked = [await s.digest if s.digest is not None else None for s in lanes]
        t_done = time.monotonic()
        await each([s.grant.peer.transfer_done(tid, s.nbytes, s.seconds, d) for s, d in zip(lanes, checked)])
        nbytes = sum(s.nbytes for s in lanes)
        seconds = max((s.seconds for s in lanes), default=0.0)
        skip = min((s.grant.skip for s in lanes), default=0)
        n_blocks = max((s.grant.skip + len(s.grant.pages) for s in lanes), default=0)
        log.info("sent %s: %d B in %.2f ms (%.2f GB/s, %d lane%s, %d %s; %d of %d blocks held by the decode side), "
                 "hand-off %.2f ms", tid, nbytes, seconds * 1e3, nbytes / max(seconds, 1e-9) / 1e9, len(lanes),
                 "" if len(lanes) == 1 else "s", sum(len(s.plans) for s in lanes),
                 "layers" if pieces is not None else "groups", skip, n_blocks, (time.monotonic() - t0) * 1e3)
        self._result(SendResult(spec.req_id, tid, True, nbytes, seconds,
                                allocate_s=t_alloc - t0, done_s=time.monotonic() - t_done, reserved=reserved,
                                skipped_pages=skip, granted_at=granted_at,
                                computed_at=await self._computed_at(spec, pieces),
                                first_byte_at=min((s.span[0] for s in lanes), default=0.0),
                                last_byte_at=max((s.span[1] for s in lanes), default=0.0),
                                layered=pieces is not None, on_caller=on_caller, prepared=prepared,
                                pieces=len(pieces) if pieces is not None else 0,
                                posted=bool(lanes) and all(s.posted for s in lanes),
                                direct=any(s.grant.blocks for s in lanes), layers_sent_at=layers_sent(lanes),
                                last_chunk_at=pieces.final.added_at if pieces is not None and pieces.final else 0.0))

    async def _computed_at(self, spec: SendSpec, pieces: Pieces | None) -> float:
        """When the prompt's last chunk was computed (timeline.forward_end). A layered hand-off
        often lands before its last forward ends (the last layer's MLP and the logits run after
        its KV went): the record waits for that end, up to ``timeouts.data_s`` (then now, a
        lower bound), so that the timeline shows the transfer ending inside the forward."""
        final = pieces.final if pieces is not None else None
        if final is None:
            return await forward_end(self._ends.pop(spec.handoff.transfer_id, None), spec.computed_at, self.t.data_s)
        await forward_reported(pieces, final, self.t.data_s)
        return await forward_end(final.marks.stamp, final.marks.computed_at or time.time(), self.t.data_s)

    async def _cancel_any(self, grants: tuple[Grant, ...], h: Handoff, reason: str) -> None:
        """Tell the decode side the hand-off will not come, on every lane, whether or not pages
        were granted there (none granted: the Cancel leaves a tombstone, so its load recomputes
        at once instead of waiting for timeouts.transfer_s). Only over links that are up: this
        never opens one."""
        peers = {g.peer.rank: g.peer for g in grants}
        try:
            lanes = self.links.lanes(h.peer)
        except PDError:  # (a peer not in the deployment: no link to it either)
            lanes = []
        for lane in lanes:
            peers.setdefault(lane.rank, self.links.find(h.peer, lane.rank))
        await asyncio.gather(*(p.cancel(h.transfer_id, reason) for p in peers.values() if p is not None))

    def _result(self, r: SendResult) -> None:
        self._ends.pop(r.transfer_id, None)
        r = dataclasses.replace(r, started_at=self._started.pop(r.transfer_id, 0.0), done_at=time.time())
        self.timeline.observe(r)
        with self._results_lock:
            self._results.append(r)
            if r.ok:
                self._sent += 1
            else:
                self._failed += 1
        self._handoff_log.append(r)

    async def _allocate(self, h: Handoff, lane: Lane, n_pages: int) -> Grant:
        for attempt in (1, 2):
            peer = await self.links.get(h.peer, lane)
            try:
                return await peer.allocate(h, n_pages)
            except PeerLost:
                # The connection dropped (the decode instance died or restarted): open a new session once.
                await self.links.drop(peer)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

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
