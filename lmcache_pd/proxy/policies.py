"""Routing policies: which prefill and which decode instance serve a request (no I/O).

A policy sees one request (:class:`Ask`) and a snapshot of every instance the proxy routes to
(:class:`InstanceView`: health, draining, load, and what it holds of this request's prompt),
and returns a :class:`Route`: a decode instance, and a prefill instance or none (the decode
then serves the request alone, computing the prompt itself: no hand-off, no second hop). The
router (routing.py) gathers the snapshots; policies only decide, so that each one is tested on
recorded states (tests/unit/test_policies.py).

Policies are chosen by name (``proxy.policy``): ``round_robin``, ``kv_aware``, or
``module:Class`` for a user's own subclass of :class:`Policy` (:func:`make_policy`).

Every route carries its reasons, counted in the proxy's ``/metrics``
(``lmcache_pd_proxy_routes_total{role, reason}``).
"""

from __future__ import annotations

import importlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from lmcache_pd.config import RoutingConfig
from lmcache_pd.errors import ConfigError


@dataclass(frozen=True)
class InstanceView:
    """One instance as the router last saw it."""

    name: str
    healthy: bool = True
    draining: bool = False
    running: int = 0
    """vLLM's ``num_requests_running`` (read every ``routing.load_interval_s``)."""
    waiting: int = 0
    """vLLM's ``num_requests_waiting``."""
    queued_tokens: int = 0
    """Prompt tokens of this proxy's requests sent to it and not answered yet (on a prefill:
    the prefill work ahead of a new request)."""
    free_pages: int | None = None
    """A decode instance's free pool pages (None: not known)."""
    pool_pages: int | None = None
    local_tokens: int = 0
    """Leading tokens of this request's prompt that its own tiers hold (``/cache/lookup``)."""
    remote_tokens: int = 0
    """Further leading tokens found only in the shared remote tier."""

    @property
    def usable(self) -> bool:
        return self.healthy and not self.draining

    @property
    def load(self) -> int:
        return self.running + self.waiting

    def overloaded(self, cfg: RoutingConfig) -> bool:
        if self.load >= cfg.decode_max_requests:
            return True
        return bool(self.pool_pages) and (self.free_pages or 0) < cfg.decode_min_free * (self.pool_pages or 0)


@dataclass(frozen=True)
class Ask:
    """What the router knows of one request before it is sent."""

    prompt_tokens: int | None = None
    """The prompt's length in tokens (None: not known, e.g. a text prompt not tokenized in time)."""
    splittable: bool = True
    """Whether the proxy can split it (one prompt, n = 1, no echo or prompt logprobs)."""


@dataclass(frozen=True)
class Route:
    decode: str
    prefill: str | None
    """None: the decode instance serves the request alone."""
    decode_reason: str
    """Why this decode (metrics): ``round_robin``, ``affinity`` (it holds most of the prompt),
    ``affinity_broken`` (the one that holds it is overloaded: the least loaded instead),
    ``least_loaded``."""
    prefill_reason: str
    """Why this prefill, or why none: ``round_robin``, ``cached_prefix``, ``least_work``;
    ``not_splittable``, ``decode_holds_prompt``, ``short_prompt``, ``no_prefill``."""


def candidates(views: Sequence[InstanceView]) -> list[InstanceView]:
    """Usable instances; when none is, the healthy-or-not ones that are not draining (trying one
    beats refusing outright: its health check may be stale). A draining instance gets nothing."""
    usable = [v for v in views if v.usable]
    return usable or [v for v in views if not v.draining]


class Policy(ABC):
    """A routing policy. ``wants_lookup``: the router asks every instance what it holds of each
    request's prompt before calling :meth:`route` (a round trip under ``routing.lookup_timeout_s``);
    ``wants_load``: it reads every instance's load every ``routing.load_interval_s``."""

    name: ClassVar[str]
    wants_lookup: ClassVar[bool] = False
    wants_load: ClassVar[bool] = False

    def __init__(self, cfg: RoutingConfig):
        self.cfg = cfg

    @abstractmethod
    def route(self, ask: Ask, prefills: Sequence[InstanceView], decodes: Sequence[InstanceView]) -> Route | None:
        """The route of one request; None when no decode instance can take it."""

    def pick_decode(self, decodes: Sequence[InstanceView], exclude: frozenset[str] = frozenset()) -> str | None:
        """Another decode instance for a request whose decode could not be reached."""
        left = candidates([d for d in decodes if d.name not in exclude])
        return min(left, key=lambda d: d.load).name if left else None


