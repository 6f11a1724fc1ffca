"""Transport registry: transports by name, imported only when selected.

A new transport is one module implementing :class:`~lmcache_pd.transport.base.Transport` plus
one line in ``_BUILTIN`` (or a call to :func:`register` from outside the package).
"""

from __future__ import annotations

from typing import Any

import msgspec

from lmcache_pd.errors import TransportUnavailable
from lmcache_pd.registry import Registry
from lmcache_pd.transport.base import BatchHandle, Capabilities, PeerId, RegionId, Transport, TransportStats

__all__ = [
    "Capabilities", "PeerId", "RegionId", "BatchHandle", "Transport", "TransportStats",
    "available", "create", "get_class", "names", "register",
]

_BUILTIN: dict[str, str] = {
    "loopback": "lmcache_pd.transport.loopback:LoopbackTransport",
    "tcp": "lmcache_pd.transport.tcp:TcpTransport",
    "cuda_ipc": "lmcache_pd.transport.cuda_ipc:CudaIpcTransport",
    "nixl": "lmcache_pd.transport.nixl:NixlTransport",
}
_registry = Registry("transport", _BUILTIN, field="transport.name", unavailable=TransportUnavailable)
register = _registry.register
names = _registry.names


def get_class(name: str) -> type[Transport]:
    return _registry.get_class(name)


def available(name: str) -> tuple[bool, str]:
    """(True, "") if the transport can run on this machine, else (False, reason)."""
    try:
        cls = get_class(name)
    except TransportUnavailable as e:
        return False, str(e)
    return cls.available()


def parse_options(name: str, options: dict[str, Any]) -> msgspec.Struct:
    """Validate ``transport.options`` against the transport's own Options struct."""
    return _registry.parse_options(name, options, field="transport.options")


def create(name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Transport:
    """Instantiate a registered transport; options are validated first."""
    ok, reason = available(name)
    if not ok:
        raise TransportUnavailable(f"transport {name!r} is not available here: {reason}")
    return get_class(name)(parse_options(name, options or {}), **kwargs)
