"""Prefill-side prefix reuse: the scheduler role (vLLM's own Request objects) against a real
worker-side CacheIO (real tiers, real zmq lookups), moving real bytes through vLLM-like blocks."""

from __future__ import annotations

import logging
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (run scripts/setup)")


from lmcache_pd.cache.keys import ChunkKey  # noqa: E402
from lmcache_pd.connector.scheduler_side import PrefillScheduler  # noqa: E402
from tests.unit.cache_instances import CHUNK, Instance, blocks, cfg_with_cache, prompt, request  # noqa: E402
from tests.unit.nodes import BLOCK  # noqa: E402


@pytest.fixture
def inst(tmp_path):
    i = Instance(cfg_with_cache(tmp_path))
    yield i
    i.close()


def test_second_request_loads_the_saved_prefix_bitwise(inst):
    toks = prompt(5 * CHUNK + 3)  # 5 full chunks and a partial one
    a = request("a", toks)
    assert inst.matched(a) == (0, False)  # nothing cached yet
    src = list(range(6 * 2))  # a's blocks 0..11
    assert inst.finish(a, src) == (True, None)  # keep the blocks until saved
    meta = inst.step()
    assert [(s.req_id, len(s.chains), len(s.block_ids)) for s in meta.cache_saves] == [("a", 5, 10)]
    (res,) = inst.results(1)
    assert res.kind == "save" and res.ok and res.chunks == 5
    assert inst.io.cache.flush(5)

    b = request("b", toks + prompt(40, seed=1))  # a later turn: the same prefix and more
    assert inst.matched(b) == (5 * CHUNK, True)
    dst = list(range(20, 32))
    inst.sched.update_state_after_alloc(b, blocks(dst), 5 * CHUNK)
    meta = inst.step()
    (ld,) = meta.cache_loads
    assert ld.skip_blocks == 0 and ld.block_ids == tuple(dst[:10])
    (res,) = inst.results(1)
    assert res.kind == "load" and res.ok, res.error
    assert inst.block_bytes(dst[:10]) == inst.block_bytes(src[:10])
    assert inst.sched.hit_sources(b, 5 * CHUNK) == {"memory": 5 * CHUNK}


def test_a_local_prefix_hit_is_not_loaded_again(inst):
    toks = prompt(4 * CHUNK + 1)
    inst.save(toks, range(10))
    b = request("b", toks)
    # vLLM's own cache holds 3 blocks (1.5 chunks): claim the rest of the 4 chunks
    assert inst.matched(b, computed=3 * BLOCK) == (4 * CHUNK - 3 * BLOCK, True)
    all_blocks = [30, 31, 32, 25, 26, 27, 28, 29]  # vLLM's table: 3 local, then the new ones
    inst.sched.update_state_after_alloc(b, blocks(all_blocks), 4 * CHUNK - 3 * BLOCK)
    (ld,) = inst.step().cache_loads
    assert ld.skip_blocks == 1 and len(ld.chains) == 3 and ld.block_ids == (25, 26, 27, 28, 29)
    before = inst.block_bytes([30, 31, 32])
    (res,) = inst.results(1)
    assert res.ok
    assert inst.block_bytes([25, 26, 27, 28, 29]) == inst.block_bytes(range(3, 8))
    assert inst.block_bytes([30, 31, 32]) == before
    assert inst.sched.hit_sources(b, 4 * CHUNK - 3 * BLOCK) == {"memory": 4 * CHUNK - 3 * BLOCK}


def test_the_last_prompt_token_is_never_claimed(inst):
    toks = prompt(3 * CHUNK)  # exactly 3 chunks
    assert len(inst.save(toks, range(6)).cache_saves[0].chains) == 3
    assert inst.matched(request("b", toks)) == (2 * CHUNK, True)  # 3 chunks cached, 2 usable


def test_tenants_do_not_share_cached_prefixes(inst):
    toks = prompt(3 * CHUNK + 1)
    inst.save(toks, range(8), salt="alice")
    assert inst.matched(request("b", toks, salt="bob")) == (0, False)
    assert inst.matched(request("c", toks)) == (0, False)
    assert inst.matched(request("d", toks, salt="alice")) == (3 * CHUNK, True)


