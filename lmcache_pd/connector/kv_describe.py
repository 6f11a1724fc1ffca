"""What a worker's KV cache looks like to us: its layout, a flat byte view of its buffer, the
order of its layers, and the facts a peer must match (``CompatInfo``). Read once, when vLLM
registers the KV caches (worker_side.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lmcache_pd import protocol as P
from lmcache_pd.connector import compat as vllm_compat
from lmcache_pd.errors import ConfigError
from lmcache_pd.layout import KVLayout
from lmcache_pd.ops import kv_layout_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def describe_kv(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor], *, transport: str, model: str,
                tp_rank: int) -> tuple[KVLayout, torch.Tensor, P.CompatInfo]:
    """KV layout of this worker, a flat byte view of its buffer, and what a peer must match."""
    import vllm

    layers = ordered_layers(kv_caches)
    layout, buffer = kv_layout_of(layers)
    first = layers[0]
    cache = vllm_config.cache_config
    hf = vllm_config.model_config.hf_config
    heads, block_size, head_size = vllm_compat.kv_dims(first.shape)
    given = _vllm_says(lambda: vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config))
    if given and heads != given:  # a layout read wrongly: every handshake would be refused (ranks.py)
        raise ConfigError(f"the KV cache layers (shape {tuple(first.shape)}) read as {heads} KV heads a rank; "
                          f"vLLM gives this rank {given}", field="vllm")
    compat = P.CompatInfo(
        model=f"{model}|{getattr(hf, 'architectures', ['?'])[0]}|{getattr(hf, 'hidden_size', 0)}"
              f"|{getattr(hf, 'vocab_size', 0)}",
        dtype=f"{first.dtype}/{cache.cache_dtype}",
        kv_layout=vllm_compat.resolved_layout_name(cache),
        block_size=block_size,
        num_layers=layout.num_layers,
        num_kv_heads=heads,
        head_size=head_size,
        page_bytes=layout.page_bytes,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        tp_rank=tp_rank,
        transport=transport,
        attn_backend=_attn_backend(first),
        vllm_version=vllm.__version__,
        # 0: vLLM cannot say; CompatInfo then assumes the ranks split them without replication
        model_kv_heads=_vllm_says(lambda: vllm_config.model_config.get_total_num_kv_heads()),
    )
    return layout, buffer, compat


def ordered_layers(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The KV layers in our layout's order (a layer's index in KVLayout is its place here)."""
    unique: dict[int, torch.Tensor] = {}
    for t in kv_caches.values():  # shared-KV layers appear twice with the same tensor
        unique.setdefault(t.data_ptr(), t)
    layers = list(unique.values())  # vLLM's layer order: the same in every process of one model
    if len({t.untyped_storage().data_ptr() for t in layers}) == 1:
        layers.sort(key=lambda t: t.data_ptr())  # one buffer: its own order, as cache records always had
    return layers


def layer_indices(kv_caches: dict[str, torch.Tensor]) -> dict[str, int]:
    """vLLM's layer name -> the layer's index in our layout (names sharing a tensor share one)."""
    place = {t.data_ptr(): i for i, t in enumerate(ordered_layers(kv_caches))}
    return {name: place[t.data_ptr()] for name, t in kv_caches.items()}


def _attn_backend(t: torch.Tensor) -> str:
    """Byte format of a page. vLLM's CPU attention writes pages in a format of its instruction set
    (amx, vec, vec16, neon: ``_get_attn_isa``), so CPU pages copy only between the same ISA."""
    if t.device.type != "cpu":
        return f"{t.device.type}"
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return f"cpu_attn/{_get_attn_isa(t.dtype, int(t.shape[2]), int(t.shape[3]) // 2)}"
    except Exception:  # noqa: BLE001 - private helper; without it both sides still agree on "cpu_attn"
        return "cpu_attn"


def _vllm_says(question: Callable[[], int]) -> int:
    """vLLM's answer about the model's KV heads (0: it cannot say for this model config)."""
    try:
        return int(question())
    except Exception:  # noqa: BLE001 - a model config vLLM cannot answer this for
        return 0
