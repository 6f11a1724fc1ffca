"""The prefill leg's HTTP client: one POST and its whole answer, over pooled keep-alive
connections (L6, no torch, no vllm).

Why not aiohttp, the proxy's client for everything else (streams, health checks, cache admin):
the prefill's answer lies on every request's way to its first token, and aiohttp's general
machinery (URL and header objects, cookies, tracing hooks, its response object) cost 0.32 ms a
request more than this, against a local server on the project's CPU machine (0.74 ms against
0.42 ms; docs/benchmarks.md, "the proxy's own path"). What is done here is narrow on purpose:
HTTP/1.1 to vLLM's own server (uvicorn), a request with a content-length, an answer with a
content-length, chunked, or ended by the connection's close. No TLS, no redirects, no proxies,
no cookies, no compression.

A request is never sent twice: a pooled connection the server closed while idle is seen
before anything is written to it (its end of stream has arrived), and is dropped. Connections
idle longer than ``legs.KEEPALIVE_S`` are dropped too, before vLLM's server would close them.
Cancelled (a deadline, the client gone), the connection is closed: vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import NamedTuple

KEEP_IDLE = 64
"""Idle connections kept per instance (more are closed when they come back)."""
_HEAD_LIMIT = 1 << 16


class NotConnected(ConnectionError):
    """The instance could not be connected to (refused, no route, past the connect timeout)."""


class Broken(ConnectionError):
    """The connection failed after the request was written, or the answer was not HTTP."""


class Answer(NamedTuple):
    status: int
    body: bytes


class _Conn(NamedTuple):
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float


class Posts:
    """Pooled connections to instances by (host, port); ``post`` sends one request."""

    def __init__(self, connect_s: float, keepalive_s: float, max_answer: int):
        self.connect_s = connect_s
        self.keepalive_s = keepalive_s
        self.max_answer = max_answer
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}

    async def post(self, host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        conn = self._take(host, port) or await self._connect(host, port)
        head = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items() if _clean(k) and _clean(v)]
        try:
            conn.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            status, answer, keep = await self._answer(conn.reader)
        except BaseException as e:  # cancelled, or broken: closing it aborts the request in vLLM
            conn.writer.close()
            if isinstance(e, (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)):
                raise Broken(f"{type(e).__name__}: {e}") from None
            raise
        if keep:
            self._give_back(host, port, conn)
        else:
            conn.writer.close()
        return Answer(status, answer)

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.writer.close()
        self._idle.clear()

    def _take(self, host: str, port: int) -> _Conn | None:
        """The most recently used idle connection still open and young enough."""
        conns = self._idle.get((host, port))
        now = time.monotonic()
        while conns:
            c = conns.pop()
            if now - c.idle_since < self.keepalive_s and not c.reader.at_eof() and not c.writer.is_closing():
                return c
            c.writer.close()
        return None

    def _give_back(self, host: str, port: int, conn: _Conn) -> None:
        conns = self._idle.setdefault((host, port), deque())
        conns.append(_Conn(conn.reader, conn.writer, time.monotonic()))
        while len(conns) > KEEP_IDLE:
            conns.popleft().writer.close()

    async def _connect(self, host: str, port: int) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_s):
                reader, writer = await asyncio.open_connection(host, port, limit=_HEAD_LIMIT)
        except TimeoutError:
            raise NotConnected(f"no connection to {host}:{port} within proxy.connect_timeout_s "
                               f"({self.connect_s:g} s)") from None
        except OSError as e:
            raise NotConnected(f"{host}:{port}: {e}") from None
        return _Conn(reader, writer, time.monotonic())

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        """(status, body, whether the connection can carry another request)."""
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        fields = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = await self._chunked(reader)
        elif (length := fields.get("content-length")) is not None:
            if not length.isdigit() or int(length) > self.max_answer:
                raise ValueError(f"answer content-length {length[:20]!r} (at most {self.max_answer})")
            body = await reader.readexactly(int(length))
        else:  # the answer ends with the connection
            body, keep = await self._to_end(reader), False
        return int(rest[:3]), body, keep

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return bytes(out)
            if len(out) + size > self.max_answer:
                raise ValueError(f"chunked answer beyond {self.max_answer} bytes")
            out += (await reader.readexactly(size + 2))[:-2]

    async def _to_end(self, reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while chunk := await reader.read(1 << 16):
            out += chunk
            if len(out) > self.max_answer:
                raise ValueError(f"answer beyond {self.max_answer} bytes")
        return bytes(out)


def _clean(text: str) -> bool:
    """A header name or value that cannot split the request (a client's X-Request-Id goes on)."""
    return text.isascii() and "\r" not in text and "\n" not in text and "\0" not in text
