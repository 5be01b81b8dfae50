"""A tiny text-only Qwen2 (`Qwen2ForCausalLM`) model folder, built offline, for exercising vLLM on CPU.

vLLM's CPU build runs text-only models as they are (its Qwen2.5-VL path needs torchvision, which is
broken here, and runs only through the test shim in `image_only.py`), so most vLLM tests serve this
model instead of `observe_r1.tiny_model`. It shares that model's
tokenizer (`build_tokenizer`): the same Qwen special tokens and chat template, so prompts and the
`<observe>/<think>/<answer>` tags tokenize exactly as they do for the Qwen2.5-VL stand-in.

Sizes: hidden 128 with 4 query heads and 2 key/value heads gives head_dim 32, the smallest head size
vLLM's CPU attention backend (CPU_ATTN) accepts; hidden 64 with 4 heads (head_dim 16) is rejected.
The same seed gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from observe_r1.io import atomic_dir
from observe_r1.tiny_model import build_tokenizer

VOCAB_SIZE = 512
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 4096


def build_tiny_qwen2(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a randomly initialised Qwen2ForCausalLM folder (config, safetensors, tokenizer) to `out_dir`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(VOCAB_SIZE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.pad_token_id],
        pad_token_id=config.pad_token_id,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
