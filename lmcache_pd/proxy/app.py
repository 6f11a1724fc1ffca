"""The proxy: one OpenAI-style endpoint in front of prefill and decode instances.

Life of a request (``/v1/completions`` or ``/v1/chat/completions``):
  1. keep the client's ``X-Request-Id`` (or make one) and drop any client ``kv_transfer_params``
     (hand-off parameters are ours to set);
  2. pick a decode instance D and a prefill instance P; send P the request with max_tokens=1,
     no streaming, and ``PrefillParams`` (a fresh transfer id and D's *name*);
  3. send D the original request plus the ``kv_transfer_params`` P returned, and pass D's
     answer (streamed or not) back to the client;
  4. if P fails or times out (``proxy.prefill_timeout_s``), D serves the request alone (it
     recomputes the prompt); if D cannot be reached, another decode instance or P serves it.
Requests P/D cannot split (n > 1, several prompts, echo, prompt logprobs) go to D directly.
No torch, no vllm: this runs on any small box.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from lmcache_pd import protocol as P
from lmcache_pd.config import PDConfig, check_exposure, keyring
from lmcache_pd.proxy.cache_admin import add_cache_routes
from lmcache_pd.proxy.routing import Backend, Router

log = logging.getLogger(__name__)
_FORWARD_HEADERS = ("authorization",)
_KEEPALIVE_S = 2.0
"""Pooled connections are dropped after this much idleness, well before vLLM's server closes
them (uvicorn's keep-alive, 5 s): a request sent on a connection the server is closing fails."""
_RESEND = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""Failures before any response byte, typical of a kept-alive connection the server had just
closed: the request is sent once more, on a new connection. (benchmarks/load.py once saw a 502
in 1,123 requests at 32 clients, before this and the shorter keep-alive.)"""


async def _send_once_more(send, what: str):
    """``send()``, and once more if it failed before a response started (see _RESEND)."""
    try:
        return await send()
    except _RESEND as e:
        log.warning("%s failed before a response (%s: %s); sending it once more", what, type(e).__name__, e)
        return await send()


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lmcache_pd_proxy_requests", "Requests by how they were served",
                                ["endpoint", "mode"], registry=self.registry)
        self.fallbacks = Counter("lmcache_pd_proxy_fallbacks", "Requests served without a hand-off, by cause",
                                 ["reason"], registry=self.registry)
        self.prefill_seconds = Histogram("lmcache_pd_proxy_prefill_seconds", "Prefill request time",
                                         registry=self.registry)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _splittable(body: dict[str, Any]) -> bool:
    if body.get("n", 1) != 1 or body.get("best_of", 1) not in (1, None) or body.get("echo"):
        return False
    if body.get("prompt_logprobs") is not None:
        return False
    prompt = body.get("prompt")
    if "messages" in body:
        return True
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


class Proxy:
    def __init__(self, cfg: PDConfig):
        self.cfg = cfg
        self.router = Router(cfg)
        self.metrics = _Metrics()
        self.client: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=_KEEPALIVE_S)
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.cfg.proxy.decode_timeout_s,
                                                                             connect=self.cfg.proxy.connect_timeout_s))
        self._health = asyncio.get_running_loop().create_task(self.router.health_loop(self.client))

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
        if self.client is not None:
            await self.client.aclose()

    # --- one request ------------------------------------------------------------------------
    async def serve(self, request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        req_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"X-Request-Id": req_id}
        headers.update({k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS})
        body.pop("kv_transfer_params", None)
        decode = self.router.pick_decode()
        if decode is None:
            return _error(503, "no decode instance configured", "service_unavailable")
        kv = None
        mode = "direct"
        if _splittable(body):
            prefill = self.router.pick_prefill()
            if prefill is not None:
                kv = await self._prefill(prefill, decode, path, body, headers)
                mode = "pd" if kv is not None else "fallback"
        self.metrics.requests.labels(path, mode).inc()
        return await self._decode(decode, path, body, kv, headers, req_id, tried=set())

    async def _prefill(self, prefill: Backend, decode: Backend, path: str, body: dict[str, Any],
                       headers: dict[str, str]) -> dict[str, Any] | None:
        assert self.client is not None
        params = P.PrefillParams(transfer_id=f"{headers['X-Request-Id']}-{uuid.uuid4().hex[:8]}",
                                 decode_peer=decode.name)
        pbody = dict(body, kv_transfer_params=msgspec.to_builtins(params), stream=False, max_tokens=1)
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens", "min_completion_tokens"):
            pbody.pop(key, None)
        t0 = time.monotonic()
        timeout = httpx.Timeout(self.cfg.proxy.prefill_timeout_s, connect=self.cfg.proxy.connect_timeout_s)
        try:
            r = await _send_once_more(lambda: self.client.post(f"{prefill.url}{path}", json=pbody, headers=headers,
                                                               timeout=timeout), f"prefill request to {prefill.name}")
        except httpx.TimeoutException:
            self.metrics.fallbacks.labels("prefill_timeout").inc()
            log.warning("prefill %s passed proxy.prefill_timeout_s=%g s; decode recomputes", prefill.name,
                        self.cfg.proxy.prefill_timeout_s)
            return None
        except httpx.HTTPError as e:
            prefill.mark_down(f"{type(e).__name__}: {e}")
            self.metrics.fallbacks.labels("prefill_unreachable").inc()
            return None
        self.metrics.prefill_seconds.observe(time.monotonic() - t0)
        if r.status_code != 200:
            self.metrics.fallbacks.labels(f"prefill_http_{r.status_code}").inc()
            log.warning("prefill %s answered %d: %s", prefill.name, r.status_code, r.text[:200])
            return None
        try:
            kv = r.json().get("kv_transfer_params")
        except (json.JSONDecodeError, AttributeError):
            kv = None
        if not isinstance(kv, dict) or P.params_from_dict(kv, P.DecodeParams) is None:
            self.metrics.fallbacks.labels("no_handoff").inc()
            return None
        return kv

    async def _decode(self, decode: Backend, path: str, body: dict[str, Any], kv: dict[str, Any] | None,
                      headers: dict[str, str], req_id: str, tried: set[str]) -> Response:
        assert self.client is not None
        dbody = dict(body, kv_transfer_params=kv) if kv is not None else body
        deadline = time.monotonic() + self.cfg.proxy.decode_timeout_s
        try:
            upstream = await _send_once_more(lambda: self.client.send(
                self.client.build_request("POST", f"{decode.url}{path}", json=dbody, headers=headers), stream=True),
                f"decode request to {decode.name}")
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            decode.mark_down(str(e) or type(e).__name__)
            return await self._fallback(path, body, headers, req_id, tried | {decode.name})
        except httpx.TimeoutException:
            return _error(504, f"decode {decode.name} did not answer within proxy.decode_timeout_s", "timeout")
        except httpx.HTTPError as e:
            log.warning("decode request to %s failed: %s: %s", decode.name, type(e).__name__, e)
            return _error(502, f"decode {decode.name} failed: {type(e).__name__}: {e}", "bad_gateway")
        out_headers = {"X-Request-Id": req_id}
        if upstream.status_code != 200 or not body.get("stream"):
            try:
                content = await asyncio.wait_for(upstream.aread(), max(0.001, deadline - time.monotonic()))
            except (TimeoutError, httpx.HTTPError) as e:
                return _error(504, f"decode {decode.name} did not finish within proxy.decode_timeout_s ({e})",
                              "timeout")
            finally:
                await upstream.aclose()
            return Response(content, status_code=upstream.status_code, headers=out_headers,
                            media_type=upstream.headers.get("content-type", "application/json"))
        return StreamingResponse(self._relay(upstream, deadline, decode.name), headers=out_headers,
                                 media_type=upstream.headers.get("content-type", "text/event-stream"))

    async def _relay(self, upstream: httpx.Response, deadline: float, name: str) -> AsyncIterator[bytes]:
        try:
            async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                async for chunk in upstream.aiter_raw():
                    yield chunk
        except (TimeoutError, httpx.HTTPError) as e:
            msg = {"error": {"message": f"decode {name} stream ended early: {type(e).__name__}: {e}", "type":
                             "timeout" if isinstance(e, TimeoutError) else "bad_gateway"}}
            yield f"data: {json.dumps(msg)}\n\n".encode()
        finally:
            await upstream.aclose()

    async def _fallback(self, path: str, body: dict[str, Any], headers: dict[str, str], req_id: str,
                        tried: set[str]) -> Response:
        """D is unreachable: another decode instance, else a prefill instance, serves it whole."""
        other = self.router.pick_decode(exclude=tried)
        if other is not None and other.name not in tried:
            self.metrics.fallbacks.labels("decode_unreachable").inc()
            return await self._decode(other, path, body, None, headers, req_id, tried)
        prefill = self.router.pick_prefill(exclude=tried)
        if prefill is None:
            return _error(503, "no decode or prefill instance could be reached", "service_unavailable")
        self.metrics.fallbacks.labels("decode_unreachable_served_by_prefill").inc()
        return await self._decode(prefill, path, body, None, headers, req_id, tried)

    async def forward_get(self, path: str) -> Response:
        assert self.client is not None
        for b in (*self.router.decodes, *self.router.prefills):
            if not b.healthy:
                continue
            try:
                r = await self.client.get(f"{b.url}{path}", timeout=self.cfg.proxy.connect_timeout_s)
            except httpx.HTTPError:
                continue
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        return _error(503, "no instance is reachable", "service_unavailable")


def create_app(cfg: PDConfig) -> FastAPI:
    keys = keyring(cfg)
    check_exposure(cfg, keys, None)
    proxy = Proxy(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.stop()

    app = FastAPI(title="lmcache-pd proxy", lifespan=lifespan)
    app.state.proxy = proxy

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.serve(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy.serve(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        return await proxy.forward_get("/v1/models")

    add_cache_routes(app, cfg, lambda: proxy.client, keys)

    @app.get("/health")
    async def health() -> Response:
        status = proxy.router.status()
        ok = any(b.healthy for b in (*proxy.router.decodes, *proxy.router.prefills))
        return JSONResponse({"status": "ok" if ok else "unavailable", "instances": status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type="text/plain; version=0.0.4")

    return app
