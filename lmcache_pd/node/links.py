"""The prefill side's links to decode peers (L5): which decode workers this prefill worker has
a session with (``peer.DecodePeer``: an authenticated control session and a transport
connection each), on the sender's asyncio loop.

A link is to one rank of a decode instance: a *lane* (:meth:`Links.lanes`). Between equal TP
sizes a worker has one lane per peer, to the rank of its number; between TP sizes it has one
to each rank that holds some of its KV heads (a narrower decode: one, a wider one: several, and
none when the heads it holds are copies another rank sends; docs/tensor_parallel.md).

Life of a link:
  1. ``get(peer, lane)`` opens it on first use: Hello and Handshake
     (``ControlClient.open_session``), then the transport connects to the descriptor in the
     reply; a lane that fails this is marked down for ``timeouts.handshake_s`` (later
     hand-offs fail at once meanwhile);
  2. ``beat()``, every ``timeouts.heartbeat_s``, heartbeats every peer (one heartbeat in flight
     per peer), which renews the leases of its in-flight hand-offs;
  3. the link is dropped when its connection drops (the client is ``lost``), a heartbeat goes
     unanswered (``timeouts.control_s``), or the peer answers with a new incarnation; the next
     ``get`` opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from lmcache_pd import auth, heads
from lmcache_pd import protocol as P
from lmcache_pd._types import PeerName
from lmcache_pd.control import curve
from lmcache_pd.control.client import ControlClient
from lmcache_pd.errors import PDError, PeerLost, TransferError
from lmcache_pd.layout import KVLayout, PoolLayout
from lmcache_pd.node.peer import DecodePeer
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lane:
    """Where this worker sends its part of a hand-off to one decode instance: that instance's
    ``rank``, and the KV heads it sends there (None: all of them, as whole blocks)."""

    rank: int
    heads: heads.HeadSlice | None = None


class Links:
    def __init__(self, worker: Worker, cfg: NodeConfig, *, kv: KVLayout, keys: auth.Keyring, transport: Transport,
                 on_ended: Callable[[PeerName, P.Ended], None] | None = None):
        """``on_ended``: called when a decode peer ended a hand-off this side was writing (P.Ended)."""
        self.on_ended = on_ended
        self.worker = worker
        self.cfg = cfg
        self.t = cfg.timeouts
        self.kv = kv
        self.keys = keys
        self.transport = transport
        self._chunk_blocks = max(1, cfg.cache.chunk_tokens // worker.compat.block_size)
        """Blocks per cache chunk: a decode peer skips whole chunks only."""
        self._curve_key = curve.server_keys(keys)[0] if cfg.auth.encrypt else None
        self._ctx: zmq.Context | None = None
        self._links: dict[tuple[PeerName, int], DecodePeer] = {}  # (peer, its rank)
        self._locks: dict[tuple[PeerName, int], asyncio.Lock] = {}
        self._down_until: dict[tuple[PeerName, int], tuple[float, str]] = {}
        self._beats: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._ctx = zmq.Context()

    async def close(self) -> None:
        for task in list(self._beats):
            task.cancel()
        for link in self._links.values():
            await link.close()
        self._links.clear()
        if self._ctx is not None:
            self._ctx.term()

    def up(self) -> list[DecodePeer]:
        return list(self._links.values())

    def find(self, peer: PeerName, rank: int | None = None) -> DecodePeer | None:
        """The link to ``peer``'s ``rank`` (None: its first lane's) if there is one (never opens one)."""
        if rank is None:
            lanes = self.lanes(peer)
            rank = lanes[0].rank if lanes else -1
        return self._links.get((peer, rank))

    async def get(self, peer: PeerName, lane: Lane) -> DecodePeer:
        key = (peer, lane.rank)
        link = self._links.get(key)
        if link is not None and link.client.lost is None:
            return link
        async with self._locks.setdefault(key, asyncio.Lock()):
            link = self._links.get(key)
            if link is not None and link.client.lost is not None:
                await self.drop(link)
            elif link is not None:
                return link
            down = self._down_until.get(key)
            if down and time.monotonic() < down[0]:
                raise PeerLost(f"decode peer is down ({down[1]}); next try in {down[0] - time.monotonic():.1f} s",
                               peer=peer)
            try:
                link = await self._open(peer, lane)
            except PDError as e:
                # Fail fast for a while instead of making every request wait for the handshake deadline.
                self._down_until[key] = (time.monotonic() + self.t.handshake_s, str(e))
                raise
            self._down_until.pop(key, None)
            self._links[key] = link
            return link

    def lanes(self, peer: PeerName) -> list[Lane]:
        """The ranks of decode instance ``peer`` this worker hands off to, in rank order, and the
        KV heads it sends each: its own rank, whole blocks, between equal TP sizes; else one
        lane per decode rank that receives some of its heads from it (heads.head_map): one for
        a narrower decode, several for a wider one, none where the heads this rank holds are
        copies of another rank's (that rank sends them)."""
        c = self.worker.compat
        decode_tp = self.cfg.listener(peer).tp_size
        if decode_tp == c.tp_size:
            return [Lane(self.worker.rank)]
        return [Lane(s.dst_rank, s) for s in heads.head_map(c.total_kv_heads, c.tp_size, decode_tp)
                if s.src_rank == c.tp_rank]

    async def _open(self, peer: PeerName, lane: Lane) -> DecodePeer:
        assert self._ctx is not None
        rank, sliced = lane.rank, lane.heads
        client = ControlClient(self._ctx, endpoint=self.cfg.control_endpoint(peer, rank),
                               identity=self.worker.identity, peer=peer,
                               keys=self.keys, curve_server_key=self._curve_key)
        on_ended = self.on_ended
        if on_ended is not None:
            client.on_ended = lambda msg: on_ended(peer, msg)
        client.start()
        try:
            w = self.worker
            msg = P.Handshake(msg_id=0, peer=w.instance, incarnation=w.incarnation,
                              compat_hash=w.compat.digest(), compat=w.compat, nonce=b"", cookie=b"")
            reply = await client.open_session(msg, timeout_s=self.t.handshake_s)
            head_bytes = self.kv.block_bytes // max(1, w.compat.num_kv_heads)
            if sliced is None:
                bad = reply.page_bytes != self.kv.page_bytes
            else:  # its pages hold its rank's heads: whole heads of ours, every layer
                bad = reply.page_bytes <= 0 or reply.page_bytes % (self.kv.num_layers * head_bytes) != 0
            if bad:
                raise TransferError(f"decode page size {reply.page_bytes} does not fit ours ({self.kv.page_bytes}, "
                                    f"{w.compat.num_kv_heads} KV heads)", peer=peer)
            loop = asyncio.get_running_loop()
            peer_id = await loop.run_in_executor(None, self.transport.connect, reply.descriptor, self.t.handshake_s,
                                                 reply.data_token)
            blocks = await self._blocks(peer, reply)
        except BaseException:
            await client.close()
            raise
        pool = PoolLayout(self.kv.num_layers, reply.num_pages, reply.page_bytes // self.kv.num_layers)
        log.info("linked to decode peer %s rank %d (incarnation %s, %d pages of %d B, transport %s%s%s)",
                 peer, rank, reply.incarnation, reply.num_pages, reply.page_bytes, self.transport.name,
                 ", direct into its blocks" if blocks else "",
                 f", our heads into its heads {sliced.dst_head}..{sliced.dst_head + sliced.count - 1}" if sliced else "")
        return DecodePeer(peer, client, rank=rank, peer_id=peer_id, pool=pool, incarnation=reply.incarnation,
                          data_token=reply.data_token, timeouts=self.t, chunk_blocks=self._chunk_blocks,
                          queue_bound=self.cfg.backpressure.prefill_queue,
                          signals=self.transport.signals_to(peer_id), blocks=blocks,
                          heads=sliced, head_bytes=head_bytes)

    async def _blocks(self, peer: PeerName, reply: P.HandshakeReply) -> tuple[int, KVLayout] | None:
        """With ``transport.direct`` on both sides: a connection to the peer's vLLM blocks and
        their geometry (direct hand-offs), or None. A geometry that does not match ours, or a
        connection that fails, leaves hand-offs to the pool (logged)."""
        b = reply.blocks
        if b is None or not self.cfg.transport.direct or not self.transport.capabilities.direct:
            return None
        if (b.block_bytes != self.kv.block_bytes or len(b.layer_offsets) != self.kv.num_layers or b.num_blocks <= 0
                or min(b.layer_offsets) < 0 or b.block_stride < b.block_bytes):
            log.warning("decode peer %s describes blocks that do not match ours: no direct hand-offs to it", peer)
            return None
        kv = KVLayout(self.kv.num_layers, b.num_blocks, b.block_bytes, b.block_stride, tuple(b.layer_offsets),
                      tuple(tuple(e) for e in b.extents))
        try:
            blocks_id = await asyncio.get_running_loop().run_in_executor(
                None, self.transport.connect, b.descriptor, self.t.handshake_s, reply.data_token)
        except PDError as e:
            log.warning("cannot reach decode peer %s's blocks (%s): no direct hand-offs to it", peer, e)
            return None
        return blocks_id, kv

    async def drop(self, link: DecodePeer) -> None:
        """Forget a link, if it is still the one to its peer's rank (another coroutine may have
        re-linked meanwhile)."""
        key = (link.name, link.rank)
        if self._links.get(key) is not link:
            return
        del self._links[key]
        self.transport.disconnect(link.peer_id)
        if link.blocks is not None:
            self.transport.disconnect(link.blocks[0])
        await link.close()

    def beat(self) -> None:
        """Start a heartbeat on every peer that has none in flight (concurrently: a silent peer
        delays no other)."""
        loop = asyncio.get_running_loop()
        for link in list(self._links.values()):
            if not link.beating:
                link.beating = True
                task = loop.create_task(self._beat(link))
                self._beats.add(task)
                task.add_done_callback(self._beats.discard)

    async def _beat(self, link: DecodePeer) -> None:
        try:
            why = await link.heartbeat()
        finally:
            link.beating = False
        if why is not None:
            log.warning("decode peer %s rank %d lost (%s): link dropped, the next hand-off re-links", link.name,
                        link.rank, why)
            await self.drop(link)
