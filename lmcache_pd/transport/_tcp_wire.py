"""The tcp transport's wire format and socket helpers (tcp.py has the protocol's description)."""

from __future__ import annotations

import os
import socket
import struct
import time

import msgspec
import torch

from lmcache_pd import auth
from lmcache_pd.transport import _sealed

_CHALLENGE = struct.Struct(f"!4s{auth.NONCE_BYTES}s")
_HELLO = struct.Struct(f"!4s16sQ{auth.NONCE_BYTES}sB16s{auth.TAG_BYTES}s")
_HELLO_REPLY = struct.Struct(f"!4sB{auth.TAG_BYTES}s")
_BATCH = struct.Struct("!4sQQH")
MAX_TICKET = 1024
_ACK = struct.Struct("!4sQB")
MAX_RANGES = 1 << 20
_MIN_RANGES = 8
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_OK, _BAD_BATCH, _BAD_HELLO, _BAD_MODE, _OK_READS = 0, 1, 2, 3, 4
_ENCRYPTED, _READS = 1, 2
_OFFER = struct.Struct("!I16sQ")
"""After a hello flagged _READS: the sender's pid, host id (``_cma.host_id``) and the address of
its proof (the hello's nonce, in its memory)."""


class _Descriptor(msgspec.Struct, frozen=True):
    host: str
    port: int
    token: bytes
    region: int
    nbytes: int


def _hello_parts(challenge: bytes, token: bytes, region: int, nonce: bytes, flags: int,
                 session: bytes, offer: bytes = b"") -> tuple[bytes, ...]:
    return b"hello", challenge, token, struct.pack("!QB", region, flags), nonce, session, offer


def _hello_tag(key: bytes, challenge: bytes, token: bytes, region: int, nonce: bytes, flags: int = 0,
               session: bytes = bytes(16), offer: bytes = b"") -> bytes:
    return auth.tag(key, *_hello_parts(challenge, token, region, nonce, flags, session, offer))


def _blocking(sock: socket.socket, timeout_s: float) -> None:
    """Blocking mode with the deadline enforced by the kernel (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeouts poll() before every call; in blocking mode one recvmsg_into with
    MSG_WAITALL (or one sendmsg) moves up to IOV_MAX pieces in a single system call.
    """
    sock.settimeout(None)
    sec = max(timeout_s, 0.001)
    tv = struct.pack("ll", int(sec), int((sec - int(sec)) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _pieces(view: memoryview, offsets: list[int], lengths: list[int], piece: int) -> list[memoryview]:
    out: list[memoryview] = []
    for off, n in zip(offsets, lengths):
        end = off + n
        out += [view[o:min(o + piece, end)] for o in range(off, end, piece)]
    return out


def _recv_scatter(sock: socket.socket, views: list[memoryview]) -> None:
    """recvmsg_into until every view is full: one system call fills many scattered ranges."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        got = sock.recvmsg_into(views[i:i + _IOV_MAX], 0, socket.MSG_WAITALL)[0]
        if got == 0:
            raise ConnectionError("peer closed the connection")
        i = _consume(views, i, got)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def _recv_exact_by(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fill ``view`` before ``deadline`` (monotonic), however the peer paces its bytes."""
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the peer did not send it in time")
        _blocking(sock, left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def _recv_record(sock: socket.socket, ch: _sealed.Channel, nbytes: int, aad: bytes | None = None) -> bytes:
    """Receive one encrypted record of ``nbytes`` plaintext bytes and open it (raises SealError)."""
    buf = bytearray(nbytes + _sealed.TAG)
    _recv_exact(sock, memoryview(buf))
    return ch.open(buf, aad)


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """sendmsg until every buffer is out (sendmsg may send part of the list)."""
    buffers = [b for b in buffers if len(b)]  # an empty buffer would never be "consumed"
    i = 0
    while i < len(buffers):
        i = _consume(buffers, i, sock.sendmsg(buffers[i:i + _IOV_MAX]))


def _consume(bufs: list[memoryview], i: int, n: int) -> int:
    """Drop ``n`` moved bytes from the front of ``bufs[i:]``; return the index of the first unfinished one."""
    while n and i < len(bufs):
        size = len(bufs[i])
        if n >= size:
            n -= size
            i += 1
        else:
            bufs[i] = bufs[i][n:]
            n = 0
    return i


def _tune(sock: socket.socket, buf_bytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buf_bytes:  # 0 keeps the kernel's autotuning, which fixed sizes switch off
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, buf_bytes)


def _as_view(buffer: torch.Tensor) -> memoryview:
    if buffer.device.type != "cpu" or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("tcp transport registers flat uint8 CPU tensors only")
    return memoryview(buffer.numpy()).cast("B")
