"""One prefill worker's session with the decode's control server (L4): what the handshake
settled, and the sequence numbers of its authenticated frames (server.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_pd import auth


@dataclass
class Session:
    peer: str
    rank: int
    incarnation: str
    keys: auth.DirectionKeys
    last_seen: float
    data_token: bytes = b""
    """Names this session on the data plane (HandshakeReply): its batches are admitted only
    into its own reservations."""
    recv_seq: int = 0
    send_seq: int = 0
    senders: int = 1
    """Prefill ranks that write each of its reservations (control/ranks.py): several when this
    decode rank merges the heads of a wider prefill's ranks."""
    same_tp: bool = True
    """The peer's TP size is ours: its ranks send whole blocks (direct hand-offs possible)."""
    sections: tuple[tuple[int, int], ...] = ()
    """With ``senders`` > 1: each writer's heads, its section of the pages (Reservation.sections)."""
