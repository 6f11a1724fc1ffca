"""Decode-side reuse as the receiver sees it (L5): one seam, with a null implementation when the
feature is off, chosen once by :func:`held_prefix` (the control server and the loader never ask
``cache.enabled`` or ``cache.decode_skip`` themselves).

At Allocate the control server asks how many leading pages of the prompt this worker's own
tiers hold (:meth:`HeldPrefix.hold`); those chunks are held for the hand-off and the prefill side
does not send them. The loader then copies them into the request's vLLM blocks
(:meth:`HeldPrefix.fill`), keyed by the decode's own chain hashes, and the hold ends
(:meth:`HeldPrefix.release`, also when the allocation is refused or the load fails).
"""

from __future__ import annotations

from typing import Protocol

from lmcache_pd import protocol as P
from lmcache_pd._types import TransferId
from lmcache_pd.config import CacheConfig
from lmcache_pd.control.server_stats import NothingHeld
from lmcache_pd.errors import TransferError
from lmcache_pd.handoff import CacheLoadSpec, LoadSpec
from lmcache_pd.node.cache_io import CacheIO, CacheMiss, NoCacheIO


class HeldPrefix(Protocol):
    def hold(self, msg: P.Allocate) -> int:
        """Leading pages of the prompt this worker's tiers hold (whole chunks, fewer than
        ``num_pages``), held for the transfer id. Runs on the control server's thread."""

    def release(self, transfer_id: TransferId) -> None:
        """End the hand-off's hold (the allocation was refused, or its load ended)."""

    def fill(self, spec: LoadSpec, local: int, skip: int) -> int:
        """Copy the prompt's blocks ``[local, skip)`` (skipped by the prefill side, not already in
        vLLM's prefix cache) from the tiers into the request's first blocks; the tokens copied.
        Raises TransferError when they cannot be (the load then fails and vLLM recomputes)."""


class NoHeldPrefix(NothingHeld):
    """``cache.decode_skip`` off (or no cache): nothing held, every page is sent."""

    def fill(self, spec: LoadSpec, local: int, skip: int) -> int:
        if skip > local:  # never granted here: a reservation that says so is not ours
            raise TransferError(f"the reservation skips {skip} pages but this instance holds none "
                                "(cache.decode_skip is off)", transfer_id=spec.handoff.transfer_id)
        return 0


class CachedPrefix:
    """Decode-side reuse from this worker's local tiers (``cache.decode_skip``)."""

    def __init__(self, cache: CacheIO, block_size: int):
        self.cache = cache
        self.block_size = block_size

    def hold(self, msg: P.Allocate) -> int:
        per = self.cache.chunk_blocks
        if len(msg.chains) * self.cache.cfg.chunk_tokens > msg.num_tokens:
            return 0  # more full chunks than the prompt has tokens: not a prompt of this size
        usable = (msg.num_pages - 1) // per  # at least one page is always sent
        return self.cache.hold_prefix(_owner(msg.transfer_id), msg.chains, msg.tenant, usable) * per

    def release(self, transfer_id: TransferId) -> None:
        self.cache.release(_owner(transfer_id))

    def fill(self, spec: LoadSpec, local: int, skip: int) -> int:
        if skip <= local:  # nothing to copy: vLLM holds those blocks already
            return 0
        per = self.cache.chunk_blocks
        first, last = local // per, skip // per
        h = spec.handoff
        if len(h.chains) < last:
            raise TransferError(f"the prefill side skipped {last} chunks, this prompt has {len(h.chains)}",
                                transfer_id=h.transfer_id)
        try:
            self.cache.load_now(CacheLoadSpec(spec.req_id, h.chains[first:last], h.tenant, local % per,
                                              spec.block_ids[:skip - local]))
        except (CacheMiss, ValueError) as e:
            raise TransferError(f"decode cache: {e}", transfer_id=h.transfer_id) from None
        return (skip - local) * self.block_size


def held_prefix(cfg: CacheConfig, cache: CacheIO | NoCacheIO | None, block_size: int) -> HeldPrefix:
    """The seam for this worker: reuse from ``cache`` with ``cache.decode_skip``, else none."""
    if isinstance(cache, CacheIO) and cfg.decode_skip:
        return CachedPrefix(cache, block_size)
    return NoHeldPrefix()


def _owner(transfer_id: TransferId) -> str:
    return f"handoff/{transfer_id}"
