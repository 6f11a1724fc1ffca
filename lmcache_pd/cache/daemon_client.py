"""A client of the node cache daemon (L4; docs/cache_server.md): its connection and its mapping
of the daemon's segment, as the ``server`` tier uses them.

Every call is one request and its reply, under ``timeout_s``; a daemon that is gone, or does not
answer in time, raises :class:`DaemonGone` (the tier above counts it as a miss). Thread-safe: one
request in flight per client. The mapping outlives :meth:`DaemonClient.close` while a copy still
reads or writes it (:meth:`DaemonClient.mapped`): unmapping memory under a copy would crash the
engine, not just fail a request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import msgspec

from lmcache_pd.cache import daemon_wire as W
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import Segment, receive_segment


class DaemonGone(ConnectionError):
    """The cache daemon cannot be reached, closed the connection, or did not answer in time."""


class DaemonRefused(DaemonGone):
    """The cache daemon does not serve this client (its reason says which setting differs)."""


class DaemonClient:
    def __init__(self, path: str, *, timeout_s: float, chunk_tokens: int | None = None):
        """Connect to the daemon at ``path`` and map its segment (``timeout_s``: each call's
        deadline); an engine says its ``chunk_tokens`` (a daemon serving another size refuses it:
        :class:`DaemonRefused`)."""
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self.before_unmap: Callable[[], None] | None = None
        """Run once before the segment is unmapped (the GPU's registration of it ends there)."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
            self.segment: Segment = receive_segment(self._sock)
        except OSError as e:
            self._sock.close()
            raise DaemonGone(f"cache daemon at {path}: {e}") from None
        if chunk_tokens is not None:
            try:
                self._call(W.Hello(chunk_tokens))
            except DaemonGone:
                self.close()
                raise

    def close(self) -> None:
        """Close the connection; the mapping goes once no copy uses it (:meth:`mapped`)."""
        with self._lock:
            self._closed = True
            self._sock.close()
            last = self._users == 0
        if last:
            self._unmap()

    @contextlib.contextmanager
    def mapped(self) -> Iterator[Segment]:
        """The segment, kept mapped until the block ends even if the client is closed meanwhile."""
        with self._lock:
            if self._closed:
                raise DaemonGone("the cache daemon connection is closed")
            self._users += 1
        try:
            yield self.segment
        finally:
            with self._lock:
                self._users -= 1
                last = self._closed and self._users == 0
            if last:
                self._unmap()

    def _unmap(self) -> None:
        hook, self.before_unmap = self.before_unmap, None
        try:
            if hook is not None:
                hook()
        finally:
            self.segment.close()

    def _call(self, req: W.Request) -> W.Reply:
        with self._lock:
            if self._closed:
                raise DaemonGone("the cache daemon connection is closed")
            try:
                W.send(self._sock, req)
                reply = W.recv_reply(self._sock)
            except TimeoutError:
                raise DaemonGone(f"the cache daemon did not answer within {self.timeout_s:g} s") from None
            except (OSError, msgspec.DecodeError, ValueError) as e:
                raise DaemonGone(f"the cache daemon connection failed: {e}") from None
        if isinstance(reply, W.Refused):
            raise DaemonRefused(f"the cache daemon refused: {reply.reason}")
        return reply

    # --- saves ----------------------------------------------------------------------------
    def save(self, key: ChunkKey, payload: memoryview | bytes, owner: str, crc: int) -> bool:
        """Reserve a slot, copy ``payload`` into it, commit: False when the daemon stores it
        already or has no room. (The one-copy path gathers straight into :meth:`reserve`'s slot.)"""
        offset = self.reserve(key, len(payload), owner)
        if offset < 0:
            return False
        with self.mapped() as seg:
            seg.view[offset:offset + len(payload)] = payload
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
        return self.status().stats

    def status(self) -> W.StatsReply:
        """Counters, occupancy per size class and the clients connected (``lmcache-pd server --status``)."""
        reply = self._call(W.Stats())
        assert isinstance(reply, W.StatsReply)
        return reply
