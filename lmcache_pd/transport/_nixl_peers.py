"""What the nixl transport (nixl.py) keeps per peer and per posted transfer, and the descriptor
that names a peer's pool (sent in the handshake reply, decoded by ``NixlTransport.connect``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from lmcache_pd.transport._staging import Region
from lmcache_pd.transport.base import BatchHandle, PeerId


class Descriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent: str
    metadata: bytes
    address: int
    nbytes: int
    device: int
    mem: str
    device_uuid: str = ""
    """The region's GPU (base.gpu_uuid; empty: DRAM, or not known)."""


@dataclass
class Peer:
    agent: str
    address: int
    nbytes: int
    device: int
    mem: str
    report_tries: int = 0  # reads of UCX's report (written lazily) until it names a path; -1: done
    device_uuid: str = ""  # its region's GPU, when in another process (base.gpu_uuid)


@dataclass
class InFlight:
    handle: BatchHandle
    xfer: Any  # nixl_xfer_handle
    deadline: float
    peer: PeerId
    src_mem: str
    stage: Region | None = None  # the staging buffer this transfer reads, freed when it ends
