"""Chain hashes of a prompt's chunks (L1; hashlib and numpy only): the half of a chunk's key
that every instance computes the same way from the tokens and the tenant, so that the proxy can
compute it once per request and ask every instance with it (cache/keys.py has the whole scheme,
and the other half: each worker's salt).

    root   = sha256("lmcache-pd/chain/v1" | len(tenant) | tenant)
    c[i]   = sha256(c[i-1] | tokens of chunk i as little-endian u32)     c[-1] = root
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

CHAIN_DOMAIN = b"lmcache-pd/chain/v1"
DIGEST_BYTES = 32
NO_TENANT = "-"
"""Tenant tag of requests without a tenant."""

_MAX_TOKEN = 2**32 - 1


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
