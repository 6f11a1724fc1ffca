"""Test helpers: vLLM-like KV caches (random bytes) and a peer's compatibility record."""

from __future__ import annotations

import torch

from lmcache_pd import protocol as P

COMPAT = P.CompatInfo(model="tiny", dtype="torch.bfloat16/auto", kv_layout="LBHNC", block_size=128, num_layers=2,
                      num_kv_heads=2, head_size=64, page_bytes=65536, tp_size=1, tp_rank=0, transport="tcp",
                      attn_backend="cpu_attn/vec", vllm_version="0.32.0")


def vllm_like_cache(num_layers: int, num_blocks: int, heads: int, block: int, c: int, dtype: torch.dtype,
                    layout: str, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Per-layer [B, H, N, C] views into ONE int8 buffer, as vLLM allocates them, random bytes."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    per_layer = num_blocks * heads * block * c
    buf = torch.zeros(num_layers * per_layer * itemsize, dtype=torch.int8, device=device)
    typed = buf.view(dtype)
    layers = []
    for layer in range(num_layers):
        base = typed[layer * per_layer:(layer + 1) * per_layer]
        if layout == "LBHNC":
            t = base.view(num_blocks, heads, block, c)
        else:  # LBNHC: physical [B, N, H, C], logical [B, H, N, C]
            t = base.view(num_blocks, block, heads, c).permute(0, 2, 1, 3)
        layers.append(t)
    g = torch.Generator().manual_seed(7)
    buf.copy_(torch.randint(-128, 127, buf.shape, dtype=torch.int8, generator=g).to(device))
    return layers


def per_layer_cache(num_layers: int, num_blocks: int, heads: int, block: int, head_size: int, dtype: torch.dtype,
                    device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """vLLM 0.24's KV memory: one buffer per layer, FlashAttention's ``[B, 2, N, H, hs]``, random
    bytes; between consecutive layers a spacer allocation (random too), so that the span over
    the layers holds memory that is not theirs. Returns (layers, spacers)."""
    g = torch.Generator().manual_seed(11)
    layers, spacers = [], []
    for _ in range(num_layers):
        raw = torch.randint(-128, 127, (num_blocks * 2 * block * heads * head_size
                                        * torch.tensor([], dtype=dtype).element_size(),),
                            dtype=torch.int8, generator=g).to(device)
        layers.append(raw.view(dtype).view(num_blocks, 2, block, heads, head_size))
        spacers.append(torch.randint(0, 255, (4096,), dtype=torch.uint8, generator=g).to(device))
    return layers, spacers
