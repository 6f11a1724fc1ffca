"""Chunk keys: chained over every earlier token, salted by page format, isolated by tenant."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmcache_pd.cache.keys import NO_TENANT, cache_salt, chain_hashes, chunk_keys, tenant_tag

COMPAT = dict(model="m", dtype="bf16", kv_layout="LBHNC", block_size=16, num_layers=2, num_kv_heads=2,
              head_size=8, page_bytes=1024, tp_size=1, tp_rank=0, transport="tcp", attn_backend="cpu",
              vllm_version="0.32.0")


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50_000, n)


def test_only_full_chunks_get_keys():
    assert len(chain_hashes(_tokens(255), 64)) == 3
    assert len(chain_hashes(_tokens(256), 64)) == 4
    assert chain_hashes(_tokens(63), 64) == []
    assert len(chain_hashes(_tokens(256), 64, max_chunks=2)) == 2


def test_a_chunk_key_depends_on_every_earlier_token():
    base = _tokens(4 * 64)
    ref = chain_hashes(base, 64)
    for pos in (0, 70, 200):
        changed = base.copy()
        changed[pos] += 1
        got = chain_hashes(changed, 64)
        first = pos // 64
        assert got[:first] == ref[:first], "chunks before the change keep their keys"
        assert all(g != r for g, r in zip(got[first:], ref[first:])), "every later chunk gets a new key"


def test_a_shared_prefix_shares_keys_and_extending_it_keeps_them():
    turn1 = _tokens(3 * 64 + 10)
    turn2 = np.concatenate([turn1, _tokens(200, seed=1)])
    assert chain_hashes(turn2, 64)[:3] == chain_hashes(turn1, 64)


def test_tenants_never_share_a_key():
    toks = _tokens(4 * 64)
    salt = cache_salt(COMPAT, chunk_tokens=64)
    a = chunk_keys(salt, chain_hashes(toks, 64, tenant="alice"), "alice")
    b = chunk_keys(salt, chain_hashes(toks, 64, tenant="bob"), "bob")
    none = chunk_keys(salt, chain_hashes(toks, 64), None)
    assert not {k.digest for k in a} & {k.digest for k in b}
    assert not {k.digest for k in a} & {k.digest for k in none}
    assert {k.tenant for k in a} == {tenant_tag("alice")} != {k.tenant for k in b}
    assert {k.tenant for k in none} == {NO_TENANT}
    # "" and None are the same (no tenant); a tenant tag is printable and fixed-width
    assert chain_hashes(toks, 64, tenant="") == chain_hashes(toks, 64)
    assert len(tenant_tag("x" * 1000)) == 16 and tenant_tag("a").isalnum()


@pytest.mark.parametrize("field", [f for f in COMPAT if f != "transport"])
def test_salt_covers_every_page_format_field(field):
    changed = dict(COMPAT, **{field: str(COMPAT[field]) + "x"})
    assert cache_salt(changed, chunk_tokens=64) != cache_salt(COMPAT, chunk_tokens=64)


def test_salt_ignores_the_transport_and_covers_the_chunk_size():
    assert cache_salt(dict(COMPAT, transport="nixl"), chunk_tokens=64) == cache_salt(COMPAT, chunk_tokens=64)
    assert cache_salt(COMPAT, chunk_tokens=128) != cache_salt(COMPAT, chunk_tokens=64)


def test_keys_are_the_same_in_every_process():
    # No use of Python's hash(): another interpreter with another hash seed computes the same keys.
    code = ("import numpy as np; from lmcache_pd.cache.keys import chain_hashes;"
            "print(chain_hashes(np.arange(512) * 7, 128, tenant='t')[-1].hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outs == {chain_hashes(np.arange(512) * 7, 128, tenant="t")[-1].hex()}


def test_token_id_types_and_bad_input():
    toks = list(range(128))
    assert chain_hashes(toks, 64) == chain_hashes(np.array(toks, dtype=np.int64), 64) \
        == chain_hashes(np.array(toks, dtype=np.int32), 64)
    with pytest.raises(ValueError):
        chain_hashes([-1] * 64, 64)
    with pytest.raises(ValueError):
        chain_hashes([2**32] * 64, 64)
    with pytest.raises(ValueError):
        chain_hashes(toks, 0)
