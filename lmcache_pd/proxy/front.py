"""The completion routes as plain ASGI, in front of the FastAPI app (L6).

``/v1/completions`` and ``/v1/chat/completions`` are on every request's way to its first token.
Through FastAPI they paid for its routing, its middleware stack and Starlette's
``StreamingResponse``, which runs a task group per response to hear the client go away: about
0.3 ms a request on the project's CPU machine against 0.5 ms for a whole direct hop
(docs/benchmarks.md, "the proxy's own path"). Here the answer is sent as ASGI messages
directly, and one watcher per request hears the client go away (uvicorn's ``receive()`` returns
``http.disconnect``) from the moment its body is read to the answer's end: the request's work is
cancelled, which closes its backend requests (vLLM aborts them). Every other route (models,
health, metrics, cache admin) is the FastAPI app's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from lmcache_pd.proxy.answers import BodyError, read_json
from lmcache_pd.proxy.legs import Metrics, error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Answer = Callable[[Request, str, dict[str, Any]], Awaitable[Response]]

ROUTES = ("/v1/completions", "/v1/chat/completions")


class Front:
    """An ASGI app: POSTs to ``ROUTES`` answered by ``answer(request, path, body)``, the rest by ``app``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], answer: Answer,
                 metrics: Metrics, max_body: int):
        self.app = app
        self.answer = answer
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
        elif scope["method"] != "POST":
            await _whole(scope, receive, send, error(405, "method not allowed: POST only"), allow=b"POST")
        else:
            await self._completion(scope, receive, send)

    async def _completion(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            body = await read_json(request, self.max_body)
        except BodyError as e:
            await _whole(scope, receive, send, error(e.status, str(e)))
            return
        except ClientDisconnect:
            self.metrics.client_gone.inc()
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        loop = asyncio.get_running_loop()
        work = loop.create_task(self._work(request, scope["path"], body, scope, receive, sending))
        # The body is read: the next message uvicorn has for this request is its end (the client
        # gone, or the answer sent).
        watcher = loop.create_task(receive())
        watcher.add_done_callback(lambda w: None if w.cancelled() or w.exception() is not None
                                  or w.result().get("type") != "http.disconnect" else work.cancel())
        try:
            await asyncio.wait((work,))
        finally:
            watcher.cancel()
            work.cancel()
        if work.cancelled():  # the client went away (the backend requests are closed)
            if not started:
                self.metrics.client_gone.inc()
            return
        work.result()  # an error: uvicorn logs it, and answers 500 if nothing was sent yet

    async def _work(self, request: Request, path: str, body: dict[str, Any], scope: Scope, receive: Receive,
                    send: Send) -> None:
        response = await self.answer(request, path, body)
        if not isinstance(response, StreamingResponse):
            await _whole(scope, receive, send, response)
            return
        chunks = response.body_iterator
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": response.raw_headers})
            async for chunk in chunks:
                await send({"type": "http.response.body", "more_body": True,
                            "body": chunk if isinstance(chunk, bytes | bytearray | memoryview) else chunk.encode()})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:  # cancelled between chunks: its own cleanup (the upstream closed) now
                await aclose()


async def _whole(scope: Scope, receive: Receive, send: Send, response: Response, allow: bytes = b"") -> None:
    if allow:
        response.raw_headers.append((b"allow", allow))
    await response(scope, receive, send)
