"""Type aliases and small enums shared by every layer (L0: imports nothing of ours).

Names follow docs/glossary.md.
"""

from __future__ import annotations

import enum

ReqId = str
"""vLLM's internal request id (``cmpl-<X-Request-Id>-<8 hex>``); differs between P and D."""

TransferId = str
"""Id the proxy gives one P->D hand-off; it names the decode-side reservation."""

PeerName = str
"""Name of an instance in the deployment config (for example ``decode-0``)."""

PageIdx = int
"""Index of a page in the decode-side pool."""

BlockId = int
"""vLLM's KV block id (manager view)."""

class BatchState(enum.IntEnum):
    """Life of one transport batch, ordered so that ``max`` keeps the most advanced state.

    FAILED, TIMEOUT and CANCELED are terminal and sticky.
    """

    PENDING = 0
    IN_FLIGHT = 1
    DONE = 2
    FAILED = 3
    TIMEOUT = 4
    CANCELED = 5

    @property
    def terminal(self) -> bool:
        return self >= BatchState.DONE


class ReservationState(enum.IntEnum):
    """State of a reservation (and of all its pages) in the decode-side pool.

    ALLOCATED -> READY -> CONSUMING -> freed (``PagePool.free``); or -> ABORTED / EXPIRED (freed).
    Nothing may read a page before READY.
    """

    ALLOCATED = 0
    READY = 1
    CONSUMING = 2
    ABORTED = 3
    EXPIRED = 4

    @property
    def failed(self) -> bool:
        return self in (ReservationState.ABORTED, ReservationState.EXPIRED)
