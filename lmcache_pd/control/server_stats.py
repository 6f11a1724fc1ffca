"""What the decode's control server counts, and what it asks of the decode's own prefix cache
(L4; server.py uses both)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lmcache_pd import protocol as P


class PrefixHolder(Protocol):
    """Decode-side reuse, seen from the control plane (the receiver implements it)."""

    def hold(self, msg: P.Allocate) -> int:
        """How many leading pages of the prompt this instance's own cache holds (whole chunks,
        fewer than ``num_pages``), held for the transfer id. Runs on the server thread, so it
        asks local tiers only."""

    def release(self, transfer_id: str) -> None:
        """The allocation was refused: end the hold now."""


class NothingHeld:
    """No decode-side reuse (``cache.decode_skip`` off): every page of a prompt is sent."""

    def hold(self, msg: P.Allocate) -> int:
        return 0

    def release(self, transfer_id: str) -> None:
        pass


NOTHING_HELD = NothingHeld()


@dataclass
class ServerStats:
    handshakes: int = 0
    refused_handshakes: int = 0
    allocations: int = 0
    queued_allocations: int = 0
    alloc_timeouts: int = 0
    queue_full: int = 0
    """Allocations refused at once: ``max_waiting`` others already waited (backpressure.decode_queue)."""
    malformed: int = 0
    """Frames that are not ours (count, header, sizes), or authentic ones whose body does not decode."""
    unauthenticated: int = 0
    """Frames whose tag does not verify (another secret, garbled, or no session for this peer),
    and, with ``auth.encrypt``, connections whose CurveZMQ handshake failed (no Curve, or not
    this deployment's key): those never deliver a frame at all."""
    stale: int = 0
    """Authentic frames seen before: replayed session frames, Handshakes with a spent cookie."""
    rejected: int = 0
    """Authentic requests refused (another peer's transfer, a Landed out of order)."""
    ended_sent: int = 0
    """Ended notices sent: hand-offs this side ended while their prefill was still writing."""
    peers_lost: int = 0
    """Sessions dropped: the peer stayed silent for timeouts.peer_s, or restarted."""
    crashes: int = 0
    """Handlers that raised (a bug: answered INTERNAL, logged with its traceback)."""
    direct: int = 0
    """Allocations answered with the decode's own blocks (direct hand-offs, transport.direct)."""
    direct_waits: int = 0
    """Allocations held for their decode request's blocks (``timeouts.direct_wait_s``)."""
