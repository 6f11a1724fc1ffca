"""Admission of data batches into the decode pool (L5): the transport's ``WriteGate``.

A transport that sees each batch before its bytes land (tcp) asks :meth:`PoolGate.admit`. The
batch is admitted only when its connection presented the data token of a live control session,
its ticket names a live reservation of that session (transfer id and generation) still being
written, and every byte it carries lies in that reservation's pages. While admitted it counts
as a writer of the reservation (``PagePool.begin_write``): if the reservation ends meanwhile,
its pages go back only when the batch's bytes stopped landing. So no byte of an ended hand-off
ever lands in pages another hand-off was given. A batch whose bytes all landed reports the
pages it filled, by layer; a layer whose every page of the reservation has landed (in one
batch, or one per chunk of a chunked prompt) joins ``Reservation.layers_landed``: the loader
scatters those before TransferDone comes (``pool.scatter_landed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lmcache_pd import protocol as P
from lmcache_pd.control.allocator import PagePool
from lmcache_pd.errors import ProtocolError, TransferError
from lmcache_pd.layout import PoolLayout


def layer_pages_of(layout: PoolLayout, dst_offsets: list[int], lengths: list[int]) -> dict[int, set[int]]:
    """The pool pages a batch writes into, by layer (the pool is ``[layer][page][block]``): every
    page a range touches, so that admission checks each is the reservation's. A range need not
    be whole blocks: a prefill rank of another TP size writes its KV heads' share of the pages,
    in sections that cut across them (heads.page_sections). Such a reservation is scattered only
    once every writer is done (Reservation.senders), so a page touched is not taken as whole."""
    bb, n_pages = layout.block_bytes, layout.num_pages
    if sum(lengths) > layout.nbytes:
        raise TransferError(f"a batch of {sum(lengths)} B into a pool of {layout.nbytes} B")
    out: dict[int, set[int]] = {}
    for d, n in zip(dst_offsets, lengths):
        if n == 0:
            continue  # the padding rows of a short table
        if d < 0 or n < 0 or d + n > layout.nbytes:
            raise TransferError(f"range [{d}, {d + n}) is outside the pool")
        for u in range(d // bb, -(-(d + n) // bb)):
            out.setdefault(u // n_pages, set()).add(u % n_pages)
    return out



class PoolGate:
    def __init__(self, pool: PagePool, layout: PoolLayout, owner_of: Callable[[bytes], str | None]):
        """``owner_of``: the owner of the live control session with a data token (the server)."""
        self.pool = pool
        self.layout = layout
        self.owner_of = owner_of

    def admit(self, session: bytes, ticket: bytes, dst_offsets: list[int],
              lengths: list[int]) -> Callable[[bool], None]:
        """Admit one batch (see the module docstring). Its ``done(landed)`` ends the write, and
        reports the pages a landed batch wrote (a layered hand-off's batch is one layer of one
        chunk), so that the loader may scatter the layers whose every page landed before
        TransferDone comes (``Reservation.layers_landed``)."""
        owner = self.owner_of(session)
        if owner is None:
            raise TransferError("its connection names no live control session (the session ended or never was)")
        try:
            transfer_id, generation = P.read_ticket(ticket)
        except ProtocolError as e:
            raise TransferError(str(e)) from None
        by_layer = layer_pages_of(self.layout, dst_offsets, lengths)
        r = self.pool.begin_write(transfer_id, generation, owner=owner, pages=set().union(*by_layer.values()))
        if sum(lengths) > len(r.pages) * self.layout.page_bytes:  # the same pages over and over
            self.pool.end_write(r, now=time.monotonic())
            raise TransferError(f"a batch of {sum(lengths)} B into a reservation of {len(r.pages)} pages",
                                transfer_id=transfer_id)

        def done(landed: bool) -> None:
            self.pool.end_write(r, now=time.monotonic(), landed=by_layer if landed else None,
                                broke="" if landed else "the prefill's data connection broke mid-batch "
                                "(a prefill that died, or bytes that failed their check)")

        return done
