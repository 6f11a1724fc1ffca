"""Content-addressed chunk keys (L4; hashlib and numpy only, so the scheduler side can use it).

A prompt is cut into *chunks* of ``chunk_tokens`` tokens (a multiple of vLLM's block size);
only full chunks get a key. Keys are built in two steps, because the two halves are known in
different processes:

1. **chain hash** (scheduler side, knows the tokens and the tenant)::

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
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

CHAIN_DOMAIN = b"lmcache-pd/chain/v1"
SALT_DOMAIN = b"lmcache-pd/salt/v1"
DIGEST_BYTES = 32
NO_TENANT = "-"
"""Tenant tag of requests without a tenant."""

_MAX_TOKEN = 2**32 - 1


class ChunkKey(NamedTuple):
    """Where one chunk lives in every tier: its tenant's tag and its 32-byte digest."""

    tenant: str
    digest: bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.tenant}:{self.digest[:6].hex()})"


def tenant_tag(tenant: str | None) -> str:
    """Short printable name of a tenant (used in file paths and Redis keys): 16 hex digits."""
    if not tenant:
        return NO_TENANT
    return hashlib.sha256(b"lmcache-pd/tenant/v1" + tenant.encode()).hexdigest()[:16]


def chain_root(tenant: str | None) -> bytes:
    t = (tenant or "").encode()
    return hashlib.sha256(CHAIN_DOMAIN + struct.pack("<I", len(t)) + t).digest()


def chain_hashes(tokens: Sequence[int] | np.ndarray, chunk_tokens: int, *, tenant: str | None = None,
                 max_chunks: int | None = None) -> list[bytes]:
    """Chain hash of each *full* chunk of ``tokens`` (a trailing partial chunk gets none)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("tokens must be a flat sequence of token ids")
    if arr.size and (arr.min() < 0 or arr.max() > _MAX_TOKEN):
        raise ValueError("token ids must be in [0, 2**32)")
    n = arr.size // chunk_tokens if max_chunks is None else min(arr.size // chunk_tokens, max_chunks)
    data = arr[: n * chunk_tokens].astype("<u4", copy=False).tobytes()
    step = chunk_tokens * 4
    out: list[bytes] = []
    h = chain_root(tenant)
    for i in range(n):
        h = hashlib.sha256(h + data[i * step:(i + 1) * step]).digest()
        out.append(h)
    return out


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
