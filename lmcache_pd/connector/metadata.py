"""What the connector's scheduler side and worker side tell each other each engine step.

Scheduler -> workers: :class:`PDConnectorMetadata` (pickled by vLLM every step: keep it small).
Workers -> scheduler: :class:`PDWorkerMeta` (aggregated over TP workers by vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from lmcache_pd._types import ReqId, TransferId
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec, Handoff, LoadSpec, SendSpec


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    sends: list[SendSpec] = field(default_factory=list)
    """Prefill: hand-offs to start (their requests finished; vLLM holds their blocks for us)."""
    reserves: list[Handoff] = field(default_factory=list)
    """Prefill: hand-offs whose last prompt chunk this step computes: allocate their decode
    pages now, while the forward runs."""
    unreserves: list[TransferId] = field(default_factory=list)
    """Prefill: reserved hand-offs that will not happen (request aborted): give the pages back."""
    abandons: list[TransferId] = field(default_factory=list)
    """Prefill: layered hand-offs whose request vLLM preempted in this step (its blocks are
    freed, and this step's forward may write them for another request): before the forward,
    stop reading them and give the hand-off up (the decode side recomputes)."""
    cache_loads: list[CacheLoadSpec] = field(default_factory=list)
    """Prefix chunks to copy from the cache tiers into new blocks (vLLM counts them as external hits)."""
    cache_saves: list[CacheSaveSpec] = field(default_factory=list)
    """Finished requests' new full prompt chunks to copy out to the cache tiers (blocks held
    until then); on both roles."""
    cache_releases: list[ReqId] = field(default_factory=list)
    """Prefill: finished requests whose lookup held chunks for a load: end those holds."""
    loads: list[LoadSpec] = field(default_factory=list)
    """Decode: loads to start."""
    cancels: list[ReqId] = field(default_factory=list)
    """Decode: loads whose request was aborted; end them now (still reported as finished)."""
    discards: list[TransferId] = field(default_factory=list)
    """Decode: hand-offs that will never be loaded; free their pool pages now."""
    first_steps: list[TransferId] = field(default_factory=list)
    """Decode: hand-offs whose request computes its first token in this step (loaded, now
    scheduled): the last mark of the hand-off's timeline."""


@dataclass(frozen=True)
class LoadOutcome:
    ok: bool
    num_bytes: int
    transfer_s: float
    waited_s: float
    error: str
    cache_tokens: int = 0


@dataclass
class PDWorkerMeta(KVConnectorWorkerMetadata):
    loads: dict[ReqId, LoadOutcome] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PDWorkerMeta)
        merged = dict(self.loads)
        for req_id, o in other.loads.items():
            mine = merged.get(req_id)
            if mine is None:
                merged[req_id] = o
            else:  # TP ranks: the request loaded only if every rank loaded
                merged[req_id] = LoadOutcome(mine.ok and o.ok, mine.num_bytes + o.num_bytes,
                                             max(mine.transfer_s, o.transfer_s), max(mine.waited_s, o.waited_s),
                                             mine.error or o.error, min(mine.cache_tokens, o.cache_tokens))
        return PDWorkerMeta(merged)
