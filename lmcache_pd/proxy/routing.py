"""Which prefill and decode instance serve a request (no torch, no vllm).

:class:`Router` keeps one :class:`Backend` per instance: its health (``/health`` every
``proxy.health_interval_s``; an instance that fails a request is marked down at once and comes
back when a check passes), whether it is draining, and, when the policy wants it, its load
(every ``proxy.routing.load_interval_s``: vLLM's running and waiting requests from its
``/metrics``, a decode's free pool pages from its worker API's ``/pd/stats``) and the prompt
tokens this proxy has sent it and not had answered. For each request it builds the instances'
views (with what each holds of the prompt, kv_lookup.py, when the policy asks) and lets the
policy (policies.py, ``proxy.policy``) choose.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from lmcache_pd.config import InstanceConfig, PDConfig
from lmcache_pd.proxy import kv_lookup
from lmcache_pd.proxy.policies import Ask, InstanceView, Route, make_policy

log = logging.getLogger(__name__)
_GAUGE = re.compile(r"^(vllm:num_requests_running|vllm:num_requests_waiting)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


@dataclass
class Backend:
    name: str
    role: str
    host: str
    port: int
    cache_url: str | None = None
    """Its rank-0 worker API (``cache_port``), or None."""
    healthy: bool = True
    last_error: str = ""
    checked_at: float = field(default=0.0)
    draining: bool = False
    running: int = 0
    waiting: int = 0
    free_pages: int | None = None
    pool_pages: int | None = None
    queued_tokens: int = 0
    """Prompt tokens of this proxy's prefill requests to it not answered yet."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def mark_down(self, error: str) -> None:
        if self.healthy:
            log.warning("%s instance %s marked down: %s", self.role, self.name, error)
        self.healthy, self.last_error = False, error

    def view(self, held: kv_lookup.Held | None = None) -> InstanceView:
        held = held or kv_lookup.Held()
        return InstanceView(self.name, self.healthy, self.draining, self.running, self.waiting, self.queued_tokens,
                            self.free_pages, self.pool_pages, held.local_tokens, held.remote_tokens)

    def load(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "queued_tokens": self.queued_tokens,
                "free_pages": self.free_pages, "pool_pages": self.pool_pages}


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _routed_to(cfg: PDConfig) -> dict[str, list[InstanceConfig]]:
    """The instances of each role this proxy routes to (``proxy.prefills``/``decodes``: empty is all)."""
    px = cfg.proxy
    return {"prefill": [i for i in cfg.prefill if not px.prefills or i.name in px.prefills],
            "decode": [i for i in cfg.decode if not px.decodes or i.name in px.decodes]}


def _backend(inst: InstanceConfig, role: str) -> Backend:
    host = _loopback(inst.host)
    cache = f"http://{host}:{inst.cache_port}" if inst.cache_port is not None else None
    return Backend(inst.name, role, host, inst.http_port, cache)


@dataclass
class Routed:
    """A request's route, with the backends it names and the prompt's length if known."""

    route: Route
    decode: Backend
    prefill: Backend | None
    prompt_tokens: int = 0


