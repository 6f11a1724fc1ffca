"""Local-disk tier: one checksummed file per chunk, written atomically, kept across restarts.

Files live at ``<path>/<tenant tag>/<2 hex>/<64 hex>.chunk``. A write goes to a temporary file
in the same folder and is renamed into place, so a reader (or a restarted instance) sees a
whole record or none; a record torn by a crash, or damaged later, fails its checksum on read
and is deleted and treated as a miss. At ``open()`` the tier indexes the files already there
(oldest access first, by mtime; a hit refreshes the mtime) and removes leftover temporary
files. Pins are held in memory only: they do not survive a restart.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from lmcache_pd.cache.bounded import BoundedTier
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer, decode_record, encode_record
from lmcache_pd.config import Positive

log = logging.getLogger(__name__)

SUFFIX = ".chunk"
TMP_SUFFIX = ".tmp"


class DiskOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    path: str = "/tmp/lmcache-pd-cache/{instance}.{rank}"
    """Folder of this worker's chunks; ``{instance}`` and ``{rank}`` are replaced. Give each
    worker its own folder (two processes must not share one)."""
    size_mib: Positive = 8192
    """Bytes of chunk files this tier keeps at most; least recently used go first."""
    fsync: bool = False
    """fsync each file before renaming it into place (survives power loss, slower). Without it
    a crash can leave a torn record, which the checksum then rejects."""


class DiskTier(BoundedTier):
    name = "disk"
    Options = DiskOptions

    def __init__(self, options: DiskOptions, *, instance: str, rank: int):
        super().__init__(options, instance=instance, rank=rank, capacity=options.size_mib << 20)
        self.root = Path(options.path.replace("{instance}", instance).replace("{rank}", str(rank)))
        self._writing: set[ChunkKey] = set()  # indexed (space reserved), file not renamed in yet

    def _path(self, key: ChunkKey) -> Path:
        h = key.hex
        return self.root / key.tenant / h[:2] / (h + SUFFIX)

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, ChunkKey, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                p = Path(dirpath) / f
                if f.endswith(TMP_SUFFIX):  # a write that never finished
                    p.unlink(missing_ok=True)
                    continue
                key = self._key_of(p)
                if key is None:
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime, key, st.st_size))
        found.sort(key=lambda x: x[0])
        with self._lock:
            for _, key, size in found:
                self._index.add(key, size)
            victims = self._index.make_room(0)
        self._unlink(victims or [])
        log.info("disk tier %s: %d chunks (%.1f MiB) found", self.root, len(self._index), self._index.bytes / 2**20)

    def _key_of(self, p: Path) -> ChunkKey | None:
        name = p.name
        if not name.endswith(SUFFIX) or len(name) != 64 + len(SUFFIX):
            return None
        try:
            digest = bytes.fromhex(name[:64])
        except ValueError:
            return None
        if p.parent.parent.parent != self.root or p.parent.name != name[:2]:
            return None
        return ChunkKey(p.parent.parent.name, digest)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._index and k not in self._writing for k in keys]

    def get(self, key: ChunkKey) -> Buffer | None:
        with self._lock:
            known = key in self._index and key not in self._writing
        if not known:
            self._count(misses=1)
            return None
        p = self._path(key)
        try:
            with open(p, "rb") as f:
                record = bytearray(os.fstat(f.fileno()).st_size)
                n = f.readinto(record)
            os.utime(p)  # the mtime is the access order kept across restarts
        except FileNotFoundError:  # evicted or cleared meanwhile
            self._forget([key])
            self._count(misses=1)
            return None
        payload = decode_record(key, memoryview(record)[:n])
        if payload is None:
            log.warning("disk tier: %s failed its checksum; deleted, treated as a miss", p)
            self._forget([key])
            p.unlink(missing_ok=True)
            self._count(misses=1, corrupt=1)
            return None
        with self._lock:
            self._index.touch(key)
        self._count(hits=1, read_bytes=len(payload))
        return payload

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        head, payload = encode_record(key, value)
        size = len(head) + len(memoryview(payload))
        with self._lock:
            if self._index.touch(key):  # same key, same bytes (content-addressed): just refresh
                return True
            victims = self._index.make_room(size, busy=self._writing)
            if victims is None:
                return False
            self._index.add(key, size)  # reserve now, so concurrent puts cannot overshoot
            self._writing.add(key)
        self._unlink(victims)
        p = self._path(key)
        tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(payload)
                if self.options.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, p)
        except OSError as e:
            log.warning("disk tier: cannot write %s: %s", p, e)
            tmp.unlink(missing_ok=True)
            self._forget([key])
            self._count(errors=1)
            return False
        finally:
            with self._lock:
                self._writing.discard(key)
                orphan = key not in self._index  # deleted or cleared while it was written
        if orphan:
            p.unlink(missing_ok=True)
            return False
        self._count(written_bytes=len(memoryview(payload)), evictions=len(victims))
        return True

    def _unlink(self, keys: Iterable[ChunkKey]) -> None:
        for k in keys:
            self._path(k).unlink(missing_ok=True)

    def _forget(self, keys: Iterable[ChunkKey]) -> int:
        with self._lock:
            return sum(self._index.pop(k) is not None for k in keys)

    def delete(self, keys: Iterable[ChunkKey]) -> int:
        keys = list(keys)
        with self._lock:
            self._index.pinned.difference_update(keys)
        n = self._forget(keys)
        self._unlink(keys)
        return n
