"""What a decode load is: its outcome (LoadResult) and the loader's own state of the worker's
request (LoadSpec, handoff.py) (L5; the loader is receiver.py)."""

from __future__ import annotations

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


@dataclass
class LoadState:
    spec: LoadSpec
    t0: float
    deadline: float
    submitted_at: float = 0.0
    ready_at: float = 0.0
    local: int = 0
    """Leading blocks of the prompt vLLM holds already (its own prefix cache)."""
    bound: bool = False
    """``next_page`` was set from the reservation (its skipped pages known)."""
    next_page: int = 0
    """Index into the reservation's pages of the first page not scattered yet."""
    cached: bool = False
    """The blocks the decode's own cache supplies were copied in (or there were none)."""
    cache_tokens: int = 0
    checked: bool = False
    """The reservation was found to hold this request's prompt."""
    scatter_s: float = 0.0
    groups: int = 0
    nbytes: int = 0
    prepared: PreparedScatter | None = None
    """The scatter of the pages still to come, planned while waiting for them."""
    planned: bool = False
    """Planning ahead was tried (once per load)."""
    planned_ahead: bool = False
    busy: bool = False
    """The loader is copying into this load's blocks right now (landed pages, cached chunks)."""
    canceled: str | None = None
    """Canceled while busy: the loader ends it as soon as its copy is done."""


@dataclass(frozen=True)
class PreparedScatter:
    first: int
    upto: int
    plan: RangePlan
    copy: PreparedCopy | None  # uploaded on the loader's stream (GPU), else None
