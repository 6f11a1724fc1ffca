"""Decode side of a hand-off: the pool, its control server and the loader (L5).

At start the receiver pre-allocates the pool (``pool.size_mib``), registers it with the
transport, listens, and serves the control plane; its loader (loader.py) moves each requested
hand-off from the pool into vLLM's blocks, one phase at a time (loads.LoadPhase). A *load* is
the decode worker asking for the KV of one request; the vLLM forward loop only calls
:meth:`KVReceiver.submit_load`, :meth:`KVReceiver.cancel_load`, :meth:`KVReceiver.discard` and
:meth:`KVReceiver.drain`, which never block.
With decode-side reuse (``cache.decode_skip``), the control server asks this worker's local
tiers, at Allocate, how many leading chunks of the prompt they hold (held_prefix.py): those are
held for the hand-off, the prefill side sends only the rest, and the loader copies them from the
tiers into the request's blocks.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import torch

from lmcache_pd import auth
from lmcache_pd import protocol as P
from lmcache_pd import transport as transports
from lmcache_pd._types import ReqId, TransferId
from lmcache_pd.control import curve
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.control.reservation import PoolStats
from lmcache_pd.control.server import ControlServer
from lmcache_pd.errors import ConfigError, TransferError, TransportUnavailable
from lmcache_pd.handoff import LoadSpec
from lmcache_pd.layout import KVLayout, PoolLayout
from lmcache_pd.node.cache_io import CacheIO, NoCacheIO
from lmcache_pd.node.handoff_log import HandoffLog
from lmcache_pd.node.held_prefix import held_prefix
from lmcache_pd.node.loader import Loader
from lmcache_pd.node.loads import LoadResult
from lmcache_pd.node.timeline import Timeline
from lmcache_pd.node.worker import NodeConfig, Worker
from lmcache_pd.node.write_gate import PoolGate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FirstToken:
    """The hand-off log's record of a decode's first token after its load."""

    transfer_id: TransferId
    loaded_at: float
    """Wall clock when the KV was in vLLM's blocks (``LoadResult.done_at``)."""
    first_token_at: float
    event: str = "first_token"


