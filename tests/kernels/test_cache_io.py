"""The prefix cache's loads and saves on a GPU KV cache: chunks copied out of CUDA blocks and back
into other blocks arrive bitwise (through the host memory and disk tiers)."""

from __future__ import annotations

import msgspec
import pytest
import torch

from lmcache_pd.config import CacheConfig, TierConfig
from lmcache_pd.handoff import CacheLoadSpec, CacheSaveSpec
from lmcache_pd.node.cache_io import CacheIO
from lmcache_pd.ops import kv_layout_of
from tests.unit.kv import COMPAT, vllm_like_cache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BLOCK = 16


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_gpu_save_then_load_is_bitwise(tmp_path, layout, tier):
    layers = vllm_like_cache(4, 64, 2, BLOCK, 64, torch.bfloat16, layout, "cuda")
    kv, buf = kv_layout_of(layers)
    opts = {"path": str(tmp_path / "d")} if tier == "disk" else {}
    cfg = CacheConfig(enabled=True, chunk_tokens=2 * BLOCK, tiers=(TierConfig(name=tier, options=opts),))
    io = CacheIO(cfg, instance=f"gpu-{tier}-{layout}", rank=0, compat=msgspec.structs.asdict(COMPAT), kv=kv,
                 kv_buffer=buf, block_size=BLOCK)
    io.start()
    try:
        chains = (b"a" * 32, b"b" * 32, b"c" * 32)
        src = (5, 9, 2, 33, 17, 40)
        ready = torch.cuda.Event()
        ready.record()
        io.submit_save(CacheSaveSpec("r1", chains, None, src), ready)
        (saved,) = io.drain(30)
        assert saved.ok, saved.error
        assert io.cache.flush(30)
        dst = (50, 51, 52, 60, 61)  # skip the first block of the first chunk
        snapshot = [t.contiguous().view(torch.uint8).clone() for t in layers]
        io.submit_load(CacheLoadSpec("r2", chains, None, 1, dst))
        (loaded,) = io.drain(30)
        assert loaded.ok, loaded.error
        for s, d in zip(src[1:], dst):
            for t in layers:  # compare bytes: random bf16 bits include NaNs
                assert torch.equal(t[d].contiguous().view(torch.uint8), t[s].contiguous().view(torch.uint8))
        untouched = [b for b in range(64) if b not in dst]
        for t, before in zip(layers, snapshot):
            assert torch.equal(t[untouched].contiguous().view(torch.uint8), before[untouched]), "wrote outside dst"
    finally:
        io.close()
