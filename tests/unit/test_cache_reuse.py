"""Prefill-side prefix reuse: the scheduler role (vLLM's own Request objects) against a real
worker-side CacheIO (real tiers, real zmq lookups), moving real bytes through vLLM-like blocks."""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (run scripts/setup)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from lmcache_pd.cache.keys import ChunkKey  # noqa: E402
from lmcache_pd.config import config_from_dict  # noqa: E402
from lmcache_pd.connector.scheduler_side import PrefillScheduler  # noqa: E402
from lmcache_pd.node.cache_io import CacheIO, lookup_hold  # noqa: E402
from lmcache_pd.ops import kv_layout_of  # noqa: E402
from tests.unit.test_layout import vllm_like_cache  # noqa: E402
from tests.unit.test_node import BLOCK, CPT, HEADS, LAYERS, C  # noqa: E402

CHUNK = 2 * BLOCK  # 2 blocks per chunk


def cfg_with_cache(tmp_path, **cache):
    return config_from_dict({
        "model": {"path": "tiny"},
        "prefill": [{"name": f"p-{uuid.uuid4().hex[:6]}", "http_port": 9}],
        "decode": [{"name": "decode-0", "http_port": 10, "control_port": 11, "data_port": 12}],
        "cache": {"enabled": True, "chunk_tokens": CHUNK, "lookup_timeout_s": 2,
                  "tiers": [{"name": "memory"}, {"name": "disk", "options": {"path": str(tmp_path / "disk")}}],
                  **cache},
    }, source="test")


def request(req_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=1), None, cache_salt=salt)


def blocks(ids) -> KVCacheBlocks:
    return KVCacheBlocks(([KVCacheBlock(i) for i in ids],))


class Instance:
    """One prefill instance's scheduler role and worker-side CacheIO over a vLLM-like KV cache."""

    def __init__(self, cfg, *, num_blocks=40):
        self.name = cfg.prefill[0].name
        self.sched = PrefillScheduler(cfg, instance=self.name, block_size=BLOCK)
        self.layers = vllm_like_cache(LAYERS, num_blocks, HEADS, BLOCK, C, torch.bfloat16, "LBHNC")
        self.kv, self.buf = kv_layout_of(self.layers)
        self.io = CacheIO(cfg.cache, instance=self.name, rank=0, compat=msgspec.structs.asdict(CPT), kv=self.kv,
                          kv_buffer=self.buf, block_size=BLOCK)
        self.io.start()

    def block_bytes(self, ids) -> list[bytes]:
        return [bytes(t[b].contiguous().view(torch.uint8).numpy()) for b in ids for t in self.layers]

    def step(self):
        meta = self.sched.build_connector_meta(SchedulerOutput.make_empty())
        for s in meta.cache_saves:
            self.io.submit_save(s, None)
        for ld in meta.cache_loads:
            self.io.submit_load(ld)
        for rid in meta.cache_releases:
            self.io.release(lookup_hold(rid))
        return meta

    def results(self, n, timeout_s=10):
        out, deadline = [], time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            out += self.io.drain(0.1)
        assert len(out) == n, out
        return out

    def matched(self, r, computed=0, timeout_s=5):
        deadline = time.monotonic() + timeout_s
        while (got := self.sched.get_num_new_matched_tokens(r, computed))[0] is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return got

    def save(self, toks, block_ids, salt=None, rid="a"):
        """Run a request to its end and wait until its chunks are in the tiers; that step's metadata."""
        r = request(rid, toks, salt)
        self.matched(r)
        self.finish(r, list(block_ids))
        meta = self.step()
        self.results(1)
        assert self.io.cache.flush(5)
        return meta

    def finish(self, r, block_ids):
        r.num_computed_tokens = r.num_prompt_tokens
        r.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return self.sched.request_finished(r, block_ids)

    def close(self):
        self.io.close()
        if self.sched.cache is not None:
            self.sched.cache.client.close()


@pytest.fixture
def inst(tmp_path):
    i = Instance(cfg_with_cache(tmp_path))
    yield i
    i.close()


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30_000, (n,), generator=g).tolist()


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
    sched.cache.client.close()


def test_chunk_size_must_be_a_multiple_of_the_block_size(tmp_path):
    from lmcache_pd.errors import ConfigError

    cfg = cfg_with_cache(tmp_path, chunk_tokens=BLOCK + 1)
    with pytest.raises(ConfigError, match="cache.chunk_tokens"):
        PrefillScheduler(cfg, instance=cfg.prefill[0].name, block_size=BLOCK)
