"""What a decode load is: its outcome (LoadResult), its phases (LoadPhase, with the moves
between them) and the loader's own state of the worker's request (LoadSpec, handoff.py) (L5;
the loader is loader.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lmcache_pd._types import ReqId, TransferId
from lmcache_pd.handoff import LoadSpec
from lmcache_pd.layout import RangePlan
from lmcache_pd.ops import PreparedCopy


@dataclass(frozen=True)
class LoadResult:
    req_id: ReqId
    transfer_id: TransferId
    ok: bool
    num_bytes: int = 0
    transfer_s: float = 0.0
    """Data-plane time measured by the prefill side."""
    waited_s: float = 0.0
    """From submit_load to the pages being in vLLM's blocks."""
    error: str = ""
    scatter_s: float = 0.0
    """Time spent copying pool pages into vLLM's blocks (summed over the groups)."""
    groups: int = 0
    """Copies it took: 1, or more when groups were scattered while the rest was in flight."""
    planned_ahead: bool = False
    """The last copy was planned (on a GPU, uploaded) while the pages were still in flight."""
    cache_tokens: int = 0
    """Prompt tokens copied from this instance's own cache tiers instead of transferred."""
    submitted_at: float = 0.0
    """Wall clock (``time.time()``) when the decode worker asked for the KV (its request was
    scheduled); with the prefill's ``started_at``/``done_at``, a hand-off's timeline."""
    ready_at: float = 0.0
    """Wall clock when the loader found every page in the pool (READY); 0 if never."""
    done_at: float = 0.0
    """Wall clock when the load ended (pages in vLLM's blocks, or failed)."""
    signaled: bool = False
    """Ended before TransferDone came, on proof that every byte was in: the prefill's landing
    signal (transport/landing.py), or every layer landed in every page (tcp's receiver saw each
    batch land); its ``transfer_s`` is then unknown here (0)."""
    early_layers: int = 0
    """Layers scattered as soon as the data plane saw them land, before TransferDone came
    (``pool.scatter_landed``; a layered hand-off's during the prefill's forward)."""
    direct: bool = False
    """The prefill wrote straight into the blocks (``transport.direct``): nothing was scattered."""
    spun: bool = False
    """Its landing word was seen while the loader watched it (a launched mark, transport/landing.py),
    not on the semaphore's post."""


class LoadPhase(enum.Enum):
    """Where a load stands (the loader, loader.py, moves it; ``NEXT`` says where it may go)."""

    WAITING = "waiting"
    """Asked for; no pages granted to its transfer id yet (the prefill's Allocate has not come,
    or waits for pages)."""
    GRANTED = "granted"
    """Pages granted; the loader checks that the reservation holds this request's prompt, copies
    the chunks the decode's own tiers hold (held_prefix.py) and plans the scatter of the rest."""
    LANDING = "landing"
    """Planned; groups of pages the prefill reports landed are scattered as they land, under the
    pool's reader guard, while the rest is in flight."""
    SCATTERING = "scattering"
    """Every page READY and claimed: the last copy into vLLM's blocks, then the pages go back."""
    DONE = "done"
    FAILED = "failed"
    """Ended without the KV (failed hand-off, wrong prompt, deadline, request aborted): vLLM
    recomputes the prompt."""


NEXT: dict[LoadPhase, frozenset[LoadPhase]] = {
    LoadPhase.WAITING: frozenset({LoadPhase.GRANTED, LoadPhase.FAILED}),
    LoadPhase.GRANTED: frozenset({LoadPhase.LANDING, LoadPhase.SCATTERING, LoadPhase.FAILED}),
    LoadPhase.LANDING: frozenset({LoadPhase.SCATTERING, LoadPhase.FAILED}),
    LoadPhase.SCATTERING: frozenset({LoadPhase.DONE, LoadPhase.FAILED}),
    LoadPhase.DONE: frozenset(),
    LoadPhase.FAILED: frozenset(),
}
"""The allowed moves, in order: WAITING -> GRANTED -> LANDING -> SCATTERING -> DONE (GRANTED goes
straight to SCATTERING when every page is READY by then); any phase but the last two -> FAILED."""


@dataclass
class LoadState:
    """The loader's own state of one load; guarded by the loader's lock."""

    spec: LoadSpec
    t0: float
    deadline: float
    submitted_at: float = 0.0
    ready_at: float = 0.0
    local: int = 0
    """Leading blocks of the prompt vLLM holds already (its own prefix cache)."""
    phase: LoadPhase = LoadPhase.WAITING
    busy: bool = False
    """The loader works on this load outside its lock (copying into its blocks): a cancel
    meanwhile is kept in ``canceled`` and takes effect when that work ends."""
    canceled: str | None = None
    next_page: int = 0
    """Index into the reservation's pages of the first page not scattered yet."""
    cache_tokens: int = 0
    """Prompt tokens copied from this instance's own tiers instead of transferred."""
    scatter_s: float = 0.0
    groups: int = 0
    nbytes: int = 0
    prepared: PreparedScatter | None = None
    """The scatter of the pages still to come, planned while waiting for them."""
    planned_ahead: bool = False
    signal: tuple[int, int] | None = None
    """Its landing word and the value that says its bytes are in (transport/landing.py), where
    the loader watches one for it; ``signaled`` once it held that value."""
    signaled: bool = False
    spin_until: float = 0.0
    """Monotonic time until which the loader watches its launched word (set when it first sees
    the mark; ``spin_s`` of the landing words later)."""
    spun: bool = False
    generation: int = 0
    """Its reservation's generation (a claim before TransferDone names it: ``claim_signaled``)."""
    layers_done: frozenset[int] = frozenset()
    """Layers whose pages ``[next_page, end)`` are scattered already: they landed whole before
    TransferDone (``Reservation.layers_landed``)."""

    def move(self, phase: LoadPhase) -> None:
        if phase not in NEXT[self.phase]:
            raise AssertionError(f"load of {self.spec.handoff.transfer_id}: {self.phase.name} -> {phase.name} "
                                 "is not a move of LoadPhase (loads.NEXT)")
        self.phase = phase


@dataclass(frozen=True)
class PreparedScatter:
    first: int
    upto: int
    plan: RangePlan
    copy: PreparedCopy | None  # uploaded on the loader's stream (GPU), else None
