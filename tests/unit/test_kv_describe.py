"""What a worker says of its KV cache in the handshake (connector/kv_describe.py), read from the
layer tensors each supported vLLM hands ``register_kv_caches``.

The shapes are the attention backends' own (vLLM 0.24's ``get_kv_cache_shape``: FLASH_ATTN,
FLASHINFER and FLEX_ATTENTION ``(blocks, 2, block size, heads, head size)``, the CPU backend
``(blocks, heads, block size, 2 * head size)``; vLLM 0.32's logical ``[B, H, N, C]`` for all).
Reading the GPU's as ``[B, H, N, C]`` took the K/V axis for the heads: the prefill said it held
2 KV heads, and every decode refused its handshake (vLLM's GPU engine, 2026-12-05).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from lmcache_pd.connector import compat
from lmcache_pd.control.ranks import check_ranks
from lmcache_pd.errors import ConfigError

BLOCKS, N, HEADS, C = 4, 16, 8, 128


@pytest.mark.parametrize("unified, shape, want", [
    (False, (BLOCKS, 2, N, HEADS, C), (HEADS, N, C)),  # 0.24, a GPU backend
    (False, (BLOCKS, HEADS, N, 2 * C), (HEADS, N, 2 * C)),  # 0.24, the CPU backend
    (True, (BLOCKS, HEADS, N, C), (HEADS, N, C)),  # 0.32, every backend
    (False, (BLOCKS, 2, N, 2, C), (2, N, C)),  # two heads: the K/V axis is still the second
])
def test_kv_dims_names_heads_block_size_and_head_size_of_each_layout(unified, shape, want):
    assert compat.kv_dims(shape, unified=unified) == want


@pytest.mark.parametrize("unified, shape", [(False, (BLOCKS, 3, N, HEADS, C)), (False, (BLOCKS, N)),
                                            (True, (BLOCKS, 2, N, HEADS, C))])
def test_a_layer_shape_of_no_known_layout_is_refused_naming_it(unified, shape):
    with pytest.raises(ConfigError) as e:
        compat.kv_dims(shape, unified=unified)
    assert e.value.field == "vllm" and str(tuple(shape)) in str(e.value)


BACKENDS_024 = ("flash_attn.FlashAttentionBackend", "flex_attention.FlexAttentionBackend",
                "triton_attn.TritonAttentionBackend", "cpu_attn.CPUAttentionBackend")


def backend_024(name: str):
    """A vLLM 0.24 attention backend class of the installed vLLM, or skip saying why."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (run scripts/setup)")
    if compat.unified_layouts():
        pytest.skip("the installed vLLM hands logical [B, H, N, C] layers (0.32): vLLM 0.24's backend shapes are "
                    "read from its own code under scripts/test-vllm024")
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), cls)


@pytest.mark.parametrize("name", BACKENDS_024)
def test_vllm_024_backends_own_layer_shapes_read_as_the_heads_and_block_size_they_were_given(name):
    shape = backend_024(name).get_kv_cache_shape(BLOCKS, N, HEADS, C)
    heads, block_size, _ = compat.kv_dims(shape)
    assert (heads, block_size) == (HEADS, N), shape


def fake_vllm_config(rank_heads: int, total_heads: int, tp: int = 1) -> SimpleNamespace:
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=4096, vocab_size=128256)
    model = SimpleNamespace(hf_config=hf, get_num_kv_heads=lambda parallel: rank_heads,
                            get_total_num_kv_heads=lambda: total_heads)
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="auto"), model_config=model,
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp))


def layers(shape: tuple[int, ...], n: int = 3) -> dict[str, torch.Tensor]:
    """vLLM 0.24's: one buffer per layer."""
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=torch.bfloat16) for i in range(n)}


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed here (describe_kv reads its version; run scripts/setup)")


@needs_vllm
@pytest.mark.parametrize("shape", [(BLOCKS, 2, N, HEADS, C), (BLOCKS, HEADS, N, 2 * C)], ids=["gpu", "cpu"])
def test_vllm_024_layers_describe_the_heads_vllm_gives_and_the_handshake_accepts_them(monkeypatch, shape):
    from lmcache_pd.connector.kv_describe import describe_kv

    monkeypatch.setattr(compat, "unified_layouts", lambda: False)
    monkeypatch.setattr(compat, "resolved_layout_name", lambda cache: "NHD")
    cfg = fake_vllm_config(HEADS, HEADS)
    layout, _, prefill = describe_kv(cfg, layers(shape), transport="nixl", model="m", tp_rank=0)
    _, _, decode = describe_kv(cfg, layers(shape), transport="nixl", model="m", tp_rank=0)
    assert (prefill.num_kv_heads, prefill.block_size) == (HEADS, N)
    assert layout.num_blocks == BLOCKS and layout.num_layers == 3
    check = check_ranks(decode, prefill)
    assert check.ok, check.why


@needs_vllm
def test_layers_that_read_as_other_heads_than_vllm_gives_fail_at_registration_naming_both(monkeypatch):
    from lmcache_pd.connector.kv_describe import describe_kv

    monkeypatch.setattr(compat, "unified_layouts", lambda: True)  # [B, H, N, C]: 2 would be the heads
    monkeypatch.setattr(compat, "resolved_layout_name", lambda cache: "LBHNC")
    with pytest.raises(ConfigError, match=r"read as 2 KV heads a rank; vLLM gives this rank 8") as e:
        describe_kv(fake_vllm_config(HEADS, HEADS), layers((BLOCKS, 2, N, HEADS * C)), transport="tcp", model="m",
                    tp_rank=0)
    assert e.value.field == "vllm"
