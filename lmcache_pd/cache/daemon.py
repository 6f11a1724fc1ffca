"""The node cache daemon's server (L4; docs/cache_server.md): a Unix socket in front of a
:class:`~lmcache_pd.cache.slots.SlotStore` and its shared segment.

Each client connection gets the segment's descriptor, then is served by a thread of its own,
one request at a time (daemon_wire.py). A connection that closes, or sends a frame that is not a
request (counted in ``garbled``), is dropped with everything it held: its unfinished writes are
freed (never visible) and its leases end. The socket file is created mode 600 in a folder the
caller provides: only this user's processes connect.

Not built yet (issue 19): the ``server`` tier that engines use, the daemon's own lower tiers,
the CLI, metrics, and authentication beyond the file mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

import msgspec

from lmcache_pd.cache import daemon_wire as W
from lmcache_pd.cache.keys import ChunkKey
from lmcache_pd.cache.slots import Segment, SlotStore, send_segment

log = logging.getLogger(__name__)


class CacheDaemon:
    def __init__(self, path: str, *, segment_bytes: int, slab_bytes: int = 64 << 20):
        self.path = path
        self.segment = Segment.create(segment_bytes)
        self.store = SlotStore(segment_bytes, slab_bytes=slab_bytes)
        self.clients = 0
        self.garbled = 0
        """Connections dropped for a frame that was not a request."""
        self._ids = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._accept: threading.Thread | None = None

    def start(self) -> None:
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
        self._accept = threading.Thread(target=self._accept_loop, name="pd-cache-daemon", daemon=True)
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
        self.segment.close()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._ids += 1
                cid = f"c{self._ids}"
                self._conns.add(conn)
                self.clients += 1
            threading.Thread(target=self._serve, args=(conn, cid), name=f"pd-cache-{cid}", daemon=True).start()

    def _serve(self, conn: socket.socket, cid: str) -> None:
        owners: set[str] = set()
        try:
            send_segment(conn, self.segment)
            while not self._stop.is_set():
                req = W.recv_request(conn)
                W.send(conn, self._handle(req, cid, owners))
        except (msgspec.DecodeError, ValueError) as e:
            with self._lock:
                self.garbled += 1
            log.warning("cache daemon: dropped client %s: %s", cid, e)
        except (ConnectionError, OSError):
            pass  # it went away (or we are closing)
        finally:
            for owner in owners:
                self.store.drop_owner(owner)
            with self._lock:
                self._conns.discard(conn)
                self.clients -= 1
            conn.close()

    def _handle(self, req: W.Request, cid: str, owners: set[str]) -> W.Reply:
        s = self.store
        if isinstance(req, (W.Reserve, W.Commit, W.Abort, W.Acquire, W.Release)):
            owner = f"{cid}:{req.owner}"  # scoped to the connection: no client touches another's
            owners.add(owner)
        if isinstance(req, W.Reserve):
            slot = s.reserve(_key(req.key), req.nbytes, owner)
            return W.Reserved(slot.offset if slot is not None else -1)
        if isinstance(req, W.Commit):
            return W.Done(s.commit(_key(req.key), owner, req.crc))
        if isinstance(req, W.Abort):
            return W.Done(s.abort(_key(req.key), owner))
        if isinstance(req, W.Acquire):
            return W.Slots([(x.offset, x.nbytes, x.crc) for x in s.acquire([_key(k) for k in req.keys], owner)])
        if isinstance(req, W.Release):
            s.release(owner)
            return W.Done()
        if isinstance(req, W.Contains):
            return W.Flags(s.contains([_key(k) for k in req.keys]))
        if isinstance(req, W.Delete):
            return W.Done(count=s.delete([_key(k) for k in req.keys]))
        if isinstance(req, W.Clear):
            return W.Done(count=s.clear(req.tenant))
        if isinstance(req, W.Pin):
            (s.pin if req.pinned else s.unpin)([_key(k) for k in req.keys])
            return W.Done()
        st = s.stats()
        return W.StatsReply({f: getattr(st, f) for f in st.__dataclass_fields__} | {"clients": self.clients,
                                                                                    "garbled": self.garbled})


def _key(k: W.Key) -> ChunkKey:
    return ChunkKey(k[0], k[1])
