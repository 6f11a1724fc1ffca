"""One decode worker as a prefill worker sees it (L5): its authenticated control session, its
transport connection, and the hand-offs in flight to it.

Every message a prefill worker sends a decode worker goes through :class:`DecodePeer`, on the
sender's asyncio loop: Allocate (:meth:`~DecodePeer.allocate`), Landed, TransferDone, Cancel
(once per transfer) and Heartbeat (which renews the leases of the in-flight hand-offs). A change
of the protocol's prefill half touches this file; ``links.py`` opens peers (handshake, transport
connect) and drops them, ``sender.py`` runs hand-offs and asks its peer for each step.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from lmcache_pd import protocol as P
from lmcache_pd._types import PeerName, TransferId
from lmcache_pd.config import TimeoutsConfig
from lmcache_pd.control.client import ControlClient
from lmcache_pd.errors import PDError, PoolExhausted, TransferError
from lmcache_pd.handoff import Handoff, signal_of
from lmcache_pd.heads import HeadSlice, plan_heads
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan, plan_into, plan_layers

log = logging.getLogger(__name__)
_CANCELED_KEPT = 1024
"""Transfer ids remembered as cancelled per peer (a Cancel goes out once per transfer)."""


@dataclass(frozen=True)
class Grant:
    """Decode pages for one hand-off: ``pages[i]`` receives block ``skip + i`` of the prompt."""

    peer: DecodePeer
    pages: list[int]
    skip: int
    generation: int = 0
    """The reservation's generation: with the transfer id, every data batch names it."""
    blocks: tuple[int, ...] = ()
    """A direct hand-off: the peer's vLLM blocks for the last ``len(blocks)`` pages, written
    instead of those pages; the pages before them are not sent."""

    def signal(self) -> tuple[int, int] | None:
        """The landing signal the hand-off's last batch ends with (transport/landing.py): the
        peer's word and the value written there; None where the peer keeps no words for us."""
        if self.peer.signals and self.pages:
            return signal_of(self.pages, self.blocks, self.peer.pool.num_pages, self.generation)
        return None

    def target(self) -> tuple[int, PoolLayout | KVLayout, list[int], int]:
        """Where this hand-off's bytes go: the transport's peer, its layout, the page or block
        of each block sent, and how many leading blocks of the prompt are not sent."""
        if not self.blocks:
            return self.peer.peer_id, self.peer.pool, self.pages, self.skip
        assert self.peer.blocks is not None  # (allocate checked it)
        blocks_id, kv = self.peer.blocks
        return blocks_id, kv, list(self.blocks), self.skip + len(self.pages) - len(self.blocks)


