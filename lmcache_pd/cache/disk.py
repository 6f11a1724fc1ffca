"""Local-disk tier: one checksummed file per chunk, written atomically, kept across restarts.

Files live at ``<path>/<tenant tag>/<2 hex>/<64 hex>.chunk``. A write goes to a temporary file
in the same folder and is renamed into place, so a reader (or a restarted instance) sees a
whole record or none; a record torn by a crash, or damaged later, fails its checksum on read
and is deleted and treated as a miss. At ``open()`` the tier indexes the files already there
(oldest access first, by mtime; a hit refreshes the mtime) and removes leftover temporary
files. Pins are held in memory only: they do not survive a restart.

The folder is private: created 0700, it must be owned by this user and not a symbolic link,
and so must be every folder on the way to it (or root's; a folder others may write to needs
the sticky bit, as /tmp has). Files are created 0600 (temporary ones with O_EXCL), never
through a link. One process holds a folder at a time (a lock file): a second is refused. A file
whose size differs from its index entry is a miss. Records carry a tag under the deployment's
key (tier.Records): without a secret that key is public, and the private folder is the guard.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from lmcache_pd.cache.bounded import BoundedTier
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.tier import Buffer
from lmcache_pd.config import Positive
from lmcache_pd.errors import ConfigError

log = logging.getLogger(__name__)

SUFFIX = ".chunk"
TMP_SUFFIX = ".tmp"
LOCK = ".lock"
_FIELD = "cache.tiers.options.path"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
        self._lock_fd: int | None = None

    def _path(self, key: ChunkKey) -> Path:
        h = key.hex
        return self.root / key.tenant / h[:2] / (h + SUFFIX)

    def open(self) -> None:
        _private_dir(self.root)
        self._lock_fd = _hold(self.root / LOCK)
        found: list[tuple[float, ChunkKey, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f == LOCK:
                    continue
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
        with self._lock:
            indexed = self._index.size(key)
        try:
            fd = os.open(p, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:  # evicted or cleared meanwhile
            self._forget([key])
            self._count(misses=1)
            return None
        except OSError as e:  # a link (ELOOP), or unreadable: not ours
            log.warning("disk tier: cannot read %s: %s; treated as a miss", p, e)
            self._forget([key])
            self._count(misses=1, corrupt=1)
            return None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != indexed:  # grown or shrunk behind our back: never read a size we did not write
                record, n = bytearray(0), 0
            else:
                record = bytearray(size)
                n = f.readinto(record)
        if n:
            os.utime(p)  # the mtime is the access order kept across restarts
        payload = self.records.decode(key, memoryview(record)[:n])
        if payload is None:
            log.warning("disk tier: %s is not a record of ours (size, key or tag); deleted, treated as a miss", p)
            self._forget([key])
            p.unlink(missing_ok=True)
            self._count(misses=1, corrupt=1)
            return None
        with self._lock:
            self._index.touch(key)
        self._count(hits=1, read_bytes=len(payload))
        return payload

    def put(self, key: ChunkKey, value: Buffer) -> bool:
        head, payload = self.records.encode(key, value)
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
            p.parent.parent.mkdir(mode=0o700, exist_ok=True)
            p.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
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

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
        super().close()


def _private_dir(root: Path) -> None:
    """Create ``root`` 0700 and check that no other user can change it or the way to it."""
    uid = os.geteuid()
    root = Path(os.path.abspath(root))
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(root)
    except OSError as e:
        raise ConfigError(f"disk tier folder {root}: {e}", field=_FIELD) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"disk tier folder {root} is a link or not a folder: give the tier a folder of its "
                          "own", field=_FIELD)
    if st.st_uid != uid:
        raise ConfigError(f"disk tier folder {root} belongs to user {st.st_uid}, not to this one ({uid}): "
                          "another user could plant chunks there; give the tier a folder of its own", field=_FIELD)
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)  # ours: make it private
    for parent in root.parents:
        pst = os.stat(parent)
        others_write = pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX
        if pst.st_uid not in (uid, 0) or others_write:
            raise ConfigError(f"disk tier folder {root}: {parent} can be changed by another user (owner "
                              f"{pst.st_uid}, mode {stat.S_IMODE(pst.st_mode):o}), who could swap the tier's "
                              "folder; give the tier a folder under a private one", field=_FIELD)


def _hold(path: Path) -> int:
    """Lock the folder for this process (closed at exit, the lock goes with it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"disk tier folder {path.parent} is used by another process: give each worker a folder "
                          "of its own ({instance} and {rank} in the path)", field=_FIELD) from None
    return fd