class KVReceiver:
    def __init__(self, worker: Worker, cfg: NodeConfig, *, kv: KVLayout, kv_buffer: torch.Tensor,
                 cache: CacheIO | NoCacheIO | None = None, keys: auth.Keyring | None = None):
        """``cache``: this worker's prefix cache (started by the caller), for decode-side reuse
        (``cache.decode_skip``);
        ``keys``: derived from the deployment's secret (config.keyring); None: no secret."""
        at = cfg.listener(worker.instance)
        self.worker = worker
        self.cfg = cfg
        self._handoff_log = HandoffLog(cfg.handoff_log, instance=worker.instance, rank=worker.rank, role="decode")
        self.timeline = Timeline.decode()
        self._loaded_at: collections.OrderedDict[TransferId, float] = collections.OrderedDict()
        """Loads reported done, by transfer id, until their request's first token (first_token)."""
        self.kv = kv
        self.kv_buffer = kv_buffer
        self.keys = keys if keys is not None else auth.Keyring(None)
        self.pool_layout = PoolLayout.sized(kv, cfg.pool.size_mib << 20)
        if self.pool_layout.num_pages == 0:
            raise TransferError(f"pool.size_mib={cfg.pool.size_mib} is below one page ({kv.page_bytes} B)")
        self.transport = transports.create(cfg.transport.name, cfg.transport.options, host=at.host,
                                           port=at.data_port + worker.rank, keys=self.keys,
                                           encrypt=cfg.auth.encrypt,
                                           advertise=(at.advertise[0], at.advertise[1] + worker.rank)
                                           if at.advertise else None)
        # Pages of a hand-off ended mid-write: a transport that admits each batch holds them
        # only while a batch writes; one-sided ones until the prefill confirms or data_s passes.
        self.pool = PagePool(self.pool_layout.num_pages, lease_s=cfg.timeouts.lease_s,
                             quarantine_s=0.0 if self.transport.capabilities.admits_writes else cfg.timeouts.data_s)
        # Pre-allocated (and zeroed, so touched) now: the first hand-off pays no page faults.
        self.pool_buffer = self.transport.allocate(self.pool_layout.nbytes, kv_buffer.device)
        self.region = self.transport.register(self.pool_buffer)
        # Direct hand-offs: vLLM's blocks too, registered before any descriptor is exported
        # (nixl's agent metadata names every region registered by then).
        self.blocks_region = self._register_blocks() if cfg.transport.direct else None
        # Landing words (transport/landing.py): one per pool page, then one per vLLM block (a
        # reservation's is its first page's, a direct one's its first block's: handoff.signal_of).
        words = self.transport.landing_words(self.pool_layout.num_pages + kv.num_blocks)
        self.server: ControlServer | None = None
        self.bind = cfg.control_endpoint(worker.instance, worker.rank)
        self.prefix = held_prefix(cfg.cache, cache, worker.compat.block_size)
        self.loader = Loader(self.pool, self.pool_layout, self.pool_buffer, kv=kv, kv_buffer=kv_buffer,
                             block_size=worker.compat.block_size, prefix=self.prefix, transfer_s=cfg.timeouts.transfer_s,
                             group_bytes=cfg.transport.group_mib << 20, verify=cfg.integrity.verify,
                             handoff_log=self._handoff_log, timeline=self.timeline, name=f"pd-loader-{worker.rank}",
                             words=words, scatter_landed=cfg.pool.scatter_landed,
                             refusal=lambda peer: self.server.refusal(peer) if self.server is not None else None)

    def start(self) -> None:
        if self.transport.capabilities.listens:
            self.transport.listen(PoolGate(self.pool, self.pool_layout,
                                           lambda token: self.server.owner_of(token) if self.server else None))
        self.server = ControlServer(self.pool, bind=self.bind, compat=self.worker.compat,
                                    incarnation=self.worker.incarnation,
                                    page_bytes=self.pool_layout.page_bytes,
                                    descriptor=self.transport.export_descriptor(self.region),
                                    max_alloc_wait_s=self.cfg.timeouts.alloc_s, keys=self.keys,
                                    peer_s=self.cfg.timeouts.peer_s, max_waiting=self.cfg.backpressure.decode_queue,
                                    curve_secret=curve.server_keys(self.keys)[1] if self.cfg.auth.encrypt else None,
                                    prefix=self.prefix, blocks=self._blocks(), direct=self.loader.direct_blocks,
                                    direct_wait_s=self.cfg.timeouts.direct_wait_s)
        self.server.start()
        self.loader.start()
        log.info("decode pool ready: %d pages of %d B (%.0f MiB), control %s, transport %s",
                 self.pool_layout.num_pages, self.pool_layout.page_bytes, self.pool_layout.nbytes / 2**20,
                 self.server.endpoint, self.transport.name)

    def _register_blocks(self) -> int:
        if not self.transport.capabilities.direct:
            raise ConfigError(f"{self.transport.name} cannot let a prefill write into vLLM's blocks (nixl and "
                              "loopback can); turn it off for this transport", field="transport.direct")
        return self.transport.register(self.kv_buffer, self.kv.extents)

    def _blocks(self) -> P.BlocksRegion | None:
        """The handshake's description of vLLM's blocks (None: no direct hand-offs)."""
        if self.blocks_region is None:
            return None
        kv = self.kv
        try:
            descriptor = self.transport.export_descriptor(self.blocks_region)
        except TransportUnavailable as e:  # e.g. cuda_ipc over PyTorch's expandable segments
            log.warning("transport.direct: vLLM's blocks cannot be exported (%s): hand-offs go through the pool", e)
            return None
        return P.BlocksRegion(descriptor, kv.num_blocks, kv.block_bytes, kv.block_stride, list(kv.layer_offsets),
                              [tuple(e) for e in kv.extents])

    def close(self) -> None:
        self.loader.close()
        if self.server is not None:
            self.server.close()
        self.transport.close()

    # --- API for the decode worker (non-blocking) -------------------------------------------
    def submit_load(self, spec: LoadSpec) -> None:
        self.loader.submit(spec)

    def cancel_load(self, req_id: ReqId) -> None:
        """The decode request was aborted while waiting: end its load now (reported as failed).

        The failure is reported (finished_recving, after which vLLM frees the blocks) only once
        nothing writes into the blocks any more: a load the loader is copying into right now is
        ended by the loader when that copy is done."""
        self.loader.cancel(req_id)

    def discard(self, transfer_id: TransferId, reason: str) -> None:
        """The decode side will not load this hand-off: free its pages now (or refuse it later)."""
        self.pool.abort(transfer_id, reason=reason, now=time.monotonic())

    def drain(self, wait_s: float = 0.0) -> list[LoadResult]:
        """Results of ended loads. ``wait_s`` > 0 blocks up to that long for one (benchmarks and
        tests; vLLM's loop never waits)."""
        out = self.loader.drain(wait_s)
        for r in out:
            if r.ok:
                self._loaded_at[r.transfer_id] = r.done_at
        while len(self._loaded_at) > 4096:  # requests that never computed a token (aborted)
            self._loaded_at.popitem(last=False)
        return out

    def first_token(self, transfer_id: TransferId, at: float) -> None:
        """The decode computed the first token of this hand-off's request (wall clock ``at``):
        the timeline's last phase, into the metrics and the hand-off log."""
        loaded_at = self._loaded_at.pop(transfer_id, 0.0)
        if not loaded_at:
            return
        self.timeline.observe_span("first_token", loaded_at, at)
        self._handoff_log.append(FirstToken(transfer_id, loaded_at, at))

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    def status(self) -> dict[str, dict[str, int]]:
        """Pool, control-plane and transport counters (for the worker API; thread-safe)."""
        p = self.pool.stats()
        out: dict[str, dict[str, int]] = {"pool": {
            "pages": p.num_pages, "free_pages": p.free_pages, "allocated": p.allocated, "ready": p.ready,
            "consuming": p.consuming, "expired_total": p.expired_total, "aborted_total": p.aborted_total}}
        out["loads"] = {"waiting": self.loader.waiting(), "digests_verified_total": self.loader.digests_verified,
                        "digest_mismatches_total": self.loader.digest_mismatches,
                        "spins_total": self.loader.spins, "spun_total": self.loader.spun}
        if self.server is not None:
            out["control"] = {**dataclasses.asdict(self.server.stats), "sessions": self.server.sessions}
        t = self.transport.stats
        out["transport"] = {"batches_total": t.batches, "bytes_total": t.bytes, "failures_total": t.failures,
                            "refused_total": t.refused, "refused_batches_total": t.refused_batches,
                            "encrypted": int(self.transport.encrypt)}
        return out