class Router:
    def __init__(self, cfg: PDConfig, api_headers: dict[str, str] | None = None):
        self.cfg = cfg
        routed = _routed_to(cfg)
        self.prefills = [_backend(i, "prefill") for i in routed["prefill"]]
        self.decodes = [_backend(i, "decode") for i in routed["decode"]]
        self.policy = make_policy(cfg.proxy.policy, cfg.proxy.routing)
        self._api_headers = api_headers or {}
        """What the workers' APIs need (the bearer token, with a shared secret)."""
        self.routes: dict[tuple[str, str], int] = {}
        self.lookups = 0
        """Requests routed after asking what the instances hold (tokenizing, if it had to, and the lookups)."""
        self.lookup_s = 0.0
        """Their time in all, from the first ask to the last answer or the deadline."""
        """(role, reason) -> routes so far (``RouterCollector`` exports them)."""
        self.known_decodes = {i.name for i in cfg.decode}
        """Decode instances the prefill workers can address: those of the deployment config (a
        prefill resolves a decode's name in its own config, never an address from a request)."""

    def find(self, name: str) -> Backend | None:
        return next((b for b in (*self.prefills, *self.decodes) if b.name == name), None)

    async def route(self, client: aiohttp.ClientSession, body: dict[str, Any], splittable: bool) -> Routed | None:
        """Choose the decode and the prefill (or none) of one request; None: no decode instance.
        ``splittable``: the proxy may split it; for a list prompt that means the proxy checked it
        holds token ids (app.py's ``_splittable``), which are then taken as they are."""
        prompt = body.get("prompt")
        ids = prompt if splittable and "messages" not in body and isinstance(prompt, list) else None
        held: dict[str, kv_lookup.Held] = {}
        if self.policy.wants_lookup and splittable and self._choice():
            t0 = time.monotonic()
            deadline = t0 + self.cfg.proxy.routing.lookup_timeout_s
            if ids is None:
                usable = [b for b in (*self.decodes, *self.prefills) if b.healthy and not b.draining]
                if usable:
                    ids = await kv_lookup.tokenize(client, usable[0].url, self.cfg.model.served_name or
                                                   self.cfg.model.path, body, deadline)
            urls = {b.name: b.cache_url for b in (*self.prefills, *self.decodes) if b.cache_url and b.healthy}
            if ids and urls:
                asked = kv_lookup.lookup_body(ids, self.cfg.cache.chunk_tokens, body.get("cache_salt"))
                held = await kv_lookup.held_by(client, urls, asked, self._api_headers, deadline)
            self.lookups += 1
            self.lookup_s += time.monotonic() - t0
        ask = Ask(len(ids) if ids else None, splittable)
        route = self.policy.route(ask, [b.view(held.get(b.name)) for b in self.prefills],
                                  [b.view(held.get(b.name)) for b in self.decodes])
        if route is None:
            return None
        for key in (("decode", route.decode_reason), ("prefill", route.prefill_reason)):
            self.routes[key] = self.routes.get(key, 0) + 1
        decode = self.find(route.decode)
        prefill = self.find(route.prefill) if route.prefill else None
        if decode is None or decode.role != "decode" or (route.prefill and (prefill is None or prefill.role != "prefill")):
            raise ValueError(f"policy {self.policy.name!r} chose an instance it was not offered: {route}")
        return Routed(route, decode, prefill, ask.prompt_tokens or 0)

    def _choice(self) -> bool:
        """Whether a lookup can change anything: more than one instance to choose from in a role,
        or a request that may go to the decode alone (else the round trip only delays it)."""
        usable = lambda bs: sum(b.healthy and not b.draining for b in bs)  # noqa: E731
        r = self.cfg.proxy.routing
        return (usable(self.prefills) > 1 or usable(self.decodes) > 1 or r.decode_alone_tokens > 0
                or r.decode_alone_fraction < 1.0)

    def pick_decode(self, exclude: set[str] = frozenset()) -> Backend | None:  # type: ignore[assignment]
        """Another decode instance, for a request whose decode could not be reached."""
        name = self.policy.pick_decode([b.view() for b in self.decodes], frozenset(exclude))
        return self.find(name) if name else None

    def pick_prefill(self, exclude: set[str] = frozenset()) -> Backend | None:  # type: ignore[assignment]
        """A prefill instance to serve a request whole when no decode instance can be reached."""
        left = [b for b in self.prefills if b.name not in exclude and not b.draining]
        healthy = [b for b in left if b.healthy]
        pool = healthy or left
        return min(pool, key=lambda b: b.queued_tokens) if pool else None

    def status(self) -> dict[str, object]:
        return {b.name: {"role": b.role, "url": b.url, "healthy": b.healthy, "draining": b.draining,
                         "error": b.last_error, **b.load()}
                for b in (*self.prefills, *self.decodes)}

    async def check(self, client: aiohttp.ClientSession) -> None:
        async def one(b: Backend) -> None:
            try:
                async with asyncio.timeout(self.cfg.proxy.connect_timeout_s), client.get(f"{b.url}/health") as r:
                    await r.read()
                ok = r.status == 200
                err = "" if ok else f"/health answered {r.status}"
            except (TimeoutError, aiohttp.ClientError) as e:
                ok, err = False, f"{type(e).__name__}: {e}"
            if ok and not b.healthy:
                log.info("%s instance %s is healthy again", b.role, b.name)
            b.healthy, b.last_error, b.checked_at = ok, err, time.monotonic()

        await asyncio.gather(*(one(b) for b in (*self.prefills, *self.decodes)))

    async def health_loop(self, client: aiohttp.ClientSession) -> None:
        while True:
            await self.check(client)
            await asyncio.sleep(self.cfg.proxy.health_interval_s)

    async def read_loads(self, client: aiohttp.ClientSession) -> None:
        """Every instance's load, from the instance itself (an instance that does not answer in
        ``proxy.routing.load_interval_s`` keeps its last figures)."""
        limit = self.cfg.proxy.routing.load_interval_s

        async def one(b: Backend) -> None:
            try:
                async with asyncio.timeout(limit):
                    async with client.get(f"{b.url}/metrics") as r:
                        text = (await r.read()).decode(errors="replace") if r.status == 200 else ""
                    found = {m.group(1): int(float(m.group(2))) for m in _GAUGE.finditer(text)}
                    b.running = found.get("vllm:num_requests_running", b.running)
                    b.waiting = found.get("vllm:num_requests_waiting", b.waiting)
                    if b.role == "decode" and b.cache_url:
                        async with client.get(f"{b.cache_url}/pd/stats") as r:
                            pool = (await r.json(content_type=None)).get("pool", {}) if r.status == 200 else {}
                        b.free_pages, b.pool_pages = pool.get("free_pages", b.free_pages), pool.get("pages", b.pool_pages)
            except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as e:
                log.debug("reading the load of %s: %r", b.name, e)

        await asyncio.gather(*(one(b) for b in (*self.prefills, *self.decodes)))

    async def load_loop(self, client: aiohttp.ClientSession) -> None:
        """Loads every ``routing.load_interval_s`` for a policy that routes by them, else with the
        health checks (``/health`` and ``/metrics`` show them, and a draining instance's requests
        running down)."""
        every = self.cfg.proxy.routing.load_interval_s if self.policy.wants_load else self.cfg.proxy.health_interval_s
        while True:
            await self.read_loads(client)
            await asyncio.sleep(every)

    # --- membership (membership.py: the admin routes and SIGHUP) -------------------------------
    def _role(self, role: str) -> list[Backend]:
        return self.prefills if role == "prefill" else self.decodes

    def add(self, inst: InstanceConfig, role: str) -> Backend:
        """Route to ``inst`` from now on (ValueError: the name is taken)."""
        if self.find(inst.name) is not None:
            raise ValueError(f"an instance named {inst.name!r} is already routed to")
        b = _backend(inst, role)
        self._role(role).append(b)
        log.info("%s instance %s joined (%s)", role, b.name, b.url)
        return b

    def remove(self, name: str) -> Backend:
        """Route nothing more to ``name`` (its requests in flight go on); KeyError if unknown."""
        b = self.find(name)
        if b is None:
            raise KeyError(name)
        self._role(b.role).remove(b)
        log.info("%s instance %s left", b.role, name)
        return b

    def drain(self, name: str, draining: bool = True) -> Backend:
        """A draining instance gets no new request; those it has finish. KeyError if unknown."""
        b = self.find(name)
        if b is None:
            raise KeyError(name)
        if b.draining != draining:
            log.info("%s instance %s %s", b.role, name, "draining" if draining else "taking requests again")
        b.draining = draining
        return b

    def reconcile(self, cfg: PDConfig) -> dict[str, list[str]]:
        """Membership as ``cfg`` lists it (a reloaded config file): instances it no longer lists
        leave, new ones join; those kept keep their state (draining, loads)."""
        joined, left = [], []
        for role, insts in _routed_to(cfg).items():
            names = {i.name for i in insts}
            for b in list(self._role(role)):
                if b.name not in names:
                    left.append(self.remove(b.name).name)
            for inst in insts:
                known = self.find(inst.name)
                if known is None:
                    joined.append(self.add(inst, role).name)
                elif (known.role, known.url) != (role, _backend(inst, role).url):
                    self.remove(inst.name)
                    self.add(inst, role)
        self.known_decodes = {i.name for i in cfg.decode}
        return {"joined": joined, "left": left}