class RoundRobin(Policy):
    """Each role's usable instances in turn, whatever they hold or carry."""

    name = "round_robin"

    def __init__(self, cfg: RoutingConfig):
        super().__init__(cfg)
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}

    def _next(self, role: str, views: Sequence[InstanceView]) -> InstanceView | None:
        pool = candidates(views)
        return pool[next(self._turn[role]) % len(pool)] if pool else None

    def route(self, ask: Ask, prefills: Sequence[InstanceView], decodes: Sequence[InstanceView]) -> Route | None:
        decode = self._next("decode", decodes)
        if decode is None:
            return None
        prefill = self._next("prefill", prefills) if ask.splittable else None
        if prefill is None:
            return Route(decode.name, None, "round_robin", "not_splittable" if not ask.splittable else "no_prefill")
        return Route(decode.name, prefill.name, "round_robin", "round_robin")

    def pick_decode(self, decodes: Sequence[InstanceView], exclude: frozenset[str] = frozenset()) -> str | None:
        d = self._next("decode", [v for v in decodes if v.name not in exclude])
        return d.name if d else None


class KVAware(Policy):
    """Route by what each instance holds of the prompt, and by load.

    - **Decode**: the one that holds most of the prompt (a conversation's earlier turns, which
      ``cache.decode_skip`` then does not move again) unless it is overloaded
      (``routing.decode_max_requests``, ``routing.decode_min_free``); else the least loaded
      (running plus waiting requests, then the most free pool pages).
    - **Decode alone**: when that decode holds all but ``routing.decode_alone_tokens`` of the
      prompt (a short prompt: all of it), or at least ``routing.decode_alone_fraction`` of it, it
      computes the rest itself.
    - **Prefill**: the least prefill work before this request's prompt is computed, in tokens:
      its queued prompt tokens plus the part of this prompt it cannot load (a token held only
      in the remote tier counts ``1 - routing.remote_weight`` of one to compute). Ties go in
      turn, so that equal instances share the work.
    """

    name = "kv_aware"
    wants_lookup = True
    wants_load = True

    def __init__(self, cfg: RoutingConfig):
        super().__init__(cfg)
        self._ties = {"prefill": itertools.count(), "decode": itertools.count()}

    def _decode(self, decodes: Sequence[InstanceView]) -> tuple[InstanceView, str] | None:
        pool = candidates(decodes)
        if not pool:
            return None
        fit = [d for d in pool if not d.overloaded(self.cfg)]
        holder = max(fit, key=lambda d: d.local_tokens, default=None)
        if holder is not None and holder.local_tokens > 0:
            return holder, "affinity"
        # No fit instance holds any of it: was the history on an overloaded one? (affinity broken)
        broken = any(d.local_tokens > 0 for d in pool)
        least = min(d.load for d in (fit or pool))
        tied = [d for d in (fit or pool) if d.load == least]
        # Most free pool pages among those that reported theirs; one not read yet (it just
        # joined) takes its turn rather than losing every tie until the next load read.
        most_free = max((d.free_pages for d in tied if d.free_pages is not None), default=None)
        tied = [d for d in tied if d.free_pages is None or d.free_pages == most_free]
        return tied[next(self._ties["decode"]) % len(tied)], "affinity_broken" if broken else "least_loaded"

    def _work(self, p: InstanceView, prompt: int) -> float:
        local = min(p.local_tokens, prompt)
        remote = min(p.remote_tokens, prompt - local)
        return p.queued_tokens + prompt - local - self.cfg.remote_weight * remote

    def route(self, ask: Ask, prefills: Sequence[InstanceView], decodes: Sequence[InstanceView]) -> Route | None:
        chosen = self._decode(decodes)
        if chosen is None:
            return None
        decode, why = chosen
        if not ask.splittable:
            return Route(decode.name, None, why, "not_splittable")
        prompt = ask.prompt_tokens
        if prompt:
            held = min(decode.local_tokens, prompt)
            if prompt - held <= self.cfg.decode_alone_tokens:
                return Route(decode.name, None, why, "decode_holds_prompt" if held else "short_prompt")
            if held and held >= self.cfg.decode_alone_fraction * prompt:
                return Route(decode.name, None, why, "decode_holds_prompt")
        pool = candidates(prefills)
        if not pool:
            return Route(decode.name, None, why, "no_prefill")
        size = prompt or 0
        least = min(self._work(p, size) for p in pool)
        tied = [p for p in pool if self._work(p, size) == least]
        prefill = tied[next(self._ties["prefill"]) % len(tied)]
        cached = prefill.local_tokens or prefill.remote_tokens
        return Route(decode.name, prefill.name, why, "cached_prefix" if cached else "least_work")


BUILTIN: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, KVAware)}


def make_policy(name: str, cfg: RoutingConfig) -> Policy:
    """The policy named ``name`` (``proxy.policy``): a built-in, or ``module:Class``."""
    if name in BUILTIN:
        return BUILTIN[name](cfg)
    module, _, cls = name.partition(":")
    if not module or not cls:
        raise ConfigError(f"{name!r} is neither a built-in policy ({', '.join(sorted(BUILTIN))}) nor module:Class",
                          field="proxy.policy")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load {name!r}: {e}", field="proxy.policy") from None
    if not (isinstance(found, type) and issubclass(found, Policy)):
        raise ConfigError(f"{name!r} is not a subclass of lmcache_pd.proxy.policies.Policy", field="proxy.policy")
    return found(cfg)
