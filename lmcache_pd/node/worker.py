"""Who a worker is, and what of the deployment's config its node objects read (L5).

``KVSender``, ``KVReceiver`` and ``Links`` are built from these two frozen records, never from
the whole ``PDConfig``: :class:`Worker` names the worker (instance, TP rank, this process's
incarnation, what its KV cache is), :class:`NodeConfig` holds the config sections a hand-off
reads and where each decode worker listens. So a node object's constructor says exactly what
it depends on, and a test builds one without a model or proxy section.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from lmcache_pd import protocol as P
from lmcache_pd._types import PeerName
from lmcache_pd.config import (
    AuthConfig,
    BackpressureConfig,
    CacheConfig,
    IntegrityConfig,
    PDConfig,
    PoolConfig,
    TimeoutsConfig,
    TransportConfig,
    host_port,
)
from lmcache_pd.errors import PeerLost


def _incarnation() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Worker:
    """One worker (TP rank) of an instance, as its peers see it."""

    instance: str
    rank: int
    compat: P.CompatInfo
    """What its KV cache is (model, dtype, layout, block size, TP): a peer must match it."""
    incarnation: str = field(default_factory=_incarnation)
    """Unique to this process: a peer that sees another one knows this worker restarted."""

    @property
    def identity(self) -> str:
        """The control plane's name for this worker (its zmq routing identity)."""
        return f"{self.instance}/{self.rank}/{self.incarnation}"


@dataclass(frozen=True)
class Listener:
    """Where a decode instance's rank 0 listens; rank r adds r to each port."""

    host: str
    control_port: int
    data_port: int
    advertise: tuple[str, int] | None = None
    """Where prefill workers connect for the data plane, when not (host, data_port)."""
    tp_size: int = 1
    """Its TP size: which of its ranks a prefill worker hands off to, with which heads (heads.py)."""


@dataclass(frozen=True)
class NodeConfig:
    """The deployment's config as the node objects read it: no model, proxy or instance list."""

    timeouts: TimeoutsConfig
    transport: TransportConfig
    auth: AuthConfig
    pool: PoolConfig
    backpressure: BackpressureConfig
    cache: CacheConfig
    integrity: IntegrityConfig
    handoff_log: str | None
    decodes: tuple[tuple[str, Listener], ...]
    """Every decode instance by name: the only instances a node object ever addresses."""

    @classmethod
    def of(cls, cfg: PDConfig) -> NodeConfig:
        decodes = tuple((d.name, Listener(d.host, d.control_port, d.data_port,
                                          host_port(d.data_advertise) if d.data_advertise else None, d.tp_size))
                        for d in cfg.decode
                        if d.control_port is not None and d.data_port is not None)  # the config requires both
        return cls(timeouts=cfg.timeouts, transport=cfg.transport, auth=cfg.auth, pool=cfg.pool,
                   backpressure=cfg.backpressure, cache=cfg.cache, integrity=cfg.integrity,
                   handoff_log=cfg.handoff_log, decodes=decodes)

    def listener(self, peer: PeerName) -> Listener:
        """Where decode instance ``peer`` listens; PeerLost when the deployment has no such decode."""
        for name, at in self.decodes:
            if name == peer:
                return at
        raise PeerLost(f"{peer!r} is not a decode instance of this deployment", peer=peer)

    def control_endpoint(self, peer: PeerName, rank: int) -> str:
        at = self.listener(peer)
        return f"tcp://{at.host}:{at.control_port + rank}"
