"""Remote tier on Redis or Valkey (same protocol), shared by every instance that points at it.

Each chunk is one string value holding a checksummed record, under
``<key_prefix><tenant tag>:<64 hex>``. Every command runs under ``timeout_s``. When the server
cannot be reached the tier goes *down*: it logs one warning (naming the url and the config field),
answers every call at once as a miss / refused write, and tries again after ``retry_s``; the
first command that succeeds brings it back up (logged). Requests are then served from the other
tiers or recomputed: a remote tier never holds up a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

import msgspec

from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer, Tier, TierStats
from lmcache_pd.config import NonNegative, Seconds, redact

log = logging.getLogger(__name__)


class RedisOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = "redis://127.0.0.1:6379/0"
    """``redis://[user:password@]host:port/db`` (``rediss://`` for TLS); Valkey takes the same."""
    key_prefix: str = "lmpd:"
    timeout_s: Seconds = 0.5
    """Deadline of one command (connect included); past it the tier counts as down."""
    retry_s: Seconds = 5.0
    """While down, how long to answer misses before trying the server again."""
    ttl_s: NonNegative = 0
    """Expire chunks after this many seconds (0: never; rely on the server's maxmemory policy).
    A pinned chunk does not expire."""


class RedisTier(Tier):
    name = "redis"
    Options = RedisOptions
    remote = True

    def __init__(self, options: RedisOptions, *, instance: str, rank: int):
        super().__init__(options, instance=instance, rank=rank)
        self._client = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_since: float | None = None

    def open(self) -> None:
        import redis  # optional dependency: imported only when this tier is configured

        o = self.options
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._client = redis.Redis.from_url(o.url, socket_timeout=o.timeout_s, socket_connect_timeout=o.timeout_s,
                                            retry_on_timeout=False, health_check_interval=0)
        self._call(lambda c: c.ping(), default=None)  # reports once if the server is down at start

    def _name(self, key: ChunkKey) -> str:
        return f"{self.options.key_prefix}{key.tenant}:{key.hex}"

    def _call(self, fn, default):
        """Run one command (or pipeline) under the tier's up/down state."""
        now = time.monotonic()
        if now < self._down_until:
            self._count(errors=1)
            return default
        try:
            out = fn(self._client)
        except self._errors as e:
            with self._lock:
                first = self._down_since is None
                if first:
                    self._down_since = now
                self._down_until = time.monotonic() + self.options.retry_s
            with self._stats_lock:
                self._stats.errors += 1
                self._stats.up = False
            if first:
                log.warning("redis tier %s is unreachable (%s): serving from the other tiers and by recompute; "
                            "retrying every %g s (`cache.tiers[].options.retry_s`, command deadline "
                            "`cache.tiers[].options.timeout_s`)", redact(self.options.url), redact(str(e)),
                            self.options.retry_s)
            return default
        with self._lock:
            was_down, self._down_since = self._down_since, None
        if was_down is not None:
            with self._stats_lock:
                self._stats.up = True
            log.warning("redis tier %s is reachable again after %.1f s", redact(self.options.url), now - was_down)
        return out

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []

        def run(c):
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._name(k))
            return [bool(x) for x in pipe.execute()]

        return self._call(run, default=[False] * len(keys))

    def get(self, key: ChunkKey) -> Buffer | None:
        record = self._call(lambda c: c.get(self._name(key)), default=None)
        if record is None:
            self._count(misses=1)
            return None
        payload = self.records.decode(key, record)
        if payload is None:
            log.warning("redis tier: %s failed its checksum; deleted, treated as a miss", self._name(key))
            self._call(lambda c: c.delete(self._name(key)), default=0)
            self._count(misses=1, corrupt=1)
            return None
        self._count(hits=1, read_bytes=len(payload))
        return payload

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        head, payload = self.records.encode(key, value)
        record = b"".join((head, payload))  # one SET value: redis-py takes one buffer
        ttl = self.options.ttl_s or None
        ok = self._call(lambda c: c.set(self._name(key), record, ex=ttl), default=False)
        if ok:
            self._count(written_bytes=len(memoryview(payload)))
        return bool(ok)

    def delete(self, keys: Iterable[ChunkKey]) -> int:
        names = [self._name(k) for k in keys]
        return int(self._call(lambda c: c.delete(*names), default=0)) if names else 0

    def clear(self, tenant: str | None = None) -> int:
        pattern = f"{self.options.key_prefix}{tenant or '*'}:*"

        def run(c):
            n = 0
            batch = []
            for name in c.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 1000:
                    n += c.delete(*batch)
                    batch = []
            return n + (c.delete(*batch) if batch else 0)

        return int(self._call(run, default=0))

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        if self.options.ttl_s:
            names = [self._name(k) for k in keys]
            self._call(lambda c: [c.persist(n) for n in names], default=None)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        if self.options.ttl_s:
            names = [self._name(k) for k in keys]
            self._call(lambda c: [c.expire(n, self.options.ttl_s) for n in names], default=None)

    def stats(self) -> TierStats:
        s = super().stats()
        s.entries = s.bytes = -1  # shared with other instances: not this worker's to count
        return s

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
