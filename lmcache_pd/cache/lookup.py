"""How much of a prompt is cached: the scheduler asks the workers (one process each).

vLLM's scheduler calls ``get_num_new_matched_tokens`` in its own process, where the tiers are
not: the memory tier lives in each worker. So each worker serves lookups on a local zmq socket
(``ipc://``, readable by this user only) and the scheduler side asks every TP rank:

  1. ``LookupClient.ask(req_id, chains, tenant)`` sends one :class:`LookupQuery` per rank;
  2. ``LookupClient.poll(req_id)`` returns None until every rank answered, then the smallest
     hit count (a chunk is usable only if every rank holds its slice); past
     ``cache.lookup_timeout_s`` it returns a zero-hit answer and logs the field;
  3. ``LookupServer`` (a thread, ``pd-cache-lookup``) answers each query with
     ``resolve(req_id, chains, tenant)`` (which also holds the chunks found for the load).

Messages are msgspec structs; a frame that does not decode is dropped and counted.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import zmq

from lmcache_pd._types import ReqId
from lmcache_pd.cache.store import Lookup
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)


class LookupQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    req_id: str
    chains: list[bytes]
    tenant: str | None = None


class LookupAnswer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    req_id: str
    hits: int
    tiers: list[int]


def endpoint(instance: str, rank: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)
    return f"ipc://{tempfile.gettempdir()}/lmcache-pd-{os.getuid()}-{safe}-{rank}.lookup"


class LookupServer:
    def __init__(self, instance: str, rank: int, resolve: Callable[[str, Sequence[bytes], str | None], Lookup]):
        self.address = endpoint(instance, rank)
        self.resolve = resolve
        self.dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None

    def start(self) -> None:
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        path = self.address.removeprefix("ipc://")
        if os.path.exists(path):  # left by a process of this instance that died
            os.unlink(path)
        old = os.umask(0o177)  # the socket file: this user only
        try:
            sock.bind(self.address)
        finally:
            os.umask(old)
        self._thread = thread(self._run, "pd-cache-lookup", sock)
        self._thread.start()

    def _run(self, sock: zmq.Socket) -> None:
        decode = msgspec.msgpack.Decoder(LookupQuery)
        encode = msgspec.msgpack.Encoder()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                frames = sock.recv_multipart()
                try:
                    if len(frames) != 2:
                        raise msgspec.DecodeError("expected 2 frames")
                    q = decode.decode(frames[1])
                except msgspec.DecodeError as e:
                    self.dropped += 1
                    log.warning("cache lookup: dropped a malformed query (%s)", e)
                    continue
                try:
                    found = self.resolve(q.req_id, q.chains, q.tenant)
                    answer = LookupAnswer(q.req_id, found.hits, list(found.tiers))
                except Exception:  # noqa: BLE001 - answer "nothing cached" rather than leave it waiting
                    log.exception("cache lookup failed for %s", q.req_id)
                    answer = LookupAnswer(q.req_id, 0, [])
                sock.send_multipart([frames[0], encode.encode(answer)])
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._ctx is not None:
            self._ctx.term()


@dataclass
class _Pending:
    deadline: float
    answers: dict[int, LookupAnswer]


class LookupClient:
    """Scheduler side; single-threaded (vLLM's scheduler loop), never blocks longer than asked."""

    def __init__(self, instance: str, tp_size: int, *, timeout_s: float):
        self.instance = instance
        self.tp_size = tp_size
        self.timeout_s = timeout_s
        self._ctx: zmq.Context | None = None
        self._socks: list[zmq.Socket] = []
        self._pending: dict[ReqId, _Pending] = {}
        self._decode = msgspec.msgpack.Decoder(LookupAnswer)
        self._encode = msgspec.msgpack.Encoder()

    def _connect(self) -> None:
        self._ctx = zmq.Context()
        for rank in range(self.tp_size):
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint(self.instance, rank))
            self._socks.append(s)

    def ask(self, req_id: ReqId, chains: Sequence[bytes], tenant: str | None) -> None:
        if self._ctx is None:
            self._connect()
        frame = self._encode.encode(LookupQuery(req_id, list(chains), tenant))
        deadline = time.monotonic() + self.timeout_s
        for s in self._socks:
            try:
                s.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # a worker that stopped reading: do not wait for it
                deadline = 0.0
        self._pending[req_id] = _Pending(deadline, {})

    def pending(self, req_id: ReqId) -> bool:
        return req_id in self._pending

    def poll(self, req_id: ReqId, wait_s: float = 0.0) -> Lookup | None:
        """The answer for ``req_id`` once every rank answered (or its deadline passed)."""
        p = self._pending.get(req_id)
        if p is None:
            return None
        end = time.monotonic() + wait_s
        while True:
            self._receive()
            if len(p.answers) == self.tp_size:
                del self._pending[req_id]
                hits = min(a.hits for a in p.answers.values())
                return Lookup(hits, tuple(p.answers[0].tiers[:hits]))
            now = time.monotonic()
            if now >= p.deadline:
                del self._pending[req_id]
                log.warning("cache lookup for %s: %d of %d workers answered within %g s; scheduling it "
                            "without cache hits (raise `cache.lookup_timeout_s` to wait longer)",
                            req_id, len(p.answers), self.tp_size, self.timeout_s)
                return Lookup(0, ())
            if now >= end:
                return None
            zmq.select(self._socks, [], [], min(end, p.deadline) - now)

    def _receive(self) -> None:
        for rank, s in enumerate(self._socks):
            while True:
                try:
                    frame = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    a = self._decode.decode(frame)
                except msgspec.DecodeError:
                    continue
                p = self._pending.get(a.req_id)
                if p is not None:  # else: an answer that came after its deadline
                    p.answers[rank] = a

    def forget(self, req_id: ReqId) -> None:
        self._pending.pop(req_id, None)

    def close(self) -> None:
        for s in self._socks:
            s.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
