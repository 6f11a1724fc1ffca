"""A client of the node cache daemon (L4; docs/cache_server.md): its connection and its mapping
of the daemon's segment. What the ``server`` tier (not built yet) will use.

Every call is one request and its reply, under ``timeout_s``; a daemon that is gone, or does not
answer in time, raises :class:`DaemonGone` (the tier above counts it as a miss). Thread-safe: one
request in flight per client.
"""

from __future__ import annotations

import socket
import threading

import msgspec

from lmcache_pd.cache import daemon_wire as W
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import Segment, receive_segment


class DaemonGone(ConnectionError):
    """The cache daemon cannot be reached, closed the connection, or did not answer in time."""


class DaemonClient:
    def __init__(self, path: str, *, timeout_s: float):
        """Connect to the daemon at ``path`` and map its segment (``timeout_s``: each call's deadline)."""
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
            self.segment: Segment = receive_segment(self._sock)
        except OSError as e:
            self._sock.close()
            raise DaemonGone(f"cache daemon at {path}: {e}") from None

    def close(self) -> None:
        self._sock.close()
        self.segment.close()

    def _call(self, req: W.Request) -> W.Reply:
        with self._lock:
            try:
                W.send(self._sock, req)
                reply = W.recv_reply(self._sock)
            except TimeoutError:
                raise DaemonGone(f"the cache daemon did not answer within {self.timeout_s:g} s") from None
            except (OSError, msgspec.DecodeError, ValueError) as e:
                raise DaemonGone(f"the cache daemon connection failed: {e}") from None
        if isinstance(reply, W.Refused):
            raise DaemonGone(f"the cache daemon refused: {reply.reason}")
        return reply

    # --- saves ----------------------------------------------------------------------------
    def save(self, key: ChunkKey, payload: memoryview | bytes, owner: str, crc: int) -> bool:
        """Reserve a slot, copy ``payload`` into it, commit: False when the daemon stores it
        already or has no room. (The one-copy path gathers straight into :meth:`reserve`'s slot.)"""
        offset = self.reserve(key, len(payload), owner)
        if offset < 0:
            return False
        self.segment.view[offset:offset + len(payload)] = payload
        return self.commit(key, owner, crc)

    def reserve(self, key: ChunkKey, nbytes: int, owner: str) -> int:
        reply = self._call(W.Reserve(tuple(key), nbytes, owner))
        assert isinstance(reply, W.Reserved)
        return reply.offset

    def commit(self, key: ChunkKey, owner: str, crc: int) -> bool:
        reply = self._call(W.Commit(tuple(key), owner, crc))
        return isinstance(reply, W.Done) and reply.ok

    def abort(self, key: ChunkKey, owner: str) -> bool:
        reply = self._call(W.Abort(tuple(key), owner))
        return isinstance(reply, W.Done) and reply.ok

    # --- loads ----------------------------------------------------------------------------
    def acquire(self, keys: list[ChunkKey], owner: str) -> list[tuple[int, int, int]]:
        """(offset, bytes, crc) of the leading chunks held, leased to ``owner`` until :meth:`release`."""
        reply = self._call(W.Acquire([tuple(k) for k in keys], owner))
        assert isinstance(reply, W.Slots)
        return reply.slots

    def release(self, owner: str) -> None:
        self._call(W.Release(owner))

    def contains(self, keys: list[ChunkKey]) -> list[bool]:
        reply = self._call(W.Contains([tuple(k) for k in keys]))
        assert isinstance(reply, W.Flags)
        return reply.flags

    def delete(self, keys: list[ChunkKey]) -> int:
        reply = self._call(W.Delete([tuple(k) for k in keys]))
        return reply.count if isinstance(reply, W.Done) else 0

    def clear(self, tenant: str | None = None) -> int:
        reply = self._call(W.Clear(tenant))
        return reply.count if isinstance(reply, W.Done) else 0

    def pin(self, keys: list[ChunkKey], pinned: bool = True) -> None:
        self._call(W.Pin([tuple(k) for k in keys], pinned))

    def stats(self) -> dict[str, int]:
        reply = self._call(W.Stats())
        assert isinstance(reply, W.StatsReply)
        return reply.stats
