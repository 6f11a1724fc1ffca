"""The node cache daemon's server (L4; docs/cache_server.md): a Unix socket in front of a
:class:`~lmcache_pd.cache.slots.SlotStore` and its shared segment.

Each client connection gets the segment's descriptor, then is served by a thread of its own,
one request at a time (daemon_wire.py). A connection that closes, or sends a frame that is not a
request (counted in ``garbled``), is dropped with everything it held: its unfinished writes are
freed (never visible) and its leases end. Only this user's processes connect: the socket file is
created mode 600, and a peer of another user (the kernel's credentials of the connection, should
the file's mode be changed) is refused before it sees the segment, and counted in ``strangers``.

Its HTTP side (``/metrics``, ``/cache/stats``, ``/cache/clear``) is daemon_http.py; its own tiers
below the segment (disk, Redis: written through, read through) are daemon_tiers.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time

import msgspec

from lmcache_pd.cache import daemon_wire as W
from lmcache_pd.cache.daemon_tiers import LowerTiers
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import Segment, SlotStore, send_segment
from lmcache_pd.cache.store import TieredCache
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)


class CacheDaemon:
    def __init__(self, path: str, *, segment_bytes: int, slab_bytes: int = 64 << 20, eviction: str = "lru",
                 lower: TieredCache | None = None, chunk_tokens: int | None = None):
        """``lower``: the daemon's own tiers below its memory (not started yet; it owns them);
        ``chunk_tokens``: the one chunk size it serves (engines saying another are refused)."""
        self.path = path
        self.chunk_tokens = chunk_tokens
        self.store = SlotStore(segment_bytes, slab_bytes=slab_bytes, eviction=eviction)
        self.segment = Segment.create(segment_bytes)
        self.lower = LowerTiers(lower, self.store, self.segment) if lower is not None else None
        self.clients = 0
        self.garbled = 0
        """Connections dropped for a frame that was not a request."""
        self.strangers = 0
        """Connections refused: their process runs as another user."""
        self._info: dict[str, list] = {}  # client id -> [pid, connected at, requests]
        self._ids = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._accept: threading.Thread | None = None

    def start(self) -> None:
        if self.lower is not None:
            self.lower.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket file left by a daemon that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born mode 600
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(64)
        self._sock = sock
        self._accept = thread(self._accept_loop, "pd-cache-daemon")
        self._accept.start()

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._accept is not None:
            self._accept.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.lower is not None:
            self.lower.close()
        self.segment.close()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
            if uid != os.getuid():
                with self._lock:
                    self.strangers += 1
                log.warning("cache daemon: refused a connection from pid %d of uid %d (not this user)", pid, uid)
                conn.close()
                continue
            with self._lock:
                self._ids += 1
                cid = f"c{self._ids}"
                self._conns.add(conn)
                self.clients += 1
                self._info[cid] = [pid, time.time(), 0]
            thread(self._serve, f"pd-cache-{cid}", conn, cid).start()

    def _serve(self, conn: socket.socket, cid: str) -> None:
        owners: set[str] = set()
        try:
            send_segment(conn, self.segment)
            while not self._stop.is_set():
                req = W.recv_request(conn)
                self._info[cid][2] += 1
                try:
                    W.send(conn, self._handle(req, cid, owners))
                except _Refuse as e:
                    log.warning("cache daemon: refused client %s: %s", cid, e)
                    W.send(conn, W.Refused(str(e)))
                    return
        except (msgspec.DecodeError, ValueError) as e:
            with self._lock:
                self.garbled += 1
            log.warning("cache daemon: dropped client %s: %s", cid, e)
        except (ConnectionError, OSError):
            pass  # it went away (or we are closing)
        except Exception:  # noqa: BLE001 - a bug of ours: this client is dropped, the daemon serves on
            log.exception("cache daemon: serving client %s failed", cid)
        finally:
            for owner in owners:
                self.store.drop_owner(owner)
            with self._lock:
                self._conns.discard(conn)
                self.clients -= 1
                self._info.pop(cid, None)
            conn.close()

    def _handle(self, req: W.Request, cid: str, owners: set[str]) -> W.Reply:
        s = self.store
        if isinstance(req, (W.Reserve, W.Commit, W.Abort, W.Acquire, W.Release)):
            owner = f"{cid}:{req.owner}"  # scoped to the connection: no client touches another's
            owners.add(owner)
        if isinstance(req, W.Reserve):
            slot = s.reserve(_key(req.key), req.nbytes, owner)
            return W.Reserved(slot.offset if slot is not None else -1)
        low = self.lower
        if isinstance(req, W.Hello):
            if self.chunk_tokens is not None and req.chunk_tokens != self.chunk_tokens:
                raise _Refuse(f"this daemon serves chunks of {self.chunk_tokens} tokens "
                              f"(cache_server.chunk_tokens), not {req.chunk_tokens} (cache.chunk_tokens)")
            return W.Done()
        if isinstance(req, W.Commit):
            ok = s.commit(_key(req.key), owner, req.crc)
            if ok and low is not None:
                low.committed(_key(req.key))
            return W.Done(ok)
        if isinstance(req, W.Abort):
            return W.Done(s.abort(_key(req.key), owner))
        if isinstance(req, W.Acquire):
            keys = [_key(k) for k in req.keys]
            got = s.acquire(keys, owner)
            if low is not None:  # what the segment misses, promoted from below in order
                for k in keys[len(got):]:
                    if not low.promote(k, f"{owner}:promote"):
                        break
                    got += s.acquire([k], owner, count=False)
            return W.Slots([(x.offset, x.nbytes, x.crc) for x in got])
        if isinstance(req, W.Release):
            s.release(owner)
            return W.Done()
        if isinstance(req, W.Contains):
            keys = [_key(k) for k in req.keys]
            flags = s.contains(keys)
            if low is not None and not all(flags):
                below = iter(low.contains([k for k, f in zip(keys, flags) if not f]))
                flags = [f or next(below) for f in flags]
            return W.Flags(flags)
        if isinstance(req, W.Delete):
            keys = [_key(k) for k in req.keys]
            if low is not None:
                low.forget(keys)
            return W.Done(count=s.delete(keys))
        if isinstance(req, W.Clear):
            return W.Done(count=self.clear(req.tenant))
        if isinstance(req, W.Pin):
            keys = [_key(k) for k in req.keys]
            (s.pin if req.pinned else s.unpin)(keys)
            if low is not None:
                low.pin(keys, req.pinned)
            return W.Done()
        return self.stats_reply()

    def clear(self, tenant: str | None = None) -> int:
        """Remove every chunk (of one tenant tag), from the lower tiers too; returns how many the
        segment held."""
        if self.lower is not None:
            self.lower.forget(None, tenant)
        return self.store.clear(tenant)

    def stats_reply(self) -> W.StatsReply:
        """Counters, occupancy per size class, and the clients connected now."""
        st = self.store.stats()
        with self._lock:
            counters = {"clients": self.clients, "garbled": self.garbled, "strangers": self.strangers}
            clients = [W.ClientInfo(cid, pid, since, n) for cid, (pid, since, n) in self._info.items()]
        if self.lower is not None:
            counters |= self.lower.stats()
        return W.StatsReply({f: getattr(st, f) for f in st.__dataclass_fields__} | counters,
                            [W.ClassInfo(c.slot_bytes, c.slabs, c.slots, c.used) for c in self.store.classes()],
                            clients)


class _Refuse(Exception):
    """A client this daemon does not serve: told why, then its connection closes."""


def _key(k: W.Key) -> ChunkKey:
    return ChunkKey(k[0], k[1])
