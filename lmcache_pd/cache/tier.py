"""The contract of one cache tier, and the record format of tiers that store bytes elsewhere.

A tier maps :class:`~lmcache_pd.cache.keys.ChunkKey` -> the bytes of one chunk (its pages, laid
out ``[layer][block][block_bytes]``). Call sequence, as :class:`~lmcache_pd.cache.store.TieredCache`
drives it:

  1. ``Tier(options, instance=..., rank=...)`` assigns fields only; ``open()`` once (create folders,
     index what survived a restart, connect);
  2. any number of ``contains`` / ``get`` / ``put`` / ``delete``, from several threads at once;
  3. ``pin`` / ``unpin`` (a pinned chunk is never evicted), ``clear`` (all, or one tenant);
  4. ``close()`` once.

A tier never raises on the data path: a tier that is down or a record that fails its checksum
is a miss (counted in :class:`TierStats`), a put that does not fit is refused (returns False).
Values handed to ``put`` belong to the tier afterwards (the memory tier keeps them as given).
"""

from __future__ import annotations

import hmac
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgspec

from lmcache_pd.cache.holds import Holds
from lmcache_pd.cache.keys import DIGEST_BYTES, ChunkKey

Buffer = bytes | bytearray | memoryview


@dataclass
class TierStats:
    """Counters of one tier since it opened; sizes are now. ``-1``: the tier cannot tell."""

    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = -1
    hits: int = 0
    misses: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    evictions: int = 0
    corrupt: int = 0
    """Records that failed their checksum (treated as misses and deleted)."""
    errors: int = 0
    """Operations that failed because the tier was unreachable (treated as misses)."""
    up: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Tier(ABC):
    """One level of the cache; subclasses set ``name`` and ``Options`` (a msgspec Struct)."""

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]]
    remote: ClassVar[bool] = False
    """Reached over the network (a server shared by instances), as opposed to this host's
    memory or disk. The decode side skips transfers only for chunks in local tiers."""

    records: Records
    """How this tier's bytes are sealed when they leave the process (disk, remote): set by
    build_cache from the deployment's secret, public until then."""

    def __init__(self, options: Any, *, instance: str, rank: int):
        """``instance`` and TP ``rank`` name this worker (for paths and logs)."""
        self.options = options
        self.instance = instance
        self.rank = rank
        self.records = PUBLIC_RECORDS
        self._stats = TierStats()
        self._stats_lock = threading.Lock()

    def open(self) -> None:
        """Called once before any other method."""

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys this tier holds now (one round trip for a remote tier)."""

    @abstractmethod
    def get(self, key: ChunkKey) -> Buffer | None:
        """The chunk's bytes, or None (absent, corrupt or tier down)."""

    @abstractmethod
    def put(self, key: ChunkKey, value: Buffer) -> bool:
        """Store (or refresh) a chunk; False when it was not stored."""

    @abstractmethod
    def delete(self, keys: Iterable[ChunkKey]) -> int:
        """Remove these chunks (pinned ones too); returns how many were there."""

    @abstractmethod
    def clear(self, tenant: str | None = None) -> int:
        """Remove every chunk, or every chunk of one tenant tag; returns how many."""

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        """Exempt these chunks from eviction until unpinned (tiers that evict override this)."""

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        """Make pinned chunks evictable again."""

    def attach_holds(self, holds: Holds) -> None:
        """Honour these holds when evicting (tiers that evict by themselves override this)."""

    def stats(self) -> TierStats:
        with self._stats_lock:
            return TierStats(**self._stats.as_dict())

    def close(self) -> None:
        """Called once; no other method is called afterwards."""

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)


# --- record format, for tiers whose bytes leave this process (disk, remote) ------------------
# magic, format version, key digest, payload length, then an HMAC-SHA256 tag over all of that
# and the payload, under a key derived from the deployment's secret (``Records``). Keys of
# chunks are computable by anyone (they hash the prompt): the tag is what makes a record ours.
RECORD_MAGIC = b"LPDC"
RECORD_VERSION = 2
_HEAD = struct.Struct(f"<4sB3x{DIGEST_BYTES}sQ")
_TAG_BYTES = 32
RECORD_HEADER_BYTES = _HEAD.size + _TAG_BYTES


class Records:
    """Encodes and checks records under one key (``Keyring.derive(b"cache-records")``).

    With a secret, nobody without it can plant a record that an instance loads; without one the
    key is public, so the tag only catches damage, and the tiers' storage must be private."""

    def __init__(self, key: bytes):
        self.key = key

    def _tag(self, head: bytes, payload: Buffer) -> bytes:
        h = hmac.new(self.key, head, "sha256")
        h.update(payload)
        return h.digest()

    def encode(self, key: ChunkKey, payload: Buffer) -> list[Buffer]:
        """Header (with its tag) and payload as two buffers (writers send them without joining)."""
        head = _HEAD.pack(RECORD_MAGIC, RECORD_VERSION, key.digest, len(memoryview(payload)))
        return [head + self._tag(head, payload), payload]

    def decode(self, key: ChunkKey, record: Buffer) -> memoryview | None:
        """The payload of a record stored under ``key``, or None if it is not exactly that record.

        Checks magic, version, that it was written for this very key (a file copied or renamed
        to another key is caught), its length, and its tag (damage, or a record not ours)."""
        view = memoryview(record)
        if len(view) < RECORD_HEADER_BYTES:
            return None
        magic, version, digest, length = _HEAD.unpack_from(view)
        if magic != RECORD_MAGIC or version != RECORD_VERSION or digest != key.digest:
            return None
        payload = view[RECORD_HEADER_BYTES:]
        if len(payload) != length:
            return None
        head, tag = bytes(view[:_HEAD.size]), bytes(view[_HEAD.size:RECORD_HEADER_BYTES])
        return payload if hmac.compare_digest(self._tag(head, payload), tag) else None


PUBLIC_RECORDS = Records(b"lmcache-pd: cache records without a secret")
"""What tiers use until they are given the deployment's (build_cache)."""
