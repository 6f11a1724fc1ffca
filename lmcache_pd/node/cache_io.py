"""A worker's side of the prefix cache: lookups, loads into vLLM's blocks, saves out of them (L5).

  1. ``CacheIO(cfg, ...)`` assigns fields; ``start()`` opens the tiers (``cache.tiers``) and
     starts the lookup server and the thread ``pd-cache-io``;
  2. lookups (from the scheduler process) are answered by the lookup server's thread; the
     chunks found are held (kept from eviction) for the request until its load ends, its
     ``release``, or ``cache.hold_s``;
  3. ``submit_load(spec)``: read the chunks (down the tiers) and copy their blocks into the
     request's vLLM blocks; a chunk missing or unreadable fails the load (vLLM recomputes);
  4. ``submit_save(spec, ready)``: copy the request's blocks into one buffer per chunk (after
     the ``ready`` CUDA event) and queue it for the tiers; the request's blocks may be freed as
     soon as that copy is done: the tier writes run later on the cache's writer thread;
  5. ``drain()`` returns the loads and saves that ended; nothing here blocks vLLM's forward loop.
The decode side's receiver uses two more, from its own threads: ``hold_prefix`` (how many
leading chunks of a coming hand-off its local tiers hold, held for it) and ``load_now``.

A chunk's bytes are its blocks of every layer, ``[layer][block in chunk][block_bytes]``: the pool
page layout, so the range plans of :mod:`lmcache_pd.layout` apply unchanged.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmcache_pd._types import ReqId
from lmcache_pd.cache import TieredCache, build_cache, cache_salt, chunk_keys
from lmcache_pd.cache.lookup import LookupServer
from lmcache_pd.cache.store import Lookup
from lmcache_pd.config import CacheConfig
from lmcache_pd.errors import ConfigError
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec, lookup_hold
from lmcache_pd.layout import KVLayout, PoolLayout, plan_cache_to_pool
from lmcache_pd.node.cache_slots import SlotCopier
from lmcache_pd.ops import copy_ranges
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheIOResult:
    req_id: ReqId
    kind: str
    """``"load"`` or ``"save"``."""
    ok: bool
    num_bytes: int = 0
    chunks: int = 0
    seconds: float = 0.0
    error: str = ""


def chunk_blocks_of(cfg: CacheConfig, block_size: int) -> int:
    if cfg.chunk_tokens % block_size:
        raise ConfigError(f"{cfg.chunk_tokens} is not a multiple of vLLM's block size {block_size}",
                          field="cache.chunk_tokens")
    return cfg.chunk_tokens // block_size


class NoCacheIO:
    """``cache.enabled`` off: a worker's prefix cache that holds nothing. The scheduler half
    (connector/prefix.py, its null seams) then queues no cache loads or saves, so being asked
    for one is a bug, said as such rather than a load that never ends."""

    enabled = False
    tiers = "off"

    def submit_load(self, spec: CacheLoadSpec) -> None:
        raise AssertionError(f"a cache load for {spec.req_id} with the prefix cache off (cache.enabled)")

    def submit_save(self, spec: CacheSaveSpec, ready: torch.cuda.Event | None) -> None:
        raise AssertionError(f"a cache save for {spec.req_id} with the prefix cache off (cache.enabled)")

    def release(self, owner: str) -> None:
        pass

    def drain(self, wait_s: float = 0.0) -> list[CacheIOResult]:
        return []

    def close(self) -> None:
        pass


class CacheIO:
    enabled = True

    def __init__(self, cfg: CacheConfig, *, instance: str, rank: int, compat: dict[str, object], kv: KVLayout,
                 kv_buffer: torch.Tensor, block_size: int, cache: TieredCache | None = None,
                 record_key: bytes | None = None):
        """``record_key``: seals records leaving the process (build_cache); from the secret."""
        self.cfg = cfg
        self.kv = kv
        self.kv_buffer = kv_buffer
        self.chunk_blocks = chunk_blocks_of(cfg, block_size)
        self.chunk_layout = PoolLayout(kv.num_layers, self.chunk_blocks, kv.block_bytes)
        self.tiers = "+".join(t.name for t in cfg.tiers)
        self.salt = cache_salt(compat, chunk_tokens=cfg.chunk_tokens)
        self.cache = cache if cache is not None else build_cache(cfg, instance=instance, rank=rank,
                                                                 record_key=record_key)
        self.lookups = LookupServer(instance, rank, self.resolve)
        # A first tier in shared memory (the node cache daemon): loads and saves copy in place.
        top = self.cache.tiers[0] if self.cache.tiers else None
        self.shared = top if getattr(top, "shared_memory", False) else None
        self.slots = SlotCopier(kv, kv_buffer, self.chunk_layout)
        for t in self.cache.tiers:
            if getattr(t, "shared_memory", False):
                t.sum_unit_bytes, t.chunk_tokens = kv.block_bytes, cfg.chunk_tokens
        if self.shared is not None:
            self.shared.on_segment = self.slots.segment_hook()
        self._work: collections.deque[tuple[str, object, torch.cuda.Event | None]] = collections.deque()
        self._done: list[CacheIOResult] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.cache.start()
        self.lookups.start()
        self._thread = thread(self._run, "pd-cache-io")
        self._thread.start()

    def resolve(self, req_id: ReqId, chains: Sequence[bytes], tenant: str | None) -> Lookup:
        """A lookup from the scheduler: the chunks found stay held until the request's load."""
        return self.cache.lookup(chunk_keys(self.salt, chains, tenant), hold=(lookup_hold(req_id), self.cfg.hold_s))

    def hold_prefix(self, owner: str, chains: Sequence[bytes], tenant: str | None, max_chunks: int) -> int:
        """How many leading chunks (at most ``max_chunks``) this worker's local tiers hold; held
        for ``owner`` until ``release(owner)`` or ``cache.hold_s``. Remote tiers are not asked:
        the decode side would fetch from them what the prefill side can send as fast."""
        keys = chunk_keys(self.salt, chains[:max(0, max_chunks)], tenant)
        return self.cache.lookup(keys, record=False, hold=(owner, self.cfg.hold_s), local=True).hits if keys else 0

    def release(self, owner: str) -> None:
        self.cache.release(owner)

    def load_now(self, spec: CacheLoadSpec) -> tuple[int, int]:
        """Load on the calling thread (the decode loader); returns (chunks, bytes). Raises
        CacheMiss when a chunk is gone, ValueError for a spec that does not add up."""
        return self._load(spec)

    # --- called on vLLM's thread: never blocks ------------------------------------------------
    def submit_load(self, spec: CacheLoadSpec) -> None:
        self._submit("load", spec, None)

    def submit_save(self, spec: CacheSaveSpec, ready: torch.cuda.Event | None) -> None:
        self._submit("save", spec, ready)

    def _submit(self, kind: str, spec: object, ready: torch.cuda.Event | None) -> None:
        with self._cond:
            self._work.append((kind, spec, ready))
            self._cond.notify_all()

    def drain(self, wait_s: float = 0.0) -> list[CacheIOResult]:
        with self._cond:
            if not self._done and wait_s > 0:
                self._cond.wait_for(lambda: self._done, timeout=wait_s)
            out, self._done = self._done, []
        return out

    # --- the pd-cache-io thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._work or self._stop.is_set())
                if self._stop.is_set():
                    return
                kind, spec, ready = self._work.popleft()
            t0 = time.perf_counter()
            try:
                if kind == "load":
                    n, nbytes = self._load(spec)  # type: ignore[arg-type]
                else:
                    n, nbytes = self._save(spec, ready)  # type: ignore[arg-type]
                result = CacheIOResult(spec.req_id, kind, True, nbytes, n, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - reported: vLLM recomputes (load) or frees (save)
                if not isinstance(e, CacheMiss):
                    log.exception("cache %s for %s failed", kind, spec.req_id)  # type: ignore[attr-defined]
                result = CacheIOResult(spec.req_id, kind, False, error=str(e))  # type: ignore[attr-defined]
            with self._cond:
                self._done.append(result)
                self._cond.notify_all()

    def _load(self, spec: CacheLoadSpec) -> tuple[int, int]:
        try:
            return self._copy_in(spec)
        finally:
            if spec.hold:
                self.cache.release(spec.hold)

    def _copy_in(self, spec: CacheLoadSpec) -> tuple[int, int]:
        keys = chunk_keys(self.salt, spec.chains, spec.tenant)
        expected = len(keys) * self.chunk_blocks - spec.skip_blocks
        if len(spec.block_ids) != expected or not 0 <= spec.skip_blocks < self.chunk_blocks:
            raise ValueError(f"load of {len(keys)} chunks skipping {spec.skip_blocks} blocks needs {expected} "
                             f"blocks, got {len(spec.block_ids)}")
        nbytes = 0
        dst_blocks = iter(spec.block_ids)
        wants = []  # per chunk: (its vLLM blocks, its first page)
        for i in range(len(keys)):
            first = spec.skip_blocks if i == 0 else 0
            wants.append(([next(dst_blocks) for _ in range(first, self.chunk_blocks)], first))
        done = 0
        if self.shared is not None:  # in place, out of the daemon's slots (node/cache_slots.py)
            with self.shared.reading(keys) as slots:
                copied = self.slots.load([(slot, *wants[i]) for i, slot in enumerate(slots)])
                for i, n in enumerate(copied):
                    if n is None:
                        self.shared.corrupt(keys[i])
                        raise CacheMiss(f"chunk {i} of {len(keys)} failed its digest in the cache daemon")
                    nbytes += n
                done = len(slots)
        for i in range(done, len(keys)):
            blocks, first = wants[i]
            pages = np.arange(first, self.chunk_blocks)
            value = self.cache.get(keys[i], start=0 if self.shared is None else 1)
            if value is None:
                raise CacheMiss(f"chunk {i} of {len(keys)} is in no tier now (deleted, or a remote tier evicted it)")
            plan = plan_cache_to_pool(self.kv, self.chunk_layout, blocks=blocks, pages=pages).swapped()
            src = _readonly_tensor(value)
            if self.kv_buffer.is_cuda:
                src = src.to(self.kv_buffer.device)
            copy_ranges(src, self.kv_buffer, plan)
            nbytes += plan.nbytes
        if self.kv_buffer.is_cuda:
            torch.cuda.current_stream(self.kv_buffer.device).synchronize()
        return len(keys), nbytes

    def _save(self, spec: CacheSaveSpec, ready: torch.cuda.Event | None) -> tuple[int, int]:
        keys = chunk_keys(self.salt, spec.chains, spec.tenant)
        if len(spec.block_ids) != len(keys) * self.chunk_blocks:
            raise ValueError(f"save of {len(keys)} chunks needs {len(keys) * self.chunk_blocks} blocks, "
                             f"got {len(spec.block_ids)}")
        if ready is not None:
            ready.synchronize()
        # Content-addressed: a tier that holds a key holds the same bytes; write only where missing.
        missing = self.cache.missing(keys)
        stored = 0
        pages = np.arange(self.chunk_blocks)

        def blocks_of(i: int) -> Sequence[int]:
            return spec.block_ids[i * self.chunk_blocks:(i + 1) * self.chunk_blocks]

        here = [i for i in range(len(keys)) if self.shared is not None and missing[i][:1] == (0,)]
        if here:  # in place, into the daemon's slots (node/cache_slots.py)
            with self.shared.writing([keys[i] for i in here], self.chunk_layout.nbytes) as writes:
                stored += self.slots.save([(w, blocks_of(i)) for i, w in zip(here, writes) if w is not None])
            for i in here:
                missing[i] = missing[i][1:]
        for i, key in enumerate(keys):
            blocks = blocks_of(i)
            if not missing[i]:
                continue
            plan = plan_cache_to_pool(self.kv, self.chunk_layout, blocks=blocks, pages=pages)
            out = torch.empty(self.chunk_layout.nbytes, dtype=torch.uint8, device=self.kv_buffer.device)
            copy_ranges(self.kv_buffer, out, plan)
            value = out.cpu().numpy() if out.is_cuda else out.numpy()
            if self.cache.put(key, memoryview(value), missing[i]):
                stored += value.nbytes
        return len(keys), stored

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.lookups.close()
        self.cache.close()


def _readonly_tensor(value: object) -> torch.Tensor:
    with warnings.catch_warnings():
        # Values from Redis are immutable bytes; torch warns that it cannot mark the tensor
        # read-only. It is only ever read (the source of a copy).
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(value, dtype=torch.uint8)  # type: ignore[arg-type]


class CacheMiss(Exception):
    """A chunk the lookup found is gone (deleted by the operator, a corrupt file, a remote tier
    that evicted it): an expected race, not a bug."""


