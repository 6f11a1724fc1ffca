"""Transport registry: transports by name, imported only when selected.

A new transport is one module implementing :class:`~lmcache_pd.transport.base.Transport` plus
one line in ``_BUILTIN`` (or a call to :func:`register` from outside the package).
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec

from lmcache_pd.errors import ConfigError, TransportUnavailable
from lmcache_pd.transport.base import Capabilities, PeerId, RegionId, TransferHandle, Transport, TransportStats

__all__ = [
    "Capabilities", "PeerId", "RegionId", "TransferHandle", "Transport", "TransportStats",
    "available", "create", "get_class", "names", "register",
]

_BUILTIN: dict[str, str] = {
    "loopback": "lmcache_pd.transport.loopback:LoopbackTransport",
    "tcp": "lmcache_pd.transport.tcp:TcpTransport",
    "cuda_ipc": "lmcache_pd.transport.cuda_ipc:CudaIpcTransport",
    "nixl": "lmcache_pd.transport.nixl:NixlTransport",
}
_registry: dict[str, str] = dict(_BUILTIN)


def register(name: str, target: str) -> None:
    """Register ``"module.path:ClassName"`` under ``name``. Duplicate names are refused."""
    if name in _registry:
        raise ValueError(f"transport {name!r} is already registered ({_registry[name]})")
    if ":" not in target:
        raise ValueError(f"target {target!r} must look like 'package.module:ClassName'")
    _registry[name] = target


def names() -> list[str]:
    return sorted(_registry)


def get_class(name: str) -> type[Transport]:
    if name not in _registry:
        raise ConfigError(f"unknown transport {name!r} (registered: {', '.join(names())})", field="transport.name")
    module, _, cls = _registry[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise TransportUnavailable(f"transport {name!r} cannot be imported here: {e}") from e


def available(name: str) -> tuple[bool, str]:
    """(True, "") if the transport can run on this machine, else (False, reason)."""
    try:
        cls = get_class(name)
    except TransportUnavailable as e:
        return False, str(e)
    return cls.available()


def parse_options(name: str, options: dict[str, Any]) -> msgspec.Struct:
    """Validate ``transport.options`` against the transport's own Options struct."""
    cls = get_class(name)
    try:
        return msgspec.convert(options, cls.Options, strict=True)
    except msgspec.ValidationError as e:
        msg, _, at = str(e).partition(" - at `")
        path = at.rstrip("`").removeprefix("$").lstrip(".")
        if msg.startswith("Object contains unknown field `"):
            path, msg = msg.split("`")[1], "unknown field"
        raise ConfigError(msg, field=f"transport.options{'.' + path if path else ''}") from None


def create(name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Transport:
    """Instantiate a registered transport; options are validated first."""
    ok, reason = available(name)
    if not ok:
        raise TransportUnavailable(f"transport {name!r} is not available here: {reason}")
    return get_class(name)(parse_options(name, options or {}), **kwargs)
