"""The proxy's ``/cache/*`` routes: one call reaches the cache API of every instance and rank.

``POST /cache/{lookup,pin,unpin,clear}`` take ``token_ids`` or a ``prompt`` (text, tokenized by
each instance's own vLLM ``/tokenize``), an optional ``tenant``, or ``{"all": true}`` for clear.
``GET /cache/stats`` gathers every worker's statistics. The answer maps instance -> rank ->
that worker's answer (or ``{"error": ...}``); it is 200 when at least one worker answered.
With a shared secret configured, the POST routes need ``Authorization: Bearer <token>``
(``lmcache-pd token``), and the proxy sends the same token to the workers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lmcache_pd.auth import Keyring
from lmcache_pd.config import InstanceConfig, PDConfig

OPS = ("lookup", "pin", "unpin", "clear")


def cache_instances(cfg: PDConfig) -> list[InstanceConfig]:
    return [i for i in (*cfg.prefill, *cfg.decode) if i.cache_port is not None]


async def _tokenize(client: aiohttp.ClientSession, cfg: PDConfig, inst: InstanceConfig,
                    body: dict[str, Any]) -> dict:
    if "prompt" not in body:
        return body
    if not isinstance(body["prompt"], str):
        raise ValueError("prompt must be a string (or give token_ids)")
    async with client.post(f"http://{inst.host}:{inst.http_port}/tokenize", json={
            "model": cfg.model.served_name or cfg.model.path, "prompt": body["prompt"],
            "add_special_tokens": True}, raise_for_status=True) as r:
        tokens = (await r.json(content_type=None))["tokens"]
    return {k: v for k, v in body.items() if k != "prompt"} | {"token_ids": tokens}


async def _one(client: aiohttp.ClientSession, cfg: PDConfig, inst: InstanceConfig, rank: int, op: str,
               body: dict[str, Any] | None, headers: dict[str, str]) -> Any:
    url = f"http://{inst.host}:{inst.cache_port + rank}/cache/{op}"
    try:
        async with asyncio.timeout(cfg.proxy.connect_timeout_s):
            if body is None:
                request = client.get(url)
            else:
                request = client.post(url, json=await _tokenize(client, cfg, inst, body), headers=headers)
            async with request as r:
                status, raw = r.status, await r.read()
                is_json = r.headers.get("content-type", "").startswith("application/json")
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        data = json.loads(raw) if is_json else {}
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    return data if status == 200 else {"error": data.get("error", f"HTTP {status}")}


async def fan_out(client: aiohttp.ClientSession, cfg: PDConfig, op: str, body: dict[str, Any] | None,
                  keys: Keyring) -> JSONResponse:
    targets = [(inst, rank) for inst in cache_instances(cfg) for rank in range(inst.tp_size)]
    if not targets:
        return JSONResponse({"error": "no instance has a cache_port in the config"}, status_code=404)
    headers = {"authorization": f"Bearer {keys.api_token}"} if keys.authenticated else {}
    answers = await asyncio.gather(*(_one(client, cfg, inst, rank, op, body, headers) for inst, rank in targets))
    out: dict[str, dict[str, Any]] = {}
    for (inst, rank), a in zip(targets, answers):
        out.setdefault(inst.name, {})[str(rank)] = a
    ok = any(not (isinstance(a, dict) and "error" in a) for a in answers)
    return JSONResponse(out, status_code=200 if ok else 502)


def add_cache_routes(app: FastAPI, cfg: PDConfig, client: Callable[[], aiohttp.ClientSession],
                     keys: Keyring) -> None:
    """``client()`` returns the proxy's running HTTP client."""

    @app.get("/cache/stats")
    async def stats() -> Response:
        return await fan_out(client(), cfg, "stats", None, keys)

    @app.post("/cache/{op}")
    async def operate(op: str, request: Request) -> Response:
        if op not in OPS:
            return JSONResponse({"error": f"unknown operation {op!r} (one of {', '.join(OPS)})"}, status_code=404)
        if not keys.authorizes(request.headers.get("authorization")):
            return JSONResponse({"error": "missing or wrong bearer token (`lmcache-pd token` prints it)"},
                                status_code=401)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        return await fan_out(client(), cfg, op, body, keys)
