"""Which prefill and decode instance serves a request (no torch, no vllm).

Round-robin over instances whose last health check passed; an instance that fails a request
is marked down at once and comes back when a health check passes again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from lmcache_pd.config import InstanceConfig, PDConfig

log = logging.getLogger(__name__)


@dataclass
class Backend:
    name: str
    role: str
    host: str
    port: int
    healthy: bool = True
    last_error: str = ""
    checked_at: float = field(default=0.0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def mark_down(self, error: str) -> None:
        if self.healthy:
            log.warning("%s instance %s marked down: %s", self.role, self.name, error)
        self.healthy, self.last_error = False, error


def _backend(inst: InstanceConfig, role: str) -> Backend:
    host = "127.0.0.1" if inst.host in ("0.0.0.0", "") else inst.host
    return Backend(inst.name, role, host, inst.http_port)


class Router:
    def __init__(self, cfg: PDConfig):
        self.cfg = cfg
        px = cfg.proxy
        self.prefills = [_backend(i, "prefill") for i in cfg.prefill if not px.prefills or i.name in px.prefills]
        self.decodes = [_backend(i, "decode") for i in cfg.decode if not px.decodes or i.name in px.decodes]
        self._rr_p = itertools.count()
        self._rr_d = itertools.count()

    @staticmethod
    def _pick(backends: list[Backend], rr: itertools.count, exclude: set[str]) -> Backend | None:
        candidates = [b for b in backends if b.name not in exclude]
        healthy = [b for b in candidates if b.healthy]
        pool = healthy or candidates  # all down: try anyway rather than refuse outright
        return pool[next(rr) % len(pool)] if pool else None

    def pick_prefill(self, exclude: set[str] = frozenset()) -> Backend | None:  # type: ignore[assignment]
        return self._pick(self.prefills, self._rr_p, exclude)

    def pick_decode(self, exclude: set[str] = frozenset()) -> Backend | None:  # type: ignore[assignment]
        return self._pick(self.decodes, self._rr_d, exclude)

    def status(self) -> dict[str, object]:
        return {b.name: {"role": b.role, "url": b.url, "healthy": b.healthy, "error": b.last_error}
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
