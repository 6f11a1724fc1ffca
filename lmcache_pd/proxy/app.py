"""The proxy: one OpenAI-style endpoint in front of prefill and decode instances.

Life of a request (``/v1/completions`` or ``/v1/chat/completions``):
  1. read the body (at most ``proxy.max_body_mib``), keep the client's ``X-Request-Id`` (or make
     one) and drop any client ``kv_transfer_params`` (hand-off parameters are ours to set);
  2. pick a decode instance D and a prefill instance P; send P the request with max_tokens=1,
     no streaming, and ``PrefillParams`` (a fresh transfer id and D's *name*);
  3. send D the original request with ``DecodeParams`` for that transfer, and pass D's answer
     (streamed or not) back to the client. ``proxy.dispatch`` says when:
     - ``concurrent`` (default): together with P's request, with the parameters the proxy
       knows (transfer id, P's name); D tokenizes, schedules and waits for the KV while P
       computes, so only the hand-off itself lies between P's forward and D's first token;
     - ``sequential``: after P answered, with the parameters P returned (token count, digest);
     With ``proxy.first_token=prefill`` (the default) and a request D can continue exactly
     (first_token.py), P's sampled token goes to the client as soon as P answers, and D is
     sent the prompt's token ids plus that token (after P answered: it needs the token);
  4. if P fails or times out (``proxy.prefill_timeout_s``), D serves the request alone (it
     recomputes the prompt): sent concurrently, D's waiting request is dropped (closing it
     aborts it in vLLM) and sent again without parameters, unless D already answered; if D
     cannot be reached, another decode instance or P serves it.
Requests P/D cannot split (n > 1, several prompts, echo, prompt logprobs) go to D directly.
Answers reach the client without ``kv_transfer_params`` (answers.py). A client that goes away,
before its answer or while it streams, has its backend requests dropped (front.py cancels the
request's work; closing them aborts them in vLLM). A request is sent again only when it cannot
have reached the backend (``_RESEND``).
No torch, no vllm: this runs on any small box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest

from lmcache_pd import protocol as P
from lmcache_pd.config import PDConfig, check_exposure, keyring
from lmcache_pd.proxy import first_token
from lmcache_pd.proxy.answers import (
    JSON_HEADERS,
    REPORT_HEADER,
    encode,
    ended_early,
    events,
    one_line,
    scrub,
    scrub_events,
    token_ids,
)
from lmcache_pd.proxy.cache_admin import add_cache_routes
from lmcache_pd.proxy.front import Front
from lmcache_pd.proxy.legs import (
    KEEPALIVE_S,
    Metrics,
    Opened,
    Unreachable,
    close,
    error,
    reach,
    session,
)
from lmcache_pd.proxy.membership import add_admin_routes, reload_on_sighup
from lmcache_pd.proxy.post import Broken, NotConnected, Posts
from lmcache_pd.proxy.routing import Backend, Router, RouterCollector

log = logging.getLogger(__name__)
_FORWARD_HEADERS = ("authorization",)
MAX_PREFILL_ANSWER = 64 << 20
"""The largest prefill answer read (a prompt's token ids come back in it when the client sent text)."""


def _forwarded(request: Request) -> dict[str, str]:
    """The client's headers that go on to vLLM (its ``--api-key``)."""
    return {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}


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
    return token_ids(prompt)


@dataclass
class _Split:
    """One client request split into a prefill and a decode leg."""

    prefill: Backend
    decode: Backend
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    req_id: str
    t0: float
    """When the proxy received it (monotonic)."""
    tokens: int = 0
    """The prompt's length in tokens, where the router learned it (0: not known)."""
    transfer_id: str = ""

    def __post_init__(self) -> None:
        # The client's request id, cut to what the wire takes (protocol.Name), keeps logs joinable.
        self.transfer_id = self.transfer_id or f"{_printable(self.req_id)[:64]}-{uuid.uuid4().hex[:8]}"


def _no_handoff(leg: asyncio.Task) -> bool:
    """The prefill leg ended without a hand-off (failed, refused, crashed)."""
    if not leg.done():
        return False
    if leg.cancelled():
        return True
    if leg.exception() is not None:
        log.warning("prefill leg failed: %r", leg.exception())
        return True
    return leg.result() is None


class Proxy:
    def __init__(self, cfg: PDConfig, api_headers: dict[str, str] | None = None):
        self.cfg = cfg
        self.router = Router(cfg, api_headers)
        self.metrics = Metrics()
        self._split = {"concurrent": self._concurrent, "sequential": self._sequential}[cfg.proxy.dispatch]
        self._first = cfg.proxy.first_token == "prefill"
        self._background: set[asyncio.Task] = set()
        self.client: aiohttp.ClientSession | None = None
        self.posts = Posts(cfg.proxy.connect_timeout_s, KEEPALIVE_S, MAX_PREFILL_ANSWER)
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.client = session(self.cfg.proxy.connect_timeout_s)
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self.router.health_loop(self.client)),
                       loop.create_task(self.router.load_loop(self.client))]

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        if self.client is not None:
            await self.client.close()
        self.posts.close()

    # --- one request ------------------------------------------------------------------------
    async def answer(self, request: Request, path: str, body: dict[str, Any]) -> Response:
        """Route one request (its body read: front.py, which also drops the request's work when
        the client goes away)."""
        req_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"X-Request-Id": req_id}
        headers.update(_forwarded(request))
        body.pop("kv_transfer_params", None)
        t0 = time.monotonic()
        assert self.client is not None
        routed = await self.router.route(self.client, body, _splittable(body))
        if routed is None:
            return error(503, "no decode instance can take requests (none configured, or all draining)",
                         "service_unavailable")
        decode, prefill = routed.decode, routed.prefill
        if prefill is None:
            self.metrics.requests.labels(path, "direct").inc()
            return await self._decode(decode, path, body, None, headers, req_id, tried=set(), t0=t0)
        s = _Split(prefill, decode, path, body, headers, req_id, t0, tokens=routed.prompt_tokens)
        if self._first:
            why = first_token.refusal(path, body)
            if why is None:
                return await self._first_token(s)
            self.metrics.first_tokens.labels("decode", why).inc()
        return await self._split(s)

    async def _sequential(self, s: _Split) -> Response:
        """P first; D gets P's answer (its token count and digest are checked before loading)."""
        got = await self._prefill(s)
        self.metrics.requests.labels(s.path, "pd" if got is not None else "fallback").inc()
        kv = got[0] if got is not None else None
        return await self._decode(s.decode, s.path, s.body, kv, s.headers, s.req_id, tried=set(), t0=s.t0)

    async def _concurrent(self, s: _Split) -> Response:
        """P and D at once; D's request waits on D for the KV P pushes (see the module doc)."""
        early = P.DecodeParams(transfer_id=s.transfer_id, num_tokens=0, prompt_digest="",
                               prefill_peer=s.prefill.name)
        loop = asyncio.get_running_loop()
        p_leg = loop.create_task(self._prefill(s, decode_sent=True))
        d_leg = loop.create_task(self._reach(s.decode, s.path, dict(s.body, kv_transfer_params=msgspec.to_builtins(
            early)), s.headers, s.t0))
        try:
            await asyncio.wait((p_leg, d_leg), return_when=asyncio.FIRST_COMPLETED)
            if not d_leg.done() and _no_handoff(p_leg):
                # No hand-off is coming and D has not answered: it would wait timeouts.transfer_s
                # for one. Dropping its request (the connection closes) aborts it in vLLM; D then
                # serves it again, computing the prompt itself.
                d_leg.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await d_leg
                self.metrics.requests.labels(s.path, "fallback").inc()
                return await self._decode(s.decode, s.path, s.body, None, s.headers, s.req_id, set(), s.t0)
            opened = await d_leg
        except BaseException:
            p_leg.cancel()
            d_leg.cancel()
            raise
        if not isinstance(opened, Opened) or opened.upstream.status != 200:
            p_leg.cancel()  # D cannot take it: P's compute would be for nothing
            self.metrics.requests.labels(s.path, "fallback").inc()
            if isinstance(opened, Unreachable):
                return await self._fallback(s.path, s.body, s.headers, s.req_id, {s.decode.name}, s.t0)
            return self._deliver(opened, s.decode.name, s.req_id, s.t0)
        self.metrics.requests.labels(s.path, "pd").inc()
        # D answers: the prefill leg has no say any more; it is dropped when the answer ends.
        return self._deliver(opened, s.decode.name, s.req_id, s.t0, leg=p_leg)

    async def _first_token(self, s: _Split) -> Response:
        """P samples the first token and the client gets it at once; D continues (first_token.py)."""
        if first_token.max_new(s.body) == 1:  # all of it is P's: no hand-off
            self.metrics.requests.labels(s.path, "prefill_only").inc()
            return await self._decode(s.prefill, s.path, s.body, None, s.headers, s.req_id, {s.decode.name}, s.t0)
        got = await self._prefill(s, first=True)
        cont = None
        if got is not None:
            try:
                cont = first_token.Continuation(s.body, got[1])
            except first_token.BadAnswer as e:
                log.warning("prefill %s: %s; decode recomputes", s.prefill.name, e)
                self.metrics.fallbacks.labels("no_first_token").inc()
        if got is None or cont is None:
            self.metrics.requests.labels(s.path, "fallback").inc()
            return await self._decode(s.decode, s.path, s.body, None, s.headers, s.req_id, set(), s.t0)
        self.metrics.requests.labels(s.path, "pd").inc()
        self.metrics.first_tokens.labels("prefill", "").inc()
        stream = bool(s.body.get("stream"))
        if cont.finished:
            # Nothing left to generate. D holds P's pages for this hand-off: a one-token request
            # loads (and so frees) them now, rather than at the lease's end.
            self._spawn(self._reach(s.decode, s.path, cont.drain_body(got[0]), s.headers, s.t0))
            self.metrics.first_byte_seconds.observe(time.monotonic() - s.t0)
            if stream:
                return StreamingResponse(events(cont.alone_events()), headers={"X-Request-Id": s.req_id},
                                         media_type="text/event-stream")
            return JSONResponse(cont.alone(), headers={"X-Request-Id": s.req_id})
        if stream:
            return StreamingResponse(self._continue_stream(s, cont, got[0]), headers={"X-Request-Id": s.req_id},
                                     media_type="text/event-stream")
        opened = await self._continue(s, cont, got[0])
        if isinstance(opened, Opened) and opened.upstream.status == 200:
            try:
                answer = json.loads(opened.first)
                report = answer.get("kv_transfer_params")  # the decode's report: _deliver's to keep or drop
                opened.first = json.dumps(cont.whole(answer) | {"kv_transfer_params": report}).encode()
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
                return error(502, f"decode {s.decode.name} answered what is not a completion: {e}", "bad_gateway")
        return self._deliver(opened, s.decode.name, s.req_id, s.t0)

    async def _continue(self, s: _Split, cont: first_token.Continuation,
                        kv: dict[str, Any]) -> Opened | Response:
        """D's answer continuing from the first token; if D cannot be reached, another decode
        instance's, else P's (they compute the prompt: no hand-off for them)."""
        opened = await self._reach(s.decode, s.path, cont.decode_body(kv), s.headers, s.t0)
        tried = {s.decode.name}
        while isinstance(opened, Unreachable):
            other = self.router.pick_decode(exclude=tried) or self.router.pick_prefill(exclude=tried)
            if other is None or other.name in tried:
                return error(503, "no decode or prefill instance could be reached", "service_unavailable")
            self.metrics.fallbacks.labels("decode_unreachable").inc()
            tried.add(other.name)
            opened = await self._reach(other, s.path, cont.decode_body(None), s.headers, s.t0)
        return opened

    async def _continue_stream(self, s: _Split, cont: first_token.Continuation,
                               kv: dict[str, Any]) -> AsyncIterator[bytes]:
        """The first token at once, then D's stream continuing it (D's request goes out once the
        first token has: building and sending it would delay the first token's write)."""
        yield cont.first_event()
        self.metrics.first_byte_seconds.observe(time.monotonic() - s.t0)
        d_leg = asyncio.get_running_loop().create_task(self._continue(s, cont, kv))
        opened: Opened | Response | None = None
        try:
            opened = await d_leg
            if isinstance(opened, Response) or opened.upstream.status != 200 or not opened.stream:
                text = opened.body if isinstance(opened, Response) else opened.first
                yield b"data: " + one_line(bytes(text)) + b"\n\n"
                return
            assert opened.chunks is not None
            async with asyncio.timeout(max(0.001, s.t0 + self.cfg.proxy.decode_timeout_s - time.monotonic())):
                async for chunk in cont.events(scrub_events(opened.first, opened.chunks)):
                    yield chunk
        except (TimeoutError, aiohttp.ClientError) as e:
            yield ended_early(s.decode.name, e)
        finally:
            d_leg.cancel()
            if isinstance(opened, Opened):
                close(opened.upstream)

    def _spawn(self, coro) -> None:
        """Run ``coro`` beyond this request (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prefill(self, s: _Split, first: bool = False,
                       decode_sent: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """P's leg: the DecodeParams it returned and its whole answer, or None (a fallback counted
        by its cause). ``first``: P's token goes to the client (first_token.py); ``decode_sent``:
        D's request goes at the same time (P may then write straight into D's blocks)."""
        assert self.client is not None
        params = P.PrefillParams(transfer_id=s.transfer_id, decode_peer=s.decode.name, decode_sent=decode_sent)
        pbody = first_token.prefill_body(s.body, msgspec.to_builtins(params), first_token=first)
        t0 = time.monotonic()
        prefill = s.prefill
        content, headers = encode(pbody), s.headers | JSON_HEADERS
        prefill.queued_tokens += s.tokens  # the prefill work ahead of the next request routed there
        try:
            async with asyncio.timeout(self.cfg.proxy.prefill_timeout_s):
                r = await self.posts.post(prefill.host, prefill.port, s.path, content, headers)
        except (NotConnected, Broken) as e:  # (a connect timeout is NotConnected, not the deadline's)
            prefill.mark_down(str(e))
            self.metrics.fallbacks.labels("prefill_unreachable").inc()
            return None
        except TimeoutError:
            self.metrics.fallbacks.labels("prefill_timeout").inc()
            log.warning("prefill %s passed proxy.prefill_timeout_s=%g s; decode recomputes", prefill.name,
                        self.cfg.proxy.prefill_timeout_s)
            return None
        finally:
            prefill.queued_tokens -= s.tokens
        status, raw = r
        self.metrics.prefill_seconds.observe(time.monotonic() - t0)
        if status != 200:
            self.metrics.fallbacks.labels(f"prefill_http_{status}").inc()
            log.warning("prefill %s answered %d: %s", prefill.name, status, raw[:200].decode(errors="replace"))
            return None
        try:
            answer = json.loads(raw)
            kv = answer.get("kv_transfer_params")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            answer = kv = None
        got = P.params_from_dict(kv, P.DecodeParams)
        if got is None or got.transfer_id != s.transfer_id:
            self.metrics.fallbacks.labels("no_handoff").inc()
            return None
        return kv, answer

    async def _reach(self, backend: Backend, path: str, body: dict[str, Any], headers: dict[str, str],
                     t0: float) -> Opened | Response | Unreachable:
        assert self.client is not None
        return await reach(self.client, backend, path, body, headers, t0 + self.cfg.proxy.decode_timeout_s)

    async def _decode(self, decode: Backend, path: str, body: dict[str, Any], kv: dict[str, Any] | None,
                      headers: dict[str, str], req_id: str, tried: set[str], t0: float) -> Response:
        dbody = dict(body, kv_transfer_params=kv) if kv is not None else body
        opened = await self._reach(decode, path, dbody, headers, t0)
        if isinstance(opened, Unreachable):
            return await self._fallback(path, body, headers, req_id, tried | {decode.name}, t0)
        return self._deliver(opened, decode.name, req_id, t0)

    def _deliver(self, opened: Opened | Response, name: str, req_id: str, t0: float,
                 leg: asyncio.Task | None = None) -> Response:
        """D's answer to the client, whole or relayed as it streams (``leg``: the prefill leg,
        dropped when the answer has ended)."""
        if isinstance(opened, Response):
            return opened
        self.metrics.first_byte_seconds.observe(opened.at - t0)
        up = opened.upstream
        out_headers = {"X-Request-Id": req_id}
        if not opened.stream:
            if leg is not None:
                leg.cancel()
            body, params = scrub(opened.first)
            report = params.get("lmcache_pd") if isinstance(params, dict) else None
            if self.cfg.proxy.handoff_report and report is not None:
                out_headers[REPORT_HEADER] = json.dumps(report)
            return Response(body, status_code=up.status, headers=out_headers,
                            media_type=up.headers.get("content-type", "application/json"))
        deadline = t0 + self.cfg.proxy.decode_timeout_s
        return StreamingResponse(self._relay(opened, deadline, name, leg), headers=out_headers,
                                 media_type=up.headers.get("content-type", "text/event-stream"))

    async def _relay(self, opened: Opened, deadline: float, name: str,
                     leg: asyncio.Task | None) -> AsyncIterator[bytes]:
        try:
            assert opened.chunks is not None
            async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                async for chunk in scrub_events(opened.first, opened.chunks):
                    yield chunk
        except (TimeoutError, aiohttp.ClientError) as e:
            yield ended_early(name, e)
        finally:
            close(opened.upstream)
            if leg is not None:
                leg.cancel()

    async def _fallback(self, path: str, body: dict[str, Any], headers: dict[str, str], req_id: str,
                        tried: set[str], t0: float) -> Response:
        """D is unreachable: another decode instance, else a prefill instance, serves it whole."""
        other = self.router.pick_decode(exclude=tried)
        if other is not None and other.name not in tried:
            self.metrics.fallbacks.labels("decode_unreachable").inc()
            return await self._decode(other, path, body, None, headers, req_id, tried, t0)
        prefill = self.router.pick_prefill(exclude=tried)
        if prefill is None:
            return error(503, "no decode or prefill instance could be reached", "service_unavailable")
        self.metrics.fallbacks.labels("decode_unreachable_served_by_prefill").inc()
        return await self._decode(prefill, path, body, None, headers, req_id, tried, t0)

    async def forward_get(self, request: Request, path: str) -> Response:
        """A GET route of vLLM's, with the client's Authorization (vLLM's ``--api-key``)."""
        assert self.client is not None
        headers = _forwarded(request)
        for b in (*self.router.decodes, *self.router.prefills):
            if not b.healthy:
                continue
            try:
                async with asyncio.timeout(self.cfg.proxy.connect_timeout_s), \
                        self.client.get(f"{b.url}{path}", headers=headers) as r:
                    content = await r.read()
            except (TimeoutError, aiohttp.ClientError):
                continue
            return Response(content, status_code=r.status, media_type="application/json")
        return error(503, "no instance is reachable", "service_unavailable")


def create_app(cfg: PDConfig, reload: Callable[[], PDConfig] | None = None) -> Front:
    """The proxy's ASGI app: the completion routes (front.py) in front of a FastAPI app with the
    rest. ``reload``: how to read the config again on SIGHUP (membership.py; None: SIGHUP is not
    handled)."""
    keys = keyring(cfg)
    check_exposure(cfg, keys, None)
    proxy = Proxy(cfg, {"authorization": f"Bearer {keys.api_token}"} if keys.authenticated else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        unhook = reload_on_sighup(proxy.router, reload) if reload is not None else None
        try:
            yield
        finally:
            if unhook is not None:
                unhook()
            await proxy.stop()

    app = FastAPI(title="lmcache-pd proxy", lifespan=lifespan)
    app.state.proxy = proxy

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy.forward_get(request, "/v1/models")

    add_cache_routes(app, cfg, lambda: proxy.client, keys)
    add_admin_routes(app, proxy.router, keys)
    proxy.metrics.registry.register(RouterCollector(proxy.router))

    @app.get("/health")
    async def health() -> Response:
        status = proxy.router.status()
        ok = any(b.healthy for b in (*proxy.router.decodes, *proxy.router.prefills))
        return JSONResponse({"status": "ok" if ok else "unavailable", "policy": proxy.router.policy.name,
                             "instances": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type="text/plain; version=0.0.4")

    return Front(app, proxy.answer, proxy.metrics, cfg.proxy.max_body_mib << 20)


def _printable(text: str) -> str:
    """Letters, digits and ``-_.:`` of a client-chosen id (it goes into transfer ids and logs)."""
    return "".join(c for c in text if c.isascii() and (c.isalnum() or c in "-_.:"))

