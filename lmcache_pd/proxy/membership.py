"""Live membership: instances join, drain and leave without restarting the proxy (no torch).

Two ways, both changing only whom the proxy routes to (routing.py, ``Router.add/drain/remove``):
- **The admin routes** (``/admin/instances``; the POST and DELETE routes need the deployment's
  bearer token when a shared secret is set, as the cache routes do):
  ``GET`` lists every instance with its health, draining flag and load;
  ``POST {"role": "prefill"|"decode", "instance": {...}}`` adds one (the fields of an instance
  in the deployment YAML; a bad field is refused naming it);
  ``POST /admin/instances/{name}/drain`` (and ``/undrain``): no new request goes to it, and
  those it has finish; ``DELETE /admin/instances/{name}``: it leaves.
- **SIGHUP**: the proxy reads its config file again and takes its instance lists (``prefill``,
  ``decode``, ``proxy.prefills``, ``proxy.decodes``); other fields need a restart.

A decode instance can join only if the deployment config names it: a prefill worker resolves a
decode by name in its own config, never from an address in a request (protocol.PrefillParams),
so a decode the prefill instances were not started with could not be written to. A prefill
instance can join freely.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lmcache_pd.auth import Keyring
from lmcache_pd.config import InstanceConfig, PDConfig
from lmcache_pd.errors import ConfigError
from lmcache_pd.proxy.routing import Router

log = logging.getLogger(__name__)


_UNAUTHORIZED = "missing or wrong bearer token (`lmcache-pd token` prints it)"


def _refused(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def add_admin_routes(app: FastAPI, router: Router, keys: Keyring) -> None:
    def allowed(request: Request) -> bool:
        return keys.authorizes(request.headers.get("authorization"))

    @app.get("/admin/instances")
    async def instances() -> Response:
        return JSONResponse({"policy": router.policy.name, "instances": router.status()})

    @app.post("/admin/instances")
    async def join(request: Request) -> Response:
        if not allowed(request):
            return _refused(401, _UNAUTHORIZED)
        try:
            body = await request.json()
        except ValueError:
            return _refused(400, "the body must be JSON")
        if not isinstance(body, dict) or body.get("role") not in ("prefill", "decode"):
            return _refused(400, 'give {"role": "prefill" or "decode", "instance": {...}}')
        try:
            inst = msgspec.convert(body.get("instance"), InstanceConfig)
        except msgspec.ValidationError as e:
            return _refused(400, f"instance: {e}")
        if body["role"] == "decode" and inst.name not in router.known_decodes:
            return _refused(409, f"decode instance {inst.name!r} is not in the deployment config: the prefill "
                                 "instances could not write to it (add it there, and start the prefills with it)")
        if body["role"] == "decode" and (inst.control_port is None or inst.data_port is None):
            return _refused(400, "instance: a decode instance needs control_port and data_port")
        try:
            b = router.add(inst, body["role"])
        except ValueError as e:
            return _refused(409, str(e))
        return JSONResponse({"joined": b.name, "role": b.role, "url": b.url}, status_code=201)

    def _change(name: str, do: Callable[[str], Any]) -> Response:
        try:
            b = do(name)
        except KeyError:
            return _refused(404, f"no instance named {name!r} is routed to")
        return JSONResponse({"instance": b.name, "draining": b.draining})

    @app.post("/admin/instances/{name}/{action}")
    async def act(name: str, action: str, request: Request) -> Response:
        if not allowed(request):
            return _refused(401, _UNAUTHORIZED)
        if action not in ("drain", "undrain"):
            return _refused(404, f"unknown action {action!r} (drain, undrain)")
        return _change(name, lambda n: router.drain(n, action == "drain"))

    @app.delete("/admin/instances/{name}")
    async def leave(name: str, request: Request) -> Response:
        if not allowed(request):
            return _refused(401, _UNAUTHORIZED)
        return _change(name, router.remove)


def reload_on_sighup(router: Router, reload: Callable[[], PDConfig]) -> Callable[[], None]:
    """Re-read the config on SIGHUP (``reload``: the launcher's, from its file and overrides);
    returns what removes the handler. A config that does not load is logged and changes nothing."""
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        try:
            cfg = reload()
        except (ConfigError, OSError) as e:
            log.error("SIGHUP: the config did not load, membership unchanged: %s", e)
            return
        log.info("SIGHUP: membership reloaded: %s", router.reconcile(cfg))

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (ValueError, RuntimeError, NotImplementedError) as e:  # not the main thread, or no signals here
        log.warning("SIGHUP will not reload the config: %s", e)
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)