class RouterCollector:
    """The router's state for the proxy's ``/metrics``: each instance's as it sees it,
    ``lmcache_pd_proxy_instance_{healthy,draining,running,waiting,queued_tokens,free_pages}``, and
    its decisions, ``lmcache_pd_proxy_routes_total{role,reason}`` (``Router.routes``), and what
    asking the instances cost, ``lmcache_pd_proxy_routing_lookup_seconds`` (count and sum)."""

    FIELDS = (("healthy", "1 if its last health check passed"), ("draining", "1 while it is drained"),
              ("running", "vLLM's running requests, as last read"), ("waiting", "vLLM's waiting requests"),
              ("queued_tokens", "prompt tokens of this proxy's prefill requests to it not answered yet"),
              ("free_pages", "a decode instance's free pool pages, as last read"))

    def __init__(self, router: Router):
        self.router = router

    def describe(self) -> list:
        return []

    def collect(self):
        backends = (*self.router.prefills, *self.router.decodes)
        for name, doc in self.FIELDS:
            g = GaugeMetricFamily(f"lmcache_pd_proxy_instance_{name}", doc, labels=["instance", "role"])
            for b in backends:
                value = getattr(b, name)
                if value is not None:
                    g.add_metric([b.name, b.role], float(value))
            yield g
        routes = CounterMetricFamily(
            "lmcache_pd_proxy_routes", "Routing decisions by role and reason (proxy.policy): decode: affinity "
            "kept (affinity), broken by load (affinity_broken), none to keep (least_loaded); prefill: a hit "
            "(cached_prefix), a miss (least_work), or none (decode_holds_prompt, short_prompt, not_splittable, "
            "no_prefill)", labels=["reason", "role"])
        for (role, reason), n in sorted(self.router.routes.items()):
            routes.add_metric([reason, role], n)
        yield routes
        yield SummaryMetricFamily(
            "lmcache_pd_proxy_routing_lookup_seconds", "Per request routed by what the instances hold: the "
            "time to learn it (tokenizing a text prompt, then every instance's /cache/lookup at once; at most "
            "proxy.routing.lookup_timeout_s)", count_value=self.router.lookups, sum_value=self.router.lookup_s)
