"""Prefix reuse as the connector's scheduler half sees it: one seam per role, with a null
implementation when the feature is off, chosen once by ``prefix_reuse``/``received_reuse``
(the roles hold one and never ask ``cache.enabled`` or ``cache.decode_skip`` themselves).

- :class:`PrefixReuse` (prefill): the tiers supply leading prompt chunks (``cache.enabled``;
  cache_scheduler.py does it), and a hand-off carries the prompt's chain hashes so that the
  decode side may skip chunks it holds (``cache.decode_skip``).
- :class:`ReceivedReuse` (decode, ``cache.decode_skip``): the chain hashes of a received prompt,
  and the save of its chunks into this instance's tiers after the request ends (the next turn's
  hand-off skips them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from lmcache_pd._types import ReqId
from lmcache_pd.cache.keys import chain_hashes
from lmcache_pd.config import PDConfig
from lmcache_pd.connector.cache_scheduler import CacheScheduler, save_spec
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request


class PrefixReuse(Protocol):
    def matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]: ...
    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]: ...
    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None: ...
    def on_finished(self, request: Request, block_ids: list[int]) -> bool: ...
    def take(self) -> tuple[list[CacheLoadSpec], list[CacheSaveSpec], list[ReqId]]: ...
    def handoff_chains(self, request: Request) -> tuple[bytes, ...]: ...
    def close(self) -> None: ...


class NoPrefixReuse:
    """``cache.enabled`` off: vLLM's own prefix cache only; hand-offs carry no chain hashes."""

    def matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]:
        return {}

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        pass

    def on_finished(self, request: Request, block_ids: list[int]) -> bool:
        return False

    def take(self) -> tuple[list[CacheLoadSpec], list[CacheSaveSpec], list[ReqId]]:
        return [], [], []

    def handoff_chains(self, request: Request) -> tuple[bytes, ...]:
        return ()

    def close(self) -> None:
        pass


def prefix_reuse(cfg: PDConfig, *, instance: str, block_size: int) -> PrefixReuse:
    if not cfg.cache.enabled:
        return NoPrefixReuse()
    return CacheScheduler(cfg, instance=instance, block_size=block_size, tp_size=cfg.instance(instance).tp_size)


class ReceivedReuse(Protocol):
    def chains(self, request: Request, num_tokens: int) -> tuple[bytes, ...]: ...
    def save(self, request: Request, block_ids: list[int], chains: tuple[bytes, ...]) -> CacheSaveSpec | None: ...


class NoReceivedReuse:
    """``cache.decode_skip`` (or the cache) off: a hand-off brings every prompt block."""

    def chains(self, request: Request, num_tokens: int) -> tuple[bytes, ...]:
        return ()

    def save(self, request: Request, block_ids: list[int], chains: tuple[bytes, ...]) -> CacheSaveSpec | None:
        return None


class SavedPrompts:
    """Decode-side reuse: received prompts are hashed and saved into this instance's tiers."""

    def __init__(self, chunk_tokens: int, block_size: int):
        self.chunk = chunk_tokens
        self.block_size = block_size

    def chains(self, request: Request, num_tokens: int) -> tuple[bytes, ...]:
        """Chain hashes of every full chunk of the prompt's first ``num_tokens``."""
        if request.prompt_token_ids is None:
            return ()
        return tuple(chain_hashes(request.prompt_token_ids, self.chunk, tenant=request.cache_salt,
                                  max_chunks=num_tokens // self.chunk))

    def save(self, request: Request, block_ids: list[int], chains: tuple[bytes, ...]) -> CacheSaveSpec | None:
        """The save of a finished request's prompt chunks; ``chains``: those hashed when it was
        received (``chains()``), so that they are not hashed again unless the prompt's computed
        part has more full chunks."""
        return save_spec(request, block_ids, self.chunk, self.block_size, chains=chains or None)


def received_reuse(cfg: PDConfig, *, block_size: int) -> ReceivedReuse:
    c = cfg.cache
    return SavedPrompts(c.chunk_tokens, block_size) if c.enabled and c.decode_skip else NoReceivedReuse()
