"""What a prefill-side hand-off reports (KVSender.drain): its outcome and its timeline (L5)."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_pd._types import ReqId, TransferId


@dataclass(frozen=True)
class SendResult:
    req_id: ReqId
    transfer_id: TransferId
    ok: bool
    num_bytes: int = 0
    seconds: float = 0.0
    """Data-plane time: submit to the transport until the bytes are in the peer's pool."""
    error: str = ""
    allocate_s: float = 0.0
    """From the hand-off's start to pages granted (link, Allocate round trip, any queueing;
    with a reservation, only what of it was still outstanding)."""
    done_s: float = 0.0
    """TransferDone round trip (the decode side may read the pages from its first half on)."""
    reserved: bool = False
    """The pages came from a reservation made while the last prompt chunk computed."""
    skipped_pages: int = 0
    """Leading blocks not sent: the decode side's own cache holds them."""
    started_at: float = 0.0
    """Wall clock (``time.time()``) when the sender took the hand-off up: the timeline's start."""
    done_at: float = 0.0
    """Wall clock when it ended (TransferDone acknowledged, or failed)."""
    computed_at: float = 0.0
    """Wall clock when the prefill's forward over the last prompt chunk was done (SendSpec)."""
    granted_at: float = 0.0
    """Wall clock when the decode pages were granted to it (taken up, if reserved ahead)."""
    first_byte_at: float = 0.0
    """Wall clock when its first group was submitted to the transport."""
    last_byte_at: float = 0.0
    """Wall clock when its last group was in the decode pool."""
    layered: bool = False
    """Sent layer by layer during the prefill's forward (``transport.layerwise``)."""
    on_caller: bool = False
    """Planned and submitted on the thread that submitted the hand-off (its pages were granted)."""
    prepared: bool = False
    """On that thread, started from the launch laid out when its pages were granted (the
    reservation named its blocks: node/on_caller.py), not planned there."""
    pieces: int = 0
    """Layered: the forwards (prompt chunks) it was sent from, one piece each."""
    posted: bool = False
    """Layered: its last chunk's layers went as one batch, each posted by vLLM's thread as the
    forward passed it (``transport.post_layers``), not a batch per layer from the sender's."""
    direct: bool = False
    """Written straight into the decode's vLLM blocks (``transport.direct``), not its pool."""
    layers_sent_at: tuple[float, ...] = ()
    """Layered: wall clock when each layer of the last chunk was handed to the transport (by layer
    index; submitted by the sender, or posted by the forward's thread; over several lanes the
    latest; 0.0: nothing of that layer to send)."""
    last_chunk_at: float = 0.0
    """Layered: wall clock when the step computing the prompt's last chunk began; bytes sent
    before it were hidden under earlier chunks."""
