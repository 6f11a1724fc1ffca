"""What the node cache daemon and its clients say to each other (L4; docs/cache_server.md).

One Unix stream socket per client. At connect the daemon passes its segment's descriptor
(``slots.send_segment``); then each request is one frame, ``u32 length`` + a msgpack body (a
struct of :data:`Request`), answered by one frame (a struct of :data:`Reply`), one request in
flight per connection. No chunk byte crosses the socket: clients copy into and out of the
segment at the offsets the daemon names.

``owner`` names a client's load or save (a request id); the daemon scopes it to the connection,
so one client cannot end another's leases or writes, and all of a connection's end when it
closes.
"""

from __future__ import annotations

import socket
import struct
from typing import Annotated

import msgspec

MAX_FRAME = 1 << 20
_LEN = struct.Struct("<I")
Key = tuple[str, bytes]
"""A chunk key on the wire: (tenant tag, 32-byte digest)."""
Keys = Annotated[list[Key], msgspec.Meta(max_length=1 << 14)]


class _Msg(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


class Hello(_Msg):
    """An engine's first request: the chunk size it caches in (a daemon serving one size refuses
    another: its chunks would share nothing)."""

    chunk_tokens: int


class Reserve(_Msg):
    key: Key
    nbytes: int
    owner: str


class Commit(_Msg):
    key: Key
    owner: str
    crc: int


class Abort(_Msg):
    key: Key
    owner: str


class Acquire(_Msg):
    keys: Keys
    owner: str


class Release(_Msg):
    owner: str


class Contains(_Msg):
    keys: Keys


class Delete(_Msg):
    keys: Keys


class Clear(_Msg):
    tenant: str | None = None


class Pin(_Msg):
    keys: Keys
    pinned: bool = True
    """False: unpin."""


class Stats(_Msg):
    pass


class Reserved(_Msg):
    offset: int
    """-1: not reserved (committed already, being written by another, or no slot could be freed)."""


class Slots(_Msg):
    slots: list[tuple[int, int, int]]
    """(offset, bytes, crc) of each leading chunk found, leased to the owner."""


class Flags(_Msg):
    flags: list[bool]


class Done(_Msg):
    ok: bool = True
    count: int = 0


class ClassInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    slot_bytes: int
    slabs: int
    slots: int
    used: int


class ClientInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    pid: int
    """The client process (the socket's peer credentials)."""
    since: float
    """When it connected (seconds since the epoch)."""
    requests: int


class StatsReply(_Msg):
    stats: dict[str, int]
    classes: list[ClassInfo] = []
    clients: list[ClientInfo] = []


class Refused(_Msg):
    reason: str


Request = Hello | Reserve | Commit | Abort | Acquire | Release | Contains | Delete | Clear | Pin | Stats
Reply = Reserved | Slots | Flags | Done | StatsReply | Refused
_requests = msgspec.msgpack.Decoder(Request)
_replies = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def send(sock: socket.socket, msg: _Msg) -> None:
    body = _encoder.encode(msg)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError("the cache daemon connection closed")
        out += got
    return bytes(out)


def _frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exactly(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"a frame of {n} B (at most {MAX_FRAME})")
    return _recv_exactly(sock, n)


def recv_request(sock: socket.socket) -> Request:
    """The next request; ValueError for a frame that is not one (msgspec's errors are ValueErrors)."""
    return _requests.decode(_frame(sock))


def recv_reply(sock: socket.socket) -> Reply:
    return _replies.decode(_frame(sock))
