"""Which prefill ranks write into this decode rank (L4): the handshake's check of the fields
that differ between ranks and TP sizes (protocol.PER_RANK), after the shared ones matched.

Between equal TP sizes a prefill rank writes into the decode rank of its number only. Between
different ones (docs/tensor_parallel.md) the KV heads decide: a decode rank receives its heads
from ``heads.senders_of`` prefill ranks, one each (a narrower decode merges several prefill
ranks' heads into the same pages, a wider one takes part of one prefill rank's), and the byte
cut at head boundaries needs heads outermost in a block (the ``LBHNC`` layout, vLLM 0.32).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_pd import heads
from lmcache_pd import protocol as P
from lmcache_pd.errors import ConfigError

SLICEABLE_LAYOUTS = ("LBHNC",)
"""KV layouts whose blocks lay heads outermost: a run of heads is a run of bytes."""


@dataclass(frozen=True)
class RankCheck:
    """The handshake's verdict on a prefill rank: ``why`` it is refused (naming ``field``), or
    ``senders``, how many prefill ranks write each reservation of this decode rank, and, when
    several do, the ``sections`` they write (``(first head, how many)`` of this rank's heads
    each: heads.page_sections)."""

    senders: int = 0
    sections: tuple[tuple[int, int], ...] = ()
    why: str = ""
    field: str = ""

    @property
    def ok(self) -> bool:
        return not self.why


def check_ranks(decode: P.CompatInfo, prefill: P.CompatInfo) -> RankCheck:
    """May ``prefill``'s rank hand off to ``decode``'s rank? Both describe the same model and
    setup (their shared fields matched)."""
    total = decode.total_kv_heads
    if prefill.total_kv_heads != total:
        return RankCheck(why=f"the prefill counts {prefill.total_kv_heads} KV heads, this decode {total}",
                         field="num_kv_heads")
    try:
        slices = heads.head_map(total, prefill.tp_size, decode.tp_size)
    except ConfigError as e:
        return RankCheck(why=f"KV heads do not map from prefill TP {prefill.tp_size} to decode TP "
                             f"{decode.tp_size}: {e}", field="tp_size")
    if prefill.tp_size != decode.tp_size and decode.kv_layout not in SLICEABLE_LAYOUTS:
        return RankCheck(why=f"a hand-off between TP sizes needs heads outermost in a block ({', '.join(SLICEABLE_LAYOUTS)}); "
                             f"the KV layout is {decode.kv_layout}", field="kv_layout")
    for c in (prefill, decode):
        held = heads.rank_heads(total, c.tp_size)
        if not 0 <= c.tp_rank < c.tp_size or c.num_kv_heads != held[c.tp_rank][1]:
            return RankCheck(why=f"rank {c.tp_rank} of TP {c.tp_size} says it holds {c.num_kv_heads} KV heads; "
                                 f"vLLM gives it {held[min(max(c.tp_rank, 0), c.tp_size - 1)][1]}",
                             field="num_kv_heads")
    senders = heads.senders_of(slices, decode.tp_rank)
    if prefill.tp_rank not in senders:
        return RankCheck(why=f"prefill rank {prefill.tp_rank} of TP {prefill.tp_size} sends no KV heads to decode "
                             f"rank {decode.tp_rank} of TP {decode.tp_size} (its senders: {senders})", field="tp_rank")
    sections = tuple(sorted((s.dst_head, s.count) for s in slices if s.dst_rank == decode.tp_rank))
    return RankCheck(senders=len(senders), sections=sections if len(senders) > 1 else ())
