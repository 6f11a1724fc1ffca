"""Content-addressed chunk keys (L4; hashlib and numpy only, so the scheduler side can use it).

A prompt is cut into *chunks* of ``chunk_tokens`` tokens (a multiple of vLLM's block size);
only full chunks get a key. Keys are built in two steps, because the two halves are known in
different processes:

1. **chain hash** (scheduler side, knows the tokens and the tenant; ``lmcache_pd/chains.py``, a
   layer below, so that the proxy computes it too)::

       root   = sha256("lmcache-pd/chain/v1" | len(tenant) | tenant)
       c[i]   = sha256(c[i-1] | tokens of chunk i as little-endian u32)     c[-1] = root

   so a chunk's hash depends on every token before it, and two tenants never share one;
2. **chunk key** (worker side, knows what the bytes are)::

       key[i] = sha256(cache salt | c[i])

   where the *cache salt* digests everything that decides the bytes of a page (model, dtype,
   layout, block size, TP size and rank, attention backend, vLLM version, chunk size): a key
   found in any tier, from any instance, names bytes this worker can copy into its blocks.

Python's ``hash()`` is never used: it is salted per process and 64 bits wide. The tenant tag
(a short digest of the tenant) travels beside the key so that tiers can clear one tenant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

from lmcache_pd.chains import CHAIN_DOMAIN, DIGEST_BYTES, NO_TENANT, chain_hashes, chain_root, tenant_tag

__all__ = ["CHAIN_DOMAIN", "DIGEST_BYTES", "NO_TENANT", "SALT_DOMAIN", "ChunkKey", "cache_salt", "chain_hashes",
           "chain_root", "chunk_keys", "tenant_tag"]
SALT_DOMAIN = b"lmcache-pd/salt/v1"


class ChunkKey(NamedTuple):
    """Where one chunk lives in every tier: its tenant's tag and its 32-byte digest."""

    tenant: str
    digest: bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.tenant}:{self.digest[:6].hex()})"


def cache_salt(fields: dict[str, object], *, chunk_tokens: int) -> bytes:
    """Digest of what decides a chunk's bytes; ``fields`` is the worker's compat info as a dict.

    The transport is left out on purpose: instances moving KV by different transports still
    produce the same bytes and may share a remote tier."""
    items = sorted((k, str(v)) for k, v in fields.items() if k != "transport")
    blob = "\n".join(f"{k}={v}" for k, v in items) + f"\nchunk_tokens={chunk_tokens}"
    return hashlib.sha256(SALT_DOMAIN + blob.encode()).digest()


def chunk_keys(salt: bytes, chains: Sequence[bytes], tenant: str | None) -> list[ChunkKey]:
    tag = tenant_tag(tenant)
    return [ChunkKey(tag, hashlib.sha256(salt + c).digest()) for c in chains]
