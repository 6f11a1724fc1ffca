"""One leg of a request: sending it to one vLLM instance and reading the answer's first part
(L6, no torch, no vllm); the proxy's HTTP client; and the proxy's metrics.

``reach`` is the only place that sends a request whose answer the client gets: it reads the
first streamed chunk (the rest is relayed later by the caller) or the whole answer, and turns
every way that can fail into an answer (504, 502) or :class:`Unreachable` (try elsewhere).

The client is aiohttp's: a POST to a local server cost httpx (the earlier client) about 1.1 ms
more than aiohttp, measured on this project's machine (benchmarks/proxy_path.py,
docs/benchmarks.md). The prefill leg, whose whole answer lies on the way to the first token,
has a narrower and lighter client of its own (post.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from lmcache_pd.proxy.answers import JSON_HEADERS, encode
from lmcache_pd.proxy.routing import Backend

log = logging.getLogger(__name__)
KEEPALIVE_S = 2.0
"""Pooled connections are dropped after this much idleness, well before vLLM's server closes
them (uvicorn's keep-alive, 5 s): a request sent on a connection the server is closing fails."""
RESEND = (getattr(aiohttp, "ClientConnectionResetError", ConnectionResetError),)
"""Failures that prove the backend did not get the whole request, so cannot have processed it:
only those are sent once more, on a new connection. (aiohttp raises this one when it is about
to write to a connection that is closing: the request, or its body, was not written; before
aiohttp 3.10 it was a plain ConnectionResetError.) A connection that fails after the request
was sent (read error, no response) may have been processed: a completion is not sent twice.
(Pooled connections expire after KEEPALIVE_S, before vLLM's server closes them, so a request
rarely meets a connection the server is closing.)"""


def session(connect_s: float) -> aiohttp.ClientSession:
    """The proxy's pooled client (in a running loop). No overall timeout: each caller sets its own
    deadline (``asyncio.timeout``); connecting (and waiting for a pooled connection) is bounded
    by ``proxy.connect_timeout_s``, whose expiry means the instance cannot be reached."""
    connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


NOT_CONNECTED = (aiohttp.ClientConnectorError, getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError))
"""The instance could not be connected to (refused, no route, past proxy.connect_timeout_s).
(The timeout is also a TimeoutError: catch these before a deadline's TimeoutError. Before
aiohttp 3.10 a connect timeout was a plain ServerTimeoutError; no read timeout is set here, so
that one means connecting too.)"""


async def send_once_more(send, what: str):
    """``send()``, and once more if it failed before a response started (see RESEND)."""
    try:
        return await send()
    except RESEND as e:
        log.warning("%s failed before a response (%s: %s); sending it once more", what, type(e).__name__, e)
        return await send()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lmcache_pd_proxy_requests", "Requests by how they were served",
                                ["endpoint", "mode"], registry=self.registry)
        self.fallbacks = Counter("lmcache_pd_proxy_fallbacks", "Requests served without a hand-off, by cause",
                                 ["reason"], registry=self.registry)
        self.prefill_seconds = Histogram("lmcache_pd_proxy_prefill_seconds", "Prefill request time",
                                         registry=self.registry)
        self.client_gone = Counter("lmcache_pd_proxy_client_gone", "Requests whose client went away before "
                                   "the answer started (their backend requests were dropped)",
                                   registry=self.registry)
        self.first_tokens = Counter("lmcache_pd_proxy_first_tokens", "Split requests by who sampled the "
                                    "first token: the prefill (proxy.first_token=prefill) or the decode "
                                    "(and why not the prefill)", ["source", "reason"], registry=self.registry)
        self.first_byte_seconds = Histogram(
            "lmcache_pd_proxy_first_byte_seconds", "From the client's request to the answer's first byte "
            "(first streamed chunk, else the whole answer)", registry=self.registry)


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Unreachable:
    """The instance could not be connected to (marked down): the request goes to another one."""


@dataclass
class Opened:
    """An answer, its first part read: the first streamed chunk (``chunks`` yields the rest), or
    the whole body (``stream`` false; the response is closed)."""

    upstream: aiohttp.ClientResponse
    first: bytes
    stream: bool
    at: float
    """When the first part was read (monotonic)."""
    chunks: AsyncIterator[bytes] | None = None


def close(upstream: aiohttp.ClientResponse | None) -> None:
    """Done with an answer: its connection goes back to the pool if it was read to its end, else
    it is closed (vLLM aborts a request whose connection closes)."""
    if upstream is None:
        return
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


async def reach(client: aiohttp.ClientSession, backend: Backend, path: str, body: dict[str, Any],
                headers: dict[str, str], deadline: float) -> Opened | Response | Unreachable:
    """Send ``backend`` its request and read the answer's first part: the first streamed chunk,
    else the whole answer. Or an error answer (past ``deadline``, monotonic: 504, named after
    proxy.decode_timeout_s; a failed connection: 502); or Unreachable."""
    stream = bool(body.get("stream"))
    content, headers = encode(body), headers | JSON_HEADERS
    upstream: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
            upstream = await send_once_more(lambda: client.post(f"{backend.url}{path}", data=content,
                                                                headers=headers),
                                            f"decode request to {backend.name}")
            if upstream.status != 200 or not stream:
                whole = await upstream.read()
                upstream.release()
                return Opened(upstream, whole, False, time.monotonic())
            chunks = upstream.content.iter_any()
            first = b""
            async for first in chunks:
                if first:
                    break
            return Opened(upstream, first, True, time.monotonic(), chunks)
    except NOT_CONNECTED as e:
        backend.mark_down(str(e) or type(e).__name__)
        return Unreachable()
    except TimeoutError as e:
        close(upstream)
        return error(504, f"decode {backend.name} did not answer within proxy.decode_timeout_s ({e})", "timeout")
    except aiohttp.ClientError as e:
        close(upstream)
        log.warning("decode request to %s failed: %s: %s", backend.name, type(e).__name__, e)
        return error(502, f"decode {backend.name} failed: {type(e).__name__}: {e}", "bad_gateway")
    except BaseException:  # dropped (cancelled): closing the connection aborts it in vLLM
        close(upstream)
        raise