def test_a_chunk_deleted_after_the_lookup_fails_the_load(inst):
    toks = prompt(3 * CHUNK + 1)
    inst.save(toks, range(8))
    b = request("b", toks)
    assert inst.matched(b) == (3 * CHUNK, True)
    inst.io.cache.clear()  # the operator cleared the cache meanwhile
    inst.sched.update_state_after_alloc(b, blocks(range(20, 26)), 3 * CHUNK)
    inst.step()
    (res,) = inst.results(1)
    assert res.kind == "load" and not res.ok and "chunk 0 of 3 is in no tier now" in res.error
    assert inst.io.cache.holds.owners() == 0


def fill_up(inst) -> tuple[object, list]:
    """Make the memory tier full, so that storing anything has to evict; returns the tier and
    a put that needs room."""
    mem = inst.io.cache.tiers[0]
    mem._index.capacity = mem._index.bytes
    k = mem._index.keys()[0]
    return mem, [ChunkKey(k.tenant, bytes(32)), b"x" * 16]


def test_chunks_found_by_a_lookup_are_held_until_their_load(inst):
    toks = prompt(3 * CHUNK + 1)
    inst.save(toks, range(8))
    b = request("b", toks)
    assert inst.matched(b) == (3 * CHUNK, True)
    mem, put = fill_up(inst)
    before = set(mem._index.keys())
    assert not mem.put(*put) and set(mem._index.keys()) == before  # held: nothing may be evicted
    inst.sched.update_state_after_alloc(b, blocks(range(20, 26)), 3 * CHUNK)
    inst.step()
    (res,) = inst.results(1)
    assert res.kind == "load" and res.ok
    assert inst.io.cache.holds.owners() == 0 and mem.put(*put)  # the load ended the hold


def test_a_lookup_vllm_never_claims_is_released_when_the_request_ends(inst):
    toks = prompt(3 * CHUNK + 1)
    inst.save(toks, range(8))
    b = request("b", toks)
    assert inst.matched(b) == (3 * CHUNK, True)
    assert inst.io.cache.holds.owners() == 1
    inst.finish(b, list(range(20, 28)))  # e.g. aborted before it was scheduled: no load
    meta = inst.step()
    assert meta.cache_releases == ["b"] and not meta.cache_loads
    assert inst.io.cache.holds.owners() == 0


def test_nothing_new_to_save_frees_the_blocks_at_once(inst):
    toks = prompt(2 * CHUNK + 1)
    inst.save(toks, range(6))
    b = request("b", toks[: 2 * CHUNK + 1])
    assert inst.matched(b) == (2 * CHUNK, True)
    assert inst.finish(b, list(range(10, 16))) == (False, None)
    short = request("c", prompt(CHUNK - 1, seed=3))  # no full chunk at all
    assert inst.matched(short) == (0, False)
    assert inst.finish(short, [1]) == (False, None)


def test_lookup_without_a_worker_gives_up_at_its_deadline_naming_the_field(tmp_path, caplog):
    cfg = cfg_with_cache(tmp_path, lookup_timeout_s=0.3)
    sched = PrefillScheduler(cfg, instance=cfg.prefill[0].name, block_size=BLOCK)  # no CacheIO: nobody answers
    r = request("a", prompt(3 * CHUNK))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmcache_pd"):
        while (got := sched.get_num_new_matched_tokens(r, 0))[0] is None:
            assert time.monotonic() - t0 < 2
            time.sleep(0.01)
    assert got == (0, False) and 0.3 <= time.monotonic() - t0 < 1.5
    assert any("cache.lookup_timeout_s" in rec.getMessage() for rec in caplog.records)
    sched.prefix.close()


def test_chunk_size_must_be_a_multiple_of_the_block_size(tmp_path):
    from lmcache_pd.errors import ConfigError

    cfg = cfg_with_cache(tmp_path, chunk_tokens=BLOCK + 1)
    with pytest.raises(ConfigError, match="cache.chunk_tokens"):
        PrefillScheduler(cfg, instance=cfg.prefill[0].name, block_size=BLOCK)
