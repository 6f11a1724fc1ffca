"""Generate a tiny random-weight Llama and a locally trained tokenizer (no download).

Used by the demo and the end-to-end tests: the machines that run them cannot reach a model hub.
The result is deterministic for a given seed, and cached: a directory that already holds a
complete model of the same spec is reused.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

SPEC = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "initializer_range": 0.25,
    "torch_dtype": "bfloat16",
}
"""A large initializer_range spreads the logits so that greedy decoding is decisive."""

LLAMA3_8B_ATTENTION = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 8, "num_attention_heads": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 16384,
}
"""Overrides for the GPU engine tests: Llama-3-8B's layer shape (head dim 128, 8 KV heads:
32 KiB of bf16 KV per token over 8 layers), random weights, the small trained vocabulary."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus() -> list[str]:
    """Text to train the tokenizer on: the standard library's own sources (always present)."""
    root = Path(os.__file__).parent
    texts: list[str] = []
    for name in sorted(root.glob("*.py"))[:60]:
        try:
            texts.append(name.read_text(encoding="utf-8", errors="ignore"))
        except OSError:
            continue
    return texts


def build_tiny_model(out_dir: str | os.PathLike[str], *, seed: int = 0,
                     overrides: dict[str, Any] | None = None, device: str = "cpu") -> Path:
    """``overrides``: of :data:`SPEC` (benchmarks use a larger model, so that computing a prompt
    costs enough to see what the cache saves). ``device``: where the weights are drawn (a GPU
    draws a large model's in seconds; the result does not depend on it being reused)."""
    out = Path(out_dir)
    stamp = out / "lmcache_pd_tiny.json"
    spec = {**SPEC, **(overrides or {})}
    wanted = {"spec": spec, "seed": seed, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec["vocab_size"], special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec["max_position_embeddings"]

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"], initializer_range=spec["initializer_range"],
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # write then move: no half-written model
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    stamp.write_text(json.dumps(wanted))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    target = argv[0] if argv else "tiny-model"
    print(build_tiny_model(target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
