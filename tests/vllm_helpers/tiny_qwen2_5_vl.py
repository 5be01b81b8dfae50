"""A tiny Qwen2.5-VL folder that vLLM's CPU build can run: `observe_r1.tiny_model`'s tiny model with
head_dim 32 (hidden 128, 4 heads), the smallest head size vLLM's CPU attention backend (CPU_ATTN)
accepts; the stock tiny model's head_dim 16 is rejected ("Unsupported CPU attention configuration").
Same tokenizer, chat template and image processor; ~0.5M parameters."""

from __future__ import annotations

from pathlib import Path

from observe_r1.tiny_model import SIZES, ModelSize, build

SIZE = ModelSize(
    vocab_size=SIZES["tiny"].vocab_size,
    hidden_size=128,
    intermediate_size=256,
    layers=2,
    heads=4,
    kv_heads=2,
    mrope_section=(4, 6, 6),  # sums to head_dim / 2
    vision_depth=2,
    vision_hidden=32,
    vision_intermediate=64,
    vision_heads=2,
    max_pixels=SIZES["tiny"].max_pixels,
)


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    return build(out_dir, SIZE, seed=seed)
