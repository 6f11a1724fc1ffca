"""The decode loader (L5): one thread that moves each requested hand-off from the pool into
vLLM's blocks.

A *load* is the decode worker asking for the KV of one request (``LoadSpec``). It goes through
the phases of ``loads.LoadPhase``, in order, each move checked against ``loads.NEXT``::

    WAITING --> GRANTED --> LANDING --> SCATTERING --> DONE
       |           |  \\________________^   |
       +-----------+-----------+-----------+------> FAILED

- WAITING: until the reservation named by the transfer id appears in the pool (the prefill's
  Allocate was granted), or ``timeouts.transfer_s`` passes (FAILED; the reservation is aborted
  so that a late one is refused), or this decode refused the prefill's handshake (FAILED at
  once: no KV can come from it; ``ControlServer.refusal``).
- GRANTED (the loader, outside its lock): check the reservation holds the same prompt (token
  count, digest, page count); copy the chunks the decode's own tiers hold (``HeldPrefix.fill``);
  plan, and on a GPU upload, the scatter of the pages still to come. Then LANDING, or straight
  to SCATTERING when every page is READY already.
- LANDING: each group of pages the prefill reports landed (streamed hand-off), or each layer
  the data plane saw land in all of the reservation's pages (``Reservation.layers_landed``,
  ``pool.scatter_landed``: a layered hand-off's layers during the prefill's forward, a whole
  one's all at once), is scattered at once, under the pool's reader guard (an abort meanwhile
  cannot hand those pages to anyone else); READY -> SCATTERING; a failed reservation or the
  deadline -> FAILED.
- SCATTERING (outside the lock): claim the reservation, verify its digest
  (``integrity.verify``), copy the pages (and layers) not yet scattered, give the pages back ->
  DONE. (A layer scattered before the digest was checked is in blocks that vLLM recomputes if
  the check fails.)
The copies themselves (plans, ``integrity.verify``, pool -> blocks) are scatter.py's.
Any error -> FAILED: the pages are aborted (or left as a tombstone), the result says why, and
vLLM recomputes the prompt.
*Signaled* loads (a transport with landing words, transport/landing.py; not with
``integrity.verify``, whose check needs TransferDone's digest): the writer, after the hand-off's
last byte, puts the reservation's generation into its landing word and posts the semaphore that
this thread sleeps on (:class:`_Posted`: the pool's changes post it too). A LANDING load whose
word holds its generation goes to SCATTERING at once (``PagePool.claim_signaled``: only while
the reservation is live as that generation), its scatter planned at GRANTED; TransferDone
comes later and finds it consumed. So between the last byte and the load's end there is one
wake-up of this thread, not the prefill's completion thread, its loop, zmq, the control server
and this thread. A load every layer of which landed in every page (tcp's receiver sees each
batch land) ends the same way, without a word. (An earlier design queued the scatter on the GPU behind a word in GPU memory:
a stream blocked in ``cuStreamWaitValue32`` held up a device-wide synchronize in the decode,
which vLLM makes in some steps, and the streams sharing its hardware queue; the words are host
memory now and nothing on the GPU waits.)

*Direct* loads (``transport.direct``): a load whose spec is here when the prefill's Allocate
comes gives the control server its blocks (:meth:`Loader.direct_blocks`), the reservation names
them (``Reservation.direct``), and the prefill writes straight into them: GRANTED plans nothing,
and at READY there is nothing to scatter. A direct load that fails while its prefill may still
write (ended before READY) is reported only once the pool let go of the reservation (its writer
confirmed it stopped, or ``timeouts.data_s`` passed): vLLM frees the blocks when it learns.

Threads: vLLM's forward loop calls :meth:`Loader.submit`, :meth:`Loader.cancel` and
:meth:`Loader.drain`, which never block; the loader thread does every move and copy; the control
server's thread changes reservations in the pool, which wakes the loader (``PagePool.watch``).
The loader's lock guards the loads and their phases. Lock order: the loader's lock, then the
pool's (the loader looks reservations up while holding its own); the pool never calls back
under its lock except to set the loader's wake-up event. A cancel that comes while the loader
copies into the load's blocks (``busy``) takes effect when the copy ends: the blocks are
reported free only once nothing writes into them.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

import torch

from lmcache_pd._types import ReqId, ReservationState
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.reservation import Reservation
from lmcache_pd.errors import PDError, TransferError
from lmcache_pd.handoff import LoadSpec, signal_of
from lmcache_pd.layout import KVLayout, PoolLayout, blocks_for_tokens
from lmcache_pd.node.handoff_log import HandoffLog
from lmcache_pd.node.held_prefix import HeldPrefix
from lmcache_pd.node.loads import LoadPhase, LoadResult, LoadState, PreparedScatter
from lmcache_pd.node.scatter import Scatter
from lmcache_pd.node.timeline import Timeline
from lmcache_pd.threads import thread
from lmcache_pd.transport.landing import LandingWords

log = logging.getLogger(__name__)
_IDLE_S = 0.5
"""The longest the loader sleeps with nothing to do (it wakes earlier for a deadline or a change)."""


class _Posted:
    """The loader's wake-up where it watches landing words: their semaphore, which every writer
    posts after a hand-off's bytes and the pool's changes post too. A count, so a post while the
    loader looks is not lost (``clear`` has nothing to do)."""

    def __init__(self, words: LandingWords):
        self._words = words

    def set(self) -> None:
        self._words.post()

    def clear(self) -> None:
        pass

    def wait(self, timeout_s: float) -> bool:
        return self._words.wait(timeout_s)


class _Step(enum.Enum):
    """What the loader does next for a load, decided under its lock, done outside it."""

    GRANT = "grant"
    LAND = "land"
    SCATTER = "scatter"


class Loader:
    def __init__(self, pool: PagePool, pool_layout: PoolLayout, pool_buffer: torch.Tensor, *, kv: KVLayout,
                 kv_buffer: torch.Tensor, block_size: int, prefix: HeldPrefix, transfer_s: float, group_bytes: int,
                 verify: bool, handoff_log: HandoffLog, timeline: Timeline, name: str = "pd-loader",
                 words: LandingWords | None = None, scatter_landed: bool = True,
                 refusal: Callable[[str], str | None] = lambda peer: None):
        """``transfer_s``: ``timeouts.transfer_s``, the longest a load waits for its pages;
        ``group_bytes``: ``transport.group_mib`` in bytes (a hand-off larger than that is
        streamed: its groups are scattered as they land, each planned then); ``verify``:
        ``integrity.verify``; ``words``: the landing words the pool's transport keeps, one per
        place (pages, then vLLM's blocks; not used with ``verify``, whose check needs
        TransferDone's digest);
        ``scatter_landed``: ``pool.scatter_landed``, scatter layers the data plane saw land whole
        before TransferDone; ``refusal``: why this decode refused a prefill's handshake (the
        control server's), so that a load waiting on it ends at once, not at ``transfer_s``."""
        self.pool = pool
        self.refusal = refusal
        self.pool_layout = pool_layout
        self.kv = kv
        self.scatter = Scatter(pool_layout, pool_buffer, kv=kv, kv_buffer=kv_buffer, verify=verify)
        self.block_size = block_size
        self.prefix = prefix
        self.transfer_s = transfer_s
        self.group_bytes = group_bytes
        self.scatter_landed = scatter_landed
        self._handoff_log = handoff_log
        self._timeline = timeline
        self._loads: dict[ReqId, LoadState] = {}
        self._results: list[LoadResult] = []
        self._settling: list[tuple[str, LoadResult]] = []  # failed direct loads whose writer may still write
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        self._verify = verify
        self._words = words if not verify else None
        self._wake: threading.Event | _Posted = _Posted(self._words) if self._words is not None else threading.Event()
        self._stop = threading.Event()
        self.spins = 0
        """Times the loader watched launched landing words instead of sleeping (``_spin``)."""
        self.spun = 0
        """Loads that ended on a word seen while watching."""
        self._thread = thread(self._run, name)
        pool.watch(self._pool_changed)

    def start(self) -> None:
        self._thread.start()

    def _pool_changed(self) -> None:
        """Under the pool's lock, on the thread that changed it: wake the loader, unless the change
        is the loader's own (it looks again after each step; a post would cost a syscall now and
        a useless turn later)."""
        if threading.current_thread() is not self._thread:
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    # --- vLLM's forward loop (never blocks) ---------------------------------------------------
    def submit(self, spec: LoadSpec) -> None:
        now = time.monotonic()
        # The blocks are the tail of the prompt's pages (a local prefix hit covers the rest).
        local = max(0, blocks_for_tokens(spec.handoff.num_tokens, self.block_size) - len(spec.block_ids))
        with self._lock:
            self._loads[spec.req_id] = LoadState(spec, now, now + self.transfer_s, time.time(), local=local)
        self._wake.set()

    def cancel(self, req_id: ReqId, reason: str = "request aborted") -> None:
        """End a load now (reported as failed), or, while the loader copies into its blocks, as
        soon as that copy is done."""
        with self._lock:
            load = self._loads.get(req_id)
            if load is not None and load.busy:
                load.canceled = reason
                return
            self._loads.pop(req_id, None)
        if load is not None:
            self._fail(load, reason)

    def drain(self, wait_s: float = 0.0) -> list[LoadResult]:
        """Results of ended loads. ``wait_s`` > 0 blocks up to that long for one (benchmarks and
        tests; vLLM's loop never waits)."""
        with self._lock:
            if wait_s > 0 and not self._results:
                self._recorded.wait_for(lambda: bool(self._results), wait_s)
            out, self._results = self._results, []
        return out

    def direct_blocks(self, transfer_id: str, num_pages: int) -> tuple[int, ...]:
        """The control server's thread, at Allocate: the blocks of the load still WAITING for
        this hand-off, for its last ``num_pages`` pages (fewer when vLLM holds some of those
        blocks already: the prefill sends none before them); empty: no such load."""
        with self._lock:
            for load in self._loads.values():
                if load.spec.handoff.transfer_id == transfer_id and load.phase is LoadPhase.WAITING:
                    blocks = load.spec.block_ids
                    return tuple(blocks[len(blocks) - min(num_pages, len(blocks)):])
        return ()

    def waiting(self) -> int:
        with self._lock:
            return len(self._loads)

    @property
    def digests_verified(self) -> int:
        """Hand-offs whose bytes ``integrity.verify`` found as the prefill sent them."""
        return self.scatter.digests_verified

    @property
    def digest_mismatches(self) -> int:
        return self.scatter.digest_mismatches

    # --- the loader thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a change from here on wakes the next wait
            steps, failed, wait = self._next_steps()
            self._report_settled()
            for load, error in failed:
                self._fail(load, error)
            for load, step in steps:
                self._guarded(load, step)
            if not steps and not failed and not self._spin(wait):
                self._wake.wait(wait)

    def _spin(self, wait_s: float) -> bool:
        """Watch the landing words of launched loads (their writer's mark: the last copy is
        queued) instead of sleeping, each load for at most the words' ``spin_s`` (and never past
        ``wait_s``, the next deadline); True if it watched (the caller looks again at once)."""
        words = self._words
        if words is None or words.spin_s <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            watch = []
            for load in self._loads.values():
                if load.busy or load.phase is not LoadPhase.LANDING or load.signal is None:
                    continue
                if not load.spin_until and words.launched(*load.signal):
                    load.spin_until = now + words.spin_s
                if now < load.spin_until:
                    watch.append(load)
        if not watch:
            return False
        self.spins += 1
        hit = words.spin([ld.signal for ld in watch], min(wait_s, min(ld.spin_until for ld in watch) - now))
        if hit is not None:
            with self._lock:
                watch[hit].spun = True
        return True

    def _next_steps(self) -> tuple[list[tuple[LoadState, _Step]], list[tuple[LoadState, str]], float]:
        """Under the lock: each load's next step (it is then busy), the loads that failed (no
        longer listed), and how long to sleep when there is nothing to do."""
        steps: list[tuple[LoadState, _Step]] = []
        failed: list[tuple[LoadState, str]] = []
        with self._lock:
            now = time.monotonic()
            for req_id, load in list(self._loads.items()):
                if load.busy:  # (only between a step's decision and its end)
                    continue
                r = self.pool.lookup(load.spec.handoff.transfer_id)
                outcome = self._decide(load, r, now)
                if isinstance(outcome, _Step):
                    load.busy = True
                    steps.append((load, outcome))
                elif outcome is not None:
                    del self._loads[req_id]
                    failed.append((load, outcome))
            deadline = min((ld.deadline for ld in self._loads.values()), default=now + _IDLE_S)
        # Ready loads first, then landed groups, then planning: the copy a request waits on goes first.
        steps.sort(key=lambda s: (_Step.SCATTER, _Step.LAND, _Step.GRANT).index(s[1]))
        return steps, failed, max(0.001, min(deadline - now, _IDLE_S))

    def _decide(self, load: LoadState, r: Reservation | None, now: float) -> _Step | str | None:
        """A load's next step, an error text when it failed, or None to keep waiting."""
        if r is not None and r.state.failed:
            return f"hand-off ended: {r.reason}"
        if load.phase is LoadPhase.WAITING and r is not None:
            return _Step.GRANT
        if load.phase is LoadPhase.LANDING and r is not None and r.state == ReservationState.READY:
            return _Step.SCATTER
        if load.phase is LoadPhase.LANDING and r is not None and r.state == ReservationState.ALLOCATED and self._proven(load, r):
            load.signaled = True  # every byte is in: scatter what is left and end it, TransferDone or not
            return _Step.SCATTER
        if r is None and (why := self.refusal(load.spec.handoff.peer)):
            return f"this decode refused prefill {load.spec.handoff.peer}'s handshake ({why}): no KV can come from it"
        if now >= load.deadline:
            return f"no KV from prefill within {self.transfer_s:g} s (raise `timeouts.transfer_s` to wait longer)"
        if load.phase is LoadPhase.LANDING and r is not None and (r.landed > load.next_page or self._new_layers(load, r)):
            return _Step.LAND
        return None

    def _proven(self, load: LoadState, r: Reservation) -> bool:
        """Every byte of the hand-off is in before TransferDone says so: its landing word holds
        its generation (written after the bytes), or every layer has landed in every page (tcp's
        receiver saw each batch land; over the others the writer said so, Landed) with no batch
        writing now. Not with ``integrity.verify`` (its check needs TransferDone's digest), nor
        for a reservation several writers fill (one's landing says nothing of the others')."""
        if self._verify or r.senders > 1:
            return False
        if load.signal is not None and self._words is not None and self._words.holds(*load.signal):
            return True
        return not r.direct and r.writers == 0 and len(r.layers_landed) == self.kv.num_layers

    def _new_layers(self, load: LoadState, r: Reservation) -> frozenset[int]:
        """Layers landed whole and not scattered yet (``pool.scatter_landed``). Not for a streamed
        hand-off (``r.landed``: its groups of pages go every layer at once, and no batch of it
        covers a layer's pages whole)."""
        if not self.scatter_landed or r.state != ReservationState.ALLOCATED or r.landed or r.direct:
            return frozenset()
        return r.layers_landed - load.layers_done

    def _guarded(self, load: LoadState, step: _Step) -> None:
        try:
            if step is _Step.GRANT:
                self._grant(load)
            elif step is _Step.LAND:
                self._land(load)
            else:
                self._scatter(load)
        except (PDError, ValueError) as e:  # a hand-off that does not add up (ValueError: its plan)
            self._end_busy(load, str(e))
        except Exception as e:  # noqa: BLE001 - the loader must outlive a bug, or every load would hang
            log.exception("loader crashed on %s", load.spec.handoff.transfer_id)
            self._end_busy(load, f"internal error: {e!r}")
        else:
            self._settle(load)

    def _settle(self, load: LoadState) -> None:
        """The loader is done with the load for now: a DONE load leaves the list (a cancel that
        came during its last copy is too late: the KV is in, and reported), and a cancel that came
        meanwhile ends any other."""
        with self._lock:
            load.busy = False
            ours = self._loads.get(load.spec.req_id) is load
            canceled = load.canceled if ours and load.phase is not LoadPhase.DONE else None
            if ours and (canceled is not None or load.phase is LoadPhase.DONE):
                del self._loads[load.spec.req_id]
        if canceled is not None:
            self._fail(load, canceled)

    def _end_busy(self, load: LoadState, error: str) -> None:
        """A step raised: the load fails with its error (unless it had ended already)."""
        with self._lock:
            load.busy = False
            if self._loads.get(load.spec.req_id) is load:
                del self._loads[load.spec.req_id]
        if load.phase is LoadPhase.DONE:  # the error came after the KV was in and reported
            log.error("loader: %s after the load of %s ended", error, load.spec.handoff.transfer_id)
            return
        self._fail(load, error)

    # --- the steps (outside the lock; the load is busy) -------------------------------------
    def _grant(self, load: LoadState) -> None:
        """GRANTED: check the reservation, copy the held prefix, plan the scatter while the
        pages fly; then LANDING, or SCATTERING if every page is READY already."""
        load.move(LoadPhase.GRANTED)
        r = self.pool.lookup(load.spec.handoff.transfer_id)
        if r is None or r.state.failed:  # ended since the loader looked
            raise TransferError(f"hand-off ended: {r.reason if r is not None else 'its reservation is gone'}",
                                transfer_id=load.spec.handoff.transfer_id)
        # Pages cover the blocks after the skipped ones; vLLM may hold more than those.
        load.next_page = max(0, load.local - r.skip_pages)
        self._validate(load, r)
        try:
            load.cache_tokens = self.prefix.fill(load.spec, load.local, r.skip_pages)
        finally:
            self.prefix.release(load.spec.handoff.transfer_id)
        if r.direct:  # the prefill writes into the blocks themselves: no page left to scatter
            load.next_page = len(r.pages)
        if r.state == ReservationState.READY:
            self._scatter(load)
            return
        load.move(LoadPhase.LANDING)
        load.generation = r.generation  # (what a claim before TransferDone names: _proven)
        if r.signals and self._words is not None:  # watched from now on (_decide), planned or not
            load.signal = signal_of(r.pages, r.direct, self.pool.num_pages, r.generation)
        first, upto = load.next_page, len(r.pages)
        if self.group_bytes and (upto - first) * self.pool_layout.page_bytes > self.group_bytes:
            return  # streamed: its groups are scattered as they land, each planned then
        plan = self.scatter.plan(r, load.spec.block_ids, first, upto)
        load.prepared = PreparedScatter(first, upto, plan, self.scatter.prepare(plan))

    def _land(self, load: LoadState) -> None:
        """LANDING: scatter what landed so far (groups of pages, or whole layers), while the
        prefill side still writes."""
        r = self.pool.begin_read(load.spec.handoff.transfer_id)
        if r is None:  # ended or READY meanwhile: the next look says which
            return
        try:
            if r.landed > load.next_page:
                self.scatter.pages(load, r, r.landed)
            elif layers := self._new_layers(load, r):
                self.scatter.layers(load, r, layers)
        finally:
            self.pool.end_read(r)  # whatever happened: a leaked guard would hold the pages forever

    def _scatter(self, load: LoadState) -> None:
        """SCATTERING: claim the READY reservation, copy what is left, give the pages back."""
        load.move(LoadPhase.SCATTERING)
        spec = load.spec
        tid = spec.handoff.transfer_id
        load.ready_at = time.time()
        if load.signaled:  # (None: it ended meanwhile, so its pages may hold another hand-off's bytes)
            r = self.pool.claim_signaled(tid, load.generation)
            if r is None:
                raise TransferError("hand-off ended as its last bytes landed", transfer_id=tid)
        else:
            r = self.pool.claim(tid)
        try:
            self.scatter.verify(r)
            self.scatter.pages(load, r, len(r.pages))
            if r.direct:  # every layer of each of its blocks, written there by the prefill (counted
                # here: a signaled load ends before TransferDone brings the prefill's count)
                load.nbytes = len(r.direct) * self.kv.page_bytes
            if not self.pool.consuming(tid):  # ended while we copied: its pages may hold another's bytes
                raise TransferError("hand-off ended while its pages were loaded", transfer_id=tid)
        except BaseException:
            if self.pool.consuming(tid):  # (else its end returned the pages)
                self.pool.free(tid, now=time.monotonic())
            raise
        load.move(LoadPhase.DONE)
        result = LoadResult(spec.req_id, tid, True, load.nbytes, r.seconds,
                            time.monotonic() - load.t0, scatter_s=load.scatter_s, groups=load.groups,
                            planned_ahead=load.planned_ahead, cache_tokens=load.cache_tokens,
                            submitted_at=load.submitted_at, ready_at=load.ready_at, done_at=time.time(),
                            early_layers=len(load.layers_done), direct=bool(r.direct), signaled=load.signaled,
                            spun=load.spun)
        self.spun += load.spun
        # vLLM's next look finds it before the pages go back: freeing them wakes the control server
        # (an Allocate may be waiting for pages), whose turn would take the GIL from us first.
        self._publish(result)
        try:
            self.pool.free(tid, now=time.monotonic())
        except PDError as e:  # (ended since the check above: its end returns the pages; the KV is in)
            log.warning("returning the pages of %s after its load: %s", tid, e)
        self._observe(result)

    def _validate(self, load: LoadState, r: Reservation) -> None:
        """The reservation holds this request's prompt."""
        spec = load.spec
        if r.claim.num_tokens != spec.handoff.num_tokens or r.claim.prompt_digest != spec.handoff.prompt_digest:
            raise TransferError("prefill computed a different prompt (token count or digest differs)",
                                transfer_id=spec.handoff.transfer_id)
        n_pages = blocks_for_tokens(spec.handoff.num_tokens, self.block_size)
        if r.skip_pages + len(r.pages) != n_pages or not 0 < len(spec.block_ids) <= n_pages:
            raise TransferError(f"{r.skip_pages} + {len(r.pages)} pages and {len(spec.block_ids)} blocks for "
                                f"{spec.handoff.num_tokens} tokens", transfer_id=spec.handoff.transfer_id)
        n = min(len(r.pages), len(spec.block_ids))
        if r.direct and r.direct != tuple(spec.block_ids[len(spec.block_ids) - n:]):
            raise TransferError("the direct hand-off names other blocks than this load's",
                                transfer_id=spec.handoff.transfer_id)

    # --- outcomes -------------------------------------------------------------------------
    def _fail(self, load: LoadState, error: str) -> None:
        """FAILED: the pages go back (or a tombstone refuses a late reservation), the hold ends.
        A direct load whose prefill may still write into its blocks is reported once it stopped."""
        load.move(LoadPhase.FAILED)
        now = time.monotonic()
        tid = load.spec.handoff.transfer_id
        r = self.pool.lookup(tid)
        self.pool.abort(tid, reason=error, now=now)
        self.prefix.release(tid)
        log.warning("load of %s for %s failed, recomputing: %s", tid, load.spec.req_id, error)
        result = LoadResult(load.spec.req_id, tid, False, waited_s=now - load.t0, error=error,
                            submitted_at=load.submitted_at, ready_at=load.ready_at, done_at=time.time())
        if r is not None and r.direct and self.pool.held(tid):
            with self._lock:
                self._settling.append((tid, result))
            return
        self._record(result)

    def _report_settled(self) -> None:
        """Report the failed direct loads whose writer stopped (the pool let go of their pages)."""
        with self._lock:
            if not self._settling:
                return
            done = [(tid, res) for tid, res in self._settling if not self.pool.held(tid)]
            self._settling = [s for s in self._settling if s not in done]
        for _, res in done:
            self._record(res)

    def _record(self, result: LoadResult) -> None:
        self._publish(result)
        self._observe(result)

    def _publish(self, result: LoadResult) -> None:
        """The result, for vLLM's next ``drain``."""
        with self._lock:
            self._results.append(result)
            self._recorded.notify_all()

    def _observe(self, result: LoadResult) -> None:
        """Its timeline's histograms and the hand-off log (a file write: after the result is out)."""
        self._timeline.observe(result)
        self._handoff_log.append(result)

