"""One leg of a request: sending it to one vLLM instance and reading the answer's first part
(L6, no torch, no vllm); and the proxy's metrics.

``reach`` is the only place that sends a request whose answer the client gets: it reads the
first streamed chunk (the rest is relayed later by the caller) or the whole answer, and turns
every way that can fail into an answer (504, 502) or :class:`Unreachable` (try elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from lmcache_pd.proxy.answers import JSON_HEADERS, encode
from lmcache_pd.proxy.routing import Backend

log = logging.getLogger(__name__)
KEEPALIVE_S = 2.0
"""Pooled connections are dropped after this much idleness, well before vLLM's server closes
them (uvicorn's keep-alive, 5 s): a request sent on a connection the server is closing fails."""
RESEND = (httpx.WriteError,)
"""Failures that prove the backend did not get the whole request, so cannot have processed it:
only those are sent once more, on a new connection. A connection that fails after the request
was sent (read error, no response) may have been processed: a completion is not sent twice.
(Pooled connections expire after KEEPALIVE_S, before vLLM's server closes them, so a request
rarely meets a connection the server is closing.)"""


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

    upstream: httpx.Response
    first: bytes
    stream: bool
    at: float
    """When the first part was read (monotonic)."""
    chunks: AsyncIterator[bytes] | None = None


async def close(upstream: httpx.Response | None) -> None:
    if upstream is not None:
        await upstream.aclose()


async def reach(client: httpx.AsyncClient, backend: Backend, path: str, body: dict[str, Any],
                headers: dict[str, str], deadline: float) -> Opened | Response | Unreachable:
    """Send ``backend`` its request and read the answer's first part: the first streamed chunk,
    else the whole answer. Or an error answer (past ``deadline``, monotonic: 504, named after
    proxy.decode_timeout_s; a failed connection: 502); or Unreachable."""
    stream = bool(body.get("stream"))
    content, headers = encode(body), headers | JSON_HEADERS
    upstream: httpx.Response | None = None
    try:
        async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
            upstream = await send_once_more(lambda: client.send(
                client.build_request("POST", f"{backend.url}{path}", content=content, headers=headers),
                stream=True), f"decode request to {backend.name}")
            if upstream.status_code != 200 or not stream:
                whole = await upstream.aread()
                await upstream.aclose()
                return Opened(upstream, whole, False, time.monotonic())
            chunks = upstream.aiter_raw()
            first = b""
            async for first in chunks:
                if first:
                    break
            return Opened(upstream, first, True, time.monotonic(), chunks)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        backend.mark_down(str(e) or type(e).__name__)
        return Unreachable()
    except (TimeoutError, httpx.TimeoutException) as e:
        await close(upstream)
        return error(504, f"decode {backend.name} did not answer within proxy.decode_timeout_s ({e})", "timeout")
    except httpx.HTTPError as e:
        await close(upstream)
        log.warning("decode request to %s failed: %s: %s", backend.name, type(e).__name__, e)
        return error(502, f"decode {backend.name} failed: {type(e).__name__}: {e}", "bad_gateway")
    except BaseException:  # dropped (cancelled): closing the connection aborts it in vLLM
        await close(upstream)
        raise
