"""What the connector's scheduler half asks its worker half to do, as plain records (L1: no
torch, no zmq, no transport).

A hand-off is named by one record, :class:`Handoff`, on both instances and in both halves of
the connector: the prefill's scheduler half builds it from the proxy's ``PrefillParams`` and
the decode's from ``DecodeParams``; the worker half sends, reserves or loads by it. The
records here travel in :class:`~lmcache_pd.connector.metadata.PDConnectorMetadata`, which vLLM
pickles every engine step, so they stay small and the scheduler half names them without
importing the worker stack (node/, transport/, ops/: torch, CUDA, sockets).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_pd._types import BlockId, PeerName, ReqId, TransferId


@dataclass(frozen=True)
class Handoff:
    """One prompt's KV moving from a prefill instance to a decode instance."""

    transfer_id: TransferId
    peer: PeerName
    """The other instance: the decode's name on the prefill side, the prefill's on the decode side."""
    num_tokens: int
    """Prompt tokens the hand-off covers: the prefill sends all it computed; the decode loads those
    it will not compute itself."""
    prompt_digest: str
    """Digest of those tokens' ids: both sides must be talking about the same prompt."""
    chains: tuple[bytes, ...] = ()
    """Chain hashes of the prompt's full chunks (prefix cache on): the decode side may hold some."""
    tenant: str | None = None
    """The cache namespace of the request (vLLM's ``cache_salt``)."""
    decode_sent: bool = False
    """Prefill side: the proxy sent the decode's request at the same time (a direct hand-off
    may wait briefly for its blocks, ``timeouts.direct_wait_s``)."""


@dataclass(frozen=True)
class SendSpec:
    """Prefill: start ``handoff`` from vLLM's ``block_ids`` (its request finished; vLLM holds the
    blocks until the hand-off ends). A hand-off whose last prompt chunk is still computing is
    reserved first, by its :class:`Handoff` alone."""

    req_id: ReqId
    handoff: Handoff
    block_ids: tuple[BlockId, ...]
    computed_at: float = 0.0
    """Wall clock (``time.time()``) when the scheduler saw the request finish: its last prompt
    chunk computed. The hand-off's timeline starts here (node/timeline.py); 0: not known."""
    layered: bool = False
    """Sent layer by layer while vLLM's forwards compute it (``transport.layerwise``,
    node/layered.py): the spec comes in the metadata of a step that computes a prompt chunk,
    before the request finished. One such spec per chunk that completes blocks (a *piece*)."""
    first_block: int = 0
    """A layered piece: ``block_ids[first_block:]`` are the blocks this step's forward completes
    (``block_ids`` lists every block of the prompt so far; the earlier ones went with earlier
    pieces). A block a chunk leaves half written goes with the next chunk's piece."""
    final: bool = True
    """A layered piece: this step computes the prompt's last chunk (the hand-off's last piece)."""


@dataclass(frozen=True)
class LoadSpec:
    """Decode: load ``handoff`` into vLLM's ``block_ids``."""

    req_id: ReqId
    handoff: Handoff
    block_ids: tuple[BlockId, ...]
    """Decode blocks to fill: the tail of the prompt's blocks (a local prefix hit covers the rest).
    (``handoff.chains`` are computed by the decode side itself.)"""


@dataclass(frozen=True)
class CacheLoadSpec:
    """Copy prefix chunks from the cache tiers into new blocks (not a hand-off)."""

    req_id: ReqId
    chains: tuple[bytes, ...]
    """Chain hashes of the chunks to read, in prompt order."""
    tenant: str | None
    skip_blocks: int
    """Leading blocks of the first chunk that vLLM already holds (its own prefix cache)."""
    block_ids: tuple[BlockId, ...]
    """Destination blocks: every block of these chunks after the skipped ones, in order."""
    hold: str = ""
    """The hold on these chunks to end once they are loaded (or the load failed)."""


@dataclass(frozen=True)
class CacheSaveSpec:
    req_id: ReqId
    chains: tuple[bytes, ...]
    """Chain hashes of the chunks to store."""
    tenant: str | None
    block_ids: tuple[BlockId, ...]
    """Their blocks, ``chunk_blocks`` per chunk, in order."""


def lookup_hold(req_id: ReqId) -> str:
    """The owner of the hold a scheduler lookup puts on the chunks it found."""
    return f"lookup/{req_id}"


def signal_of(pages: tuple[int, ...] | list[int], direct: tuple[int, ...] | list[int], pool_pages: int,
              generation: int) -> tuple[int, int]:
    """A reservation's landing word (transport/landing.py) and the value its writer puts there:
    the place of its first pool page, or, for a direct hand-off, of its first vLLM block (past the
    pool's pages: a direct hand-off's pages are not memory), neither shared by two live
    reservations; the value is its generation, never 0 (a fresh word holds 0), so a late write by
    the writer of an ended reservation never reads as a later one's, and below 2**31 (the top bit
    is a writer's *launched* mark, transport/landing.py)."""
    slot = pool_pages + int(direct[0]) if direct else int(pages[0])
    return slot, (generation - 1) % 0x7FFFFFFF + 1