class DecodePeer:
    def __init__(self, name: PeerName, client: ControlClient, *, rank: int = 0, peer_id: int, pool: PoolLayout, incarnation: str,
                 data_token: bytes, timeouts: TimeoutsConfig, chunk_blocks: int, queue_bound: int,
                 signals: bool = False, blocks: tuple[int, KVLayout] | None = None,
                 heads: HeadSlice | None = None, head_bytes: int = 0):
        """``rank``: the peer's TP rank this link is to; ``peer_id``: the transport's connection to the peer's pool; ``chunk_blocks``: blocks per
        cache chunk (the peer may skip whole chunks only); ``queue_bound``:
        ``backpressure.prefill_queue``, hand-offs that may wait for this peer's pages at once;
        ``signals``: our transport writes this peer's landing words (its Allocates say so);
        ``blocks``: the transport's connection to the peer's vLLM blocks and their geometry
        (direct hand-offs: its Allocates say so); ``heads``: the KV heads we send it, when our TP
        sizes differ (None: whole blocks), ``head_bytes`` each per block and layer."""
        self.name = name
        self.rank = rank
        self.client = client
        self.peer_id = peer_id
        self.pool = pool
        self.incarnation = incarnation
        self.data_token = data_token
        self.t = timeouts
        self.chunk_blocks = chunk_blocks
        self.queue_bound = queue_bound
        self.signals = signals
        self.blocks = blocks
        self.heads = heads
        self.head_bytes = head_bytes
        self.waiting = 0
        """Hand-offs (and reservations) waiting for their Allocated reply."""
        self.beating = False
        """A heartbeat is in flight (the next one waits for it: one unanswered is enough)."""
        self._inflight: set[TransferId] = set()
        self._canceled: collections.OrderedDict[TransferId, None] = collections.OrderedDict()

    @property
    def lost(self) -> str | None:
        """Why the session's connection is gone (None: it is up)."""
        return self.client.lost

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def track(self, transfer_id: TransferId) -> None:
        """Heartbeats renew the lease of this hand-off's pages until :meth:`untrack`."""
        self._inflight.add(transfer_id)

    def untrack(self, transfer_id: TransferId) -> None:
        self._inflight.discard(transfer_id)

    async def close(self) -> None:
        await self.client.close()

    def plan(self, kv: KVLayout, dst: PoolLayout | KVLayout, *, blocks: list[int] | tuple[int, ...],
             to: list[int], layers: list[int] | None = None, among: list[int] | None = None) -> RangePlan:
        """Ranges from our blocks ``blocks`` into this peer's pages (or blocks) ``to``: whole
        blocks, or between TP sizes our heads that its rank holds, cut at head boundaries
        straight into its pages (heads.plan_heads; ``among``: every page of the hand-off there,
        when ``to`` is some of them, since a share of the pages is written by sections)."""
        if self.heads is None:
            return plan_into(kv, dst, blocks=blocks, to=to, layers=layers)
        assert isinstance(dst, PoolLayout)  # (no direct hand-offs between TP sizes: the decode offers none)
        return plan_heads(kv, dst, self.heads, head_bytes=self.head_bytes, blocks=list(blocks), pages=to,
                          layers=layers, among=among)

    def plan_layers(self, kv: KVLayout, dst: PoolLayout | KVLayout, *, blocks: list[int] | tuple[int, ...],
                    to: list[int], among: list[int] | None = None) -> list[RangePlan]:
        """:meth:`plan` of each layer alone, every layer at once (layout.plan_layers; between TP
        sizes, a plan per layer)."""
        if self.heads is None:
            return plan_layers(kv, dst, blocks=blocks, to=to)
        return [self.plan(kv, dst, blocks=blocks, to=to, layers=[layer], among=among) for layer in range(kv.num_layers)]

    # --- the messages -----------------------------------------------------------------------
    async def allocate(self, h: Handoff, n_pages: int) -> Grant:
        """Pages for the hand-off's prompt of ``n_pages`` blocks, less the leading ones the peer's
        own cache holds. Raises PoolExhausted past ``backpressure.prefill_queue``, PeerLost when
        the connection dropped (the caller may re-link once), TransferError for a reply that
        does not add up (its pages are given back first)."""
        if self.waiting >= self.queue_bound:
            raise PoolExhausted(f"{self.waiting} hand-offs already wait for pages of {self.name} "
                                "(backpressure.prefill_queue): this one is not queued",
                                transfer_id=h.transfer_id, peer=self.name)
        msg = P.Allocate(msg_id=self.client.next_id(), transfer_id=h.transfer_id, num_pages=n_pages,
                         num_tokens=h.num_tokens, prompt_digest=h.prompt_digest, wait_s=self.t.alloc_s,
                         chains=list(h.chains), tenant=h.tenant, signals=self.signals, direct=self.blocks is not None,
                         decode_sent=h.decode_sent and self.blocks is not None)
        self.waiting += 1
        try:
            reply = await self.client.request(msg, timeout_s=self.t.alloc_s + self.t.control_s,
                                              config_field="timeouts.alloc_s", what="page allocation",
                                              transfer_id=h.transfer_id)
        finally:
            self.waiting -= 1
        assert isinstance(reply, P.Allocated)
        skip = reply.skip_pages
        # A direct hand-off's pages are places past the pool (num_pages + i: no page is taken).
        places = self.pool.num_pages * (2 if reply.blocks else 1)
        if (not 0 <= skip < n_pages or skip % self.chunk_blocks or skip > len(h.chains) * self.chunk_blocks
                or len(reply.pages) != n_pages - skip or any(not 0 <= p < places for p in reply.pages)
                or (reply.blocks and (self.blocks is None or len(reply.blocks) > len(reply.pages)
                                      or any(not 0 <= b < self.blocks[1].num_blocks for b in reply.blocks)))):
            await self.cancel(h.transfer_id, "bad Allocated reply")  # its pages come back now
            raise TransferError(f"decode replied with bad pages ({len(reply.pages)} pages, {skip} skipped, "
                                f"{n_pages} blocks, {len(reply.blocks)} direct)", transfer_id=h.transfer_id)
        return Grant(self, reply.pages, skip, reply.generation, tuple(reply.blocks))

    async def landed(self, transfer_id: TransferId, pages: int = 0, layers: list[int] | None = None) -> None:
        """One-way: the hand-off's first ``pages`` pages, or its ``layers`` in every page, hold
        their final bytes."""
        await self.client.post(P.Landed(msg_id=self.client.next_id(), transfer_id=transfer_id, pages=pages,
                                        layers=layers or []))

    async def transfer_done(self, transfer_id: TransferId, num_bytes: int, seconds: float, digest: int | None) -> None:
        """Every byte is in the peer's pool: from now on it may read the pages."""
        done = P.TransferDone(msg_id=self.client.next_id(), transfer_id=transfer_id, num_bytes=num_bytes,
                              seconds=seconds, digest=digest)
        await self.client.request(done, timeout_s=self.t.control_s, config_field="timeouts.control_s",
                                  what="transfer-done", transfer_id=transfer_id)

    async def cancel(self, transfer_id: TransferId, reason: str) -> None:
        """The hand-off is over without its bytes. Best effort, once per transfer: the pages come
        back at once (or, for a transfer the peer never granted, its load recomputes at once);
        without an answer the lease reclaims them anyway."""
        if self.client.lost is not None:  # its session is gone with the connection: nothing to cancel in it
            return
        if transfer_id in self._canceled:
            return
        self._canceled[transfer_id] = None
        if len(self._canceled) > _CANCELED_KEPT:
            self._canceled.popitem(last=False)
        msg = P.Cancel(msg_id=self.client.next_id(), transfer_id=transfer_id, reason=reason[:200])
        try:
            await self.client.request(msg, timeout_s=self.t.control_s, config_field="timeouts.control_s",
                                      what="cancel", transfer_id=transfer_id)
        except PDError as e:
            log.debug("cancel of %s not acknowledged: %s", transfer_id, e)

    async def heartbeat(self) -> str | None:
        """Renew the leases of the in-flight hand-offs; why the peer is lost (unanswered, or a
        new incarnation: it restarted), or None."""
        msg = P.Heartbeat(msg_id=self.client.next_id(), transfer_ids=sorted(self._inflight))
        try:
            ack = await self.client.request(msg, timeout_s=self.t.control_s, config_field="timeouts.control_s",
                                            what="heartbeat")
        except PDError as e:
            return str(e)
        if isinstance(ack, P.Ack) and ack.incarnation != self.incarnation:
            return "it restarted (new incarnation)"
        return None
