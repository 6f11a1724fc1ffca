"""What each instance holds of one request's prompt, asked at routing time (no torch, no vllm).

The routing policy (policies.py, ``wants_lookup``) scores instances by the leading tokens of the
prompt their cache tiers hold. The proxy has no tokenizer: a prompt given as token ids is used
as is; a text prompt or chat messages go to one instance's vLLM ``/tokenize`` (its own
tokenizer and chat template: the ids it will serve). The proxy hashes the prompt's chunks
once (their chain hashes, lmcache_pd/chains.py, under the request's ``cache_salt`` as tenant:
what every instance's keys start from) and asks every instance with a worker API
(``cache_port``, rank 0) ``/cache/lookup`` with them, at once: a few hundred bytes per instance
instead of the token ids, and no instance hashes the prompt again. All of it shares one deadline,
``proxy.routing.lookup_timeout_s``: an instance that has not answered by then counts as
holding nothing, and a prompt not tokenized by then is routed on load alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from lmcache_pd.chains import chain_hashes
from lmcache_pd.proxy.answers import token_ids

log = logging.getLogger(__name__)
REMOTE_TIERS = frozenset({"redis"})
"""Tiers whose chunks cross the network to load (``routing.remote_weight``)."""


@dataclass(frozen=True)
class Held:
    local_tokens: int = 0
    remote_tokens: int = 0


async def tokenize(client: aiohttp.ClientSession, url: str, model: str, body: dict[str, Any],
                   deadline: float) -> list[int] | None:
    """The prompt's token ids from vLLM's ``/tokenize`` at ``url`` (None: not in time, or no
    prompt it can tokenize)."""
    if "messages" in body:
        req: dict[str, Any] = {"model": model, "messages": body["messages"], "add_generation_prompt": True}
    elif isinstance(body.get("prompt"), str):
        req = {"model": model, "prompt": body["prompt"]}
    else:
        return None
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())), \
                client.post(f"{url}/tokenize", json=req) as r:
            if r.status != 200:
                return None
            got = (await r.json(content_type=None)).get("tokens")
    except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as e:
        log.debug("tokenizing for routing at %s: %r", url, e)
        return None
    return got if token_ids(got) else None


def lookup_body(ids: list[int], chunk_tokens: int, tenant: object) -> dict[str, Any]:
    """The ``/cache/lookup`` body every instance is asked with: the chain hashes of the prompt's
    full chunks (``cache.chunk_tokens``: the deployment's, the same on every instance) and the
    tenant (vLLM's ``cache_salt``; not a string: none)."""
    tenant = tenant if isinstance(tenant, str) and tenant else None
    return {"chains": [c.hex() for c in chain_hashes(ids, chunk_tokens, tenant=tenant)], "tenant": tenant}


async def lookup(client: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
                 deadline: float) -> Held:
    """What the worker API at ``url`` holds of the prompt ``body`` names (:func:`lookup_body`;
    nothing, if it does not answer in time)."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())), \
                client.post(f"{url}/cache/lookup", json=body, headers=headers) as r:
            if r.status != 200:
                return Held()
            got = await r.json(content_type=None)
        tiers = got.get("tiers") or {}
        remote = sum(int(n) for name, n in tiers.items() if name in REMOTE_TIERS)
        total = int(got.get("cached_tokens", 0))
    except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError, TypeError) as e:
        log.debug("cache lookup for routing at %s: %r", url, e)
        return Held()
    return Held(max(0, total - remote), remote)


async def held_by(client: aiohttp.ClientSession, urls: dict[str, str], body: dict[str, Any],
                  headers: dict[str, str], deadline: float) -> dict[str, Held]:
    """``{name: Held}`` for every instance in ``urls`` (name -> its worker API), asked at once
    with one ``body`` (:func:`lookup_body`)."""
    if not body["chains"]:  # no full chunk: nobody can hold any of it
        return {}
    names = list(urls)
    got = await asyncio.gather(*(lookup(client, urls[n], body, headers, deadline) for n in names))
    return dict(zip(names, got))
