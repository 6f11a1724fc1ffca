"""Scheduler side of prefix reuse (``cache.enabled``): which prompt tokens the tiers supply.

Per request, in vLLM's order:
  1. ``matched_tokens`` (from ``get_num_new_matched_tokens``): chain-hash the prompt's full
     chunks once, ask the workers how many leading chunks are cached (returns None, i.e. "ask
     again next step", until they answer; ``cache.lookup_timeout_s`` bounds it) and claim the
     cached tokens beyond vLLM's own prefix-cache hit as external, loaded asynchronously;
  2. ``after_alloc``: turn the claim into a CacheLoadSpec for the new blocks;
  3. ``on_finished``: queue a CacheSaveSpec for the prompt's computed full chunks that were not
     cached, and ask vLLM to keep the blocks until the workers have copied them out; end the
     hold the lookup put on the chunks it found (the load, if any, has ended by then).
A claim never covers the prompt's last token: vLLM must compute it to sample.
:func:`save_spec` is shared with the decode side, which saves the prompts it received.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcache_pd._types import ReqId
from lmcache_pd.cache.keys import chain_hashes
from lmcache_pd.cache.lookup import LookupClient
from lmcache_pd.cache.store import Lookup
from lmcache_pd.config import PDConfig
from lmcache_pd.errors import ConfigError
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec, lookup_hold

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class _Req:
    chains: list[bytes]
    """Chain hashes of the prompt's full chunks."""
    usable: int
    """How many of them a load may supply (the chunk holding the last token is computed)."""
    lookup: Lookup | None = None
    local: int = 0
    """vLLM's own (block-aligned) prefix hit when we last answered."""
    loaded_chunks: tuple[int, int] = (0, 0)
    """[first, end) chunk indices of the load, once allocated."""


class CacheScheduler:
    def __init__(self, cfg: PDConfig, *, instance: str, block_size: int, tp_size: int):
        c = cfg.cache
        if c.chunk_tokens % block_size:
            raise ConfigError(f"{c.chunk_tokens} is not a multiple of vLLM's block size {block_size}",
                              field="cache.chunk_tokens")
        self.chunk = c.chunk_tokens
        self.block_size = block_size
        self.tier_names = [t.name for t in c.tiers]
        self.decode_skip = c.decode_skip
        self.client = LookupClient(instance, tp_size, timeout_s=c.lookup_timeout_s)
        self._reqs: dict[ReqId, _Req] = {}
        self._loads: list[CacheLoadSpec] = []
        self._saves: list[CacheSaveSpec] = []
        self._releases: list[ReqId] = []

    def _req(self, request: Request) -> _Req:
        r = self._reqs.get(request.request_id)
        if r is None:
            full = request.num_prompt_tokens // self.chunk
            r = self._reqs[request.request_id] = _Req(
                chain_hashes(request.prompt_token_ids, self.chunk, tenant=request.cache_salt, max_chunks=full),
                (request.num_prompt_tokens - 1) // self.chunk)  # the last token is always computed
        return r

    def chains(self, request: Request) -> list[bytes]:
        """Chain hashes of every full chunk of the prompt (hashed once per request)."""
        return self._req(request).chains if request.prompt_token_ids is not None else []

    def handoff_chains(self, request: Request) -> tuple[bytes, ...]:
        """What a hand-off of this prompt carries for decode-side reuse (``cache.decode_skip``)."""
        return tuple(self.chains(request)) if self.decode_skip else ()

    def close(self) -> None:
        self.client.close()

    def matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.prompt_token_ids is None:
            return 0, False
        r = self._req(request)
        if r.usable * self.chunk <= num_computed_tokens:
            return 0, False  # vLLM's own cache already covers every chunk we could supply
        if r.lookup is None:
            rid = request.request_id
            if not self.client.pending(rid):
                self.client.ask(rid, r.chains[:r.usable], request.cache_salt)
            r.lookup = self.client.poll(rid, wait_s=0.002)
            if r.lookup is None:
                return None, False  # vLLM asks again on its next step
        r.local = num_computed_tokens
        n = r.lookup.hits * self.chunk - num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        r = self._reqs.get(request.request_id)
        if r is None or r.lookup is None or num_external_tokens <= 0:
            return
        start, end = r.local, r.local + num_external_tokens
        if end % self.chunk or end > r.lookup.hits * self.chunk:
            log.warning("request %s: vLLM claimed %d external tokens from %d, not what the cache offered; "
                        "not loading", request.request_id, num_external_tokens, start)
            return
        first, last = start // self.chunk, end // self.chunk
        ids = blocks.get_block_ids()[0]
        r.loaded_chunks = (first, last)
        self._loads.append(CacheLoadSpec(request.request_id, tuple(r.chains[first:last]), request.cache_salt,
                                         (start % self.chunk) // self.block_size,
                                         tuple(ids[start // self.block_size:end // self.block_size]),
                                         hold=lookup_hold(request.request_id)))

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]:
        """Tokens of the load per tier name (the first tier that held each chunk at lookup)."""
        r = self._reqs.get(request.request_id)
        if r is None or r.lookup is None or not num_external_tokens:
            return {}
        out: dict[str, int] = {}
        first, last = r.loaded_chunks
        for i in range(first, last):
            name = self.tier_names[r.lookup.tiers[i]]
            out[name] = out.get(name, 0) + self.chunk
        out[self.tier_names[r.lookup.tiers[first]]] -= r.local - first * self.chunk  # partly held locally
        return {k: v for k, v in out.items() if v > 0}

    def on_finished(self, request: Request, block_ids: list[int]) -> bool:
        """Queue the save of the prompt's new full chunks; True: keep the blocks until it is done."""
        r = self._reqs.pop(request.request_id, None)
        self.client.forget(request.request_id)
        have = r.lookup.hits if r is not None and r.lookup is not None else 0
        if have:
            self._releases.append(request.request_id)
        save = save_spec(request, block_ids, self.chunk, self.block_size, have=have,
                         chains=r.chains if r is not None else None)
        if save is not None:
            self._saves.append(save)
        return save is not None

    def take(self) -> tuple[list[CacheLoadSpec], list[CacheSaveSpec], list[ReqId]]:
        """Loads, saves, and requests whose lookup holds end, queued since the last call."""
        out = (self._loads, self._saves, self._releases)
        self._loads, self._saves, self._releases = [], [], []
        return out


def save_spec(request: Request, block_ids: list[int], chunk: int, block_size: int, *,
              have: int = 0, chains: Sequence[bytes] | None = None) -> CacheSaveSpec | None:
    """The save of a finished request's computed full prompt chunks after the first ``have``
    (known to be cached), or None when there are none. ``chains``: the prompt's chain hashes
    if the caller has them already."""
    if request.prompt_token_ids is None:
        return None
    n = min(request.num_prompt_tokens, request.num_computed_tokens) // chunk
    n = min(n, len(block_ids) * block_size // chunk)
    if n <= have:
        return None
    if chains is None or len(chains) < n:
        chains = chain_hashes(request.prompt_token_ids, chunk, tenant=request.cache_salt, max_chunks=n)
    per = chunk // block_size
    return CacheSaveSpec(request.request_id, tuple(chains[have:n]), request.cache_salt,
                         tuple(block_ids[have * per:n * per]))
