"""The proxy's router over real HTTP (proxy/routing.py, kv_lookup.py): instances played by small
aiohttp servers that answer as vLLM (``/health``, ``/metrics``, ``/tokenize``) and our worker API
(``/cache/lookup``, ``/pd/stats``) do. The policies' own decisions: test_policies.py."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lmcache_pd.chains import chain_hashes
from lmcache_pd.config import config_from_dict
from lmcache_pd.proxy import kv_lookup
from lmcache_pd.proxy.routing import Router, RouterCollector

PROMPT = list(range(100, 1124))  # 1024 token ids


class Instance:
    """One stub instance: its vLLM port and its worker API port, with what it reports."""

    def __init__(self, *, running=0, waiting=0, held=0, remote=0, free_pages=None, pages=None, delay_s=0.0,
                 garbled=False):
        self.running, self.waiting, self.held, self.remote = running, waiting, held, remote
        self.free_pages, self.pages, self.delay_s, self.garbled = free_pages, pages, delay_s, garbled
        self.lookups: list[dict] = []
        self.tokenized: list[dict] = []
        self.runners: list[web.AppRunner] = []
        self.http_port = self.cache_port = 0

    async def start(self) -> None:
        vllm = web.Application()
        vllm.router.add_get("/health", self.health)
        vllm.router.add_get("/metrics", self.metrics)
        vllm.router.add_post("/tokenize", self.tokenize)
        api = web.Application()
        api.router.add_post("/cache/lookup", self.lookup)
        api.router.add_get("/pd/stats", self.stats)
        ports = []
        for app in (vllm, api):
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            ports.append(site._server.sockets[0].getsockname()[1])
        self.http_port, self.cache_port = ports

    async def stop(self) -> None:
        for r in self.runners:
            await r.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f'# HELP x\nvllm:num_requests_running{{model_name="tiny"}} {self.running}.0\n'
                                 f'vllm:num_requests_waiting{{model_name="tiny"}} {self.waiting}.0\n')

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokenized.append(body)
        return web.json_response({"tokens": PROMPT, "count": len(PROMPT)})

    async def lookup(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.lookups.append(body)
        await asyncio.sleep(self.delay_s)
        if self.garbled:
            return web.Response(text="{not json", content_type="application/json")
        tiers = {"memory": self.held} | ({"redis": self.remote} if self.remote else {})
        return web.json_response({"cached_tokens": self.held + self.remote, "tiers": tiers})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"pool": {"pages": self.pages, "free_pages": self.free_pages}})


def cfg_for(prefills: list[Instance], decodes: list[Instance], **routing):
    def inst(kind: str, i: int, x: Instance) -> dict:
        d = {"name": f"{kind}-{i}", "http_port": x.http_port, "cache_port": x.cache_port}
        return d | ({"control_port": 20000 + 10 * i, "data_port": 20001 + 10 * i} if kind == "decode" else {})

    return config_from_dict({
        "model": {"path": "/m", "served_name": "tiny"},
        "prefill": [inst("prefill", i, x) for i, x in enumerate(prefills)],
        "decode": [inst("decode", i, x) for i, x in enumerate(decodes)],
        "proxy": {"policy": "kv_aware", "routing": routing},
    }, source="test")


def run(coro):
    return asyncio.run(coro)


def chains_of(ids: list[int], tenant: str | None = None) -> dict:
    """The lookup every instance should get: the prompt's chain hashes (chunks of 256, the
    default cache.chunk_tokens) under the tenant."""
    return {"chains": [c.hex() for c in chain_hashes(ids, 256, tenant=tenant)], "tenant": tenant}


def test_the_router_reads_loads_asks_what_each_holds_and_routes_by_it(monkeypatch):
    hashed: list[int] = []

    def counted(ids, *args, **kwargs):
        hashed.append(len(ids))
        return chain_hashes(ids, *args, **kwargs)
    monkeypatch.setattr(kv_lookup, "chain_hashes", counted)

    async def main():
        p0, p1 = Instance(held=0), Instance(held=768)
        d0, d1 = Instance(running=1, free_pages=90, pages=100), Instance(held=512, running=2, free_pages=40, pages=100)
        everyone = (p0, p1, d0, d1)
        for x in everyone:
            await x.start()
        try:
            router = Router(cfg_for([p0, p1], [d0, d1]))
            async with aiohttp.ClientSession() as client:
                await router.read_loads(client)
                assert router.find("decode-1").load() == {"running": 2, "waiting": 0, "queued_tokens": 0,
                                                          "free_pages": 40, "pool_pages": 100}
                # Token ids given: no tokenizing; the proxy hashes them once, and every instance is
                # asked with those chain hashes (4 chunks of 256: a few hundred bytes, not the ids).
                got = await router.route(client, {"prompt": PROMPT, "max_tokens": 5}, True)
                assert hashed == [1024] and all(x.lookups == [chains_of(PROMPT)] for x in everyone)
                assert len(chains_of(PROMPT)["chains"]) == 4
                assert not any(x.tokenized for x in everyone)
                assert (got.prefill.name, got.decode.name, got.prompt_tokens) == ("prefill-1", "decode-1", 1024)
                assert (got.route.prefill_reason, got.route.decode_reason) == ("cached_prefix", "affinity")
                # A chat request: one instance tokenizes it with its own chat template.
                messages = [{"role": "user", "content": "hello"}]
                got = await router.route(client, {"messages": messages}, True)
                tokenized = [b for x in everyone for b in x.tokenized]
                assert tokenized == [{"model": "tiny", "messages": messages, "add_generation_prompt": True}]
                assert got.prefill.name == "prefill-1" and got.prompt_tokens == 1024
                assert router.routes[("prefill", "cached_prefix")] == 2
                # vLLM's cache_salt is the tenant: the chains are that tenant's.
                await router.route(client, {"prompt": PROMPT, "cache_salt": "acme"}, True)
                assert all(x.lookups[-1] == chains_of(PROMPT, "acme") for x in everyone)
                assert chains_of(PROMPT, "acme") != chains_of(PROMPT)
                # Under one chunk: nothing anyone could hold, nobody asked.
                before = [len(x.lookups) for x in everyone]
                await router.route(client, {"prompt": PROMPT[:200]}, True)
                assert [len(x.lookups) for x in everyone] == before
                # What asking cost, for /metrics: four routes asked (the last learnt nothing).
                summary = next(f for f in RouterCollector(router).collect()
                               if f.name == "lmcache_pd_proxy_routing_lookup_seconds")
                values = {s.name: s.value for s in summary.samples}
                assert values["lmcache_pd_proxy_routing_lookup_seconds_count"] == 4 == router.lookups
                assert 0 < values["lmcache_pd_proxy_routing_lookup_seconds_sum"] < 4 * 0.05
        finally:
            for x in everyone:
                await x.stop()

    run(main())


def test_an_instance_that_answers_late_or_garbled_counts_as_holding_nothing_and_routing_waits_no_longer():
    async def main():
        slow, garbled = Instance(held=1000, delay_s=2.0), Instance(held=1000, garbled=True)
        p2, d0 = Instance(held=10), Instance()
        everyone = (slow, garbled, p2, d0)
        for x in everyone:
            await x.start()
        try:
            router = Router(cfg_for([slow, garbled, p2], [d0], lookup_timeout_s=0.2))
            async with aiohttp.ClientSession() as client:
                t0 = time.monotonic()
                got = await router.route(client, {"prompt": PROMPT}, True)
                took = time.monotonic() - t0
            assert slow.lookups and garbled.lookups  # both were asked ...
            assert got.prefill.name == "prefill-2"  # ... and neither counted
            assert took < 1.0, took
        finally:
            for x in everyone:
                await x.stop()

    run(main())


def test_one_of_each_asks_nothing_an_unreachable_instance_keeps_its_last_load_and_a_bad_policy_is_named():
    async def main():
        p0, d0 = Instance(), Instance(running=7, free_pages=3, pages=8)
        await p0.start()
        await d0.start()
        cfg = cfg_for([p0], [d0])
        router = Router(cfg)
        async with aiohttp.ClientSession() as client:
            await router.read_loads(client)
            # One of each and no decode-alone rule: nothing to choose, so nothing is asked.
            got = await router.route(client, {"prompt": "some text"}, True)
            assert (got.prefill.name, got.decode.name) == ("prefill-0", "decode-0")
            assert not (p0.lookups or d0.lookups or p0.tokenized or d0.tokenized)
            await d0.stop()
            await router.read_loads(client)
        await p0.stop()
        assert router.find("decode-0").load()["running"] == 7
        assert router.find("decode-0").load()["free_pages"] == 3
        return cfg

    cfg = run(main())
    from lmcache_pd.errors import ConfigError

    bad = msgspec.structs.replace(cfg, proxy=msgspec.structs.replace(cfg.proxy, policy="nearest"))
    with pytest.raises(ConfigError) as e:
        Router(bad)
    assert e.value.field == "proxy.policy"
