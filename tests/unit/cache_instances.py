"""Test helpers: a prefill instance's scheduler role (vLLM's own Request objects) and its worker-side
CacheIO (real tiers, real zmq lookups) over vLLM-like blocks; the config and prompts they take."""

from __future__ import annotations

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

from lmcache_pd.config import config_from_dict  # noqa: E402
from lmcache_pd.connector.scheduler_side import PrefillScheduler  # noqa: E402
from lmcache_pd.handoff import lookup_hold
from lmcache_pd.node.cache_io import CacheIO  # noqa: E402
from lmcache_pd.ops import kv_layout_of  # noqa: E402
from tests.unit.kv import vllm_like_cache  # noqa: E402
from tests.unit.nodes import BLOCK, CPT, HEADS, LAYERS, C  # noqa: E402

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
        self.sched.prefix.close()


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30_000, (n,), generator=g).tolist()
