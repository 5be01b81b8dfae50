"""Build a Qwen2.5-VL-architecture model offline: the stand-in for a real checkpoint on machines
with no GPU and no model hub.

The folder is a normal Hugging Face model folder (config, safetensors, tokenizer, chat template,
image processor, generation config) with randomly initialised weights. The tokenizer is a
byte-level BPE trained here on a small built-in corpus, holding Qwen's special tokens, so any text
round-trips and the image placeholders behave as in Qwen2.5-VL. `tiny` (~0.2M parameters) is for
tests; `small` (~35M) is for benchmarks. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from observe_r1.errors import InvalidValue
from observe_r1.format import SYSTEM_PROMPT, format_response
from observe_r1.io import atomic_dir

# Qwen2.5-VL's added tokens, in Qwen's order; the first 14 are the special ones its code refers to.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation, whitespace.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = "qwen2_vl_chat.jinja"


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    max_pixels: int


SIZES = {
    "tiny": ModelSize(512, 64, 128, 2, 4, 2, (2, 3, 3), 2, 32, 64, 2, 224 * 224),
    "small": ModelSize(4096, 512, 1536, 8, 8, 2, (8, 12, 12), 4, 256, 1024, 4, 448 * 448),
}
MIN_PIXELS = 56 * 56

_WORDS = (
    "the a an of in on to is are and or with how many what which sum total number digits image shown "
    "picture red green blue yellow orange purple black white gray circle circles square squares triangle "
    "triangles shape shapes bar bars chart tallest shortest highest lowest clock time hour minute hand "
    "count add compare more fewer than left right top bottom first second third answer option letter "
    "choices question observe think reason step so therefore because I see there we need equals plus "
    "minus times divided by result final check verify difficult carefully problem value label labels"
).split()


def training_corpus(n_lines: int = 4000) -> list[str]:
    """Deterministic text the tokenizer is trained on: the prompt, the tags, questions and numbers."""
    rng = random.Random(1234)
    lines = [SYSTEM_PROMPT] * 20
    for _ in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        number = str(rng.randint(0, 999))
        lines.append(f"{words.capitalize()}? Answer with a single number.")
        lines.append(format_response(f" I see {words}. ", f" {words} so {number}. ", number))
        lines.append(f"Choices:\nA. {rng.choice(_WORDS)}\nB. {rng.choice(_WORDS)}\nC. {number}")
    return lines


def build_tokenizer(vocab_size: int):
    """A Qwen2-style byte-level BPE tokenizer trained on `training_corpus`, with the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    reserved = len(QWEN_SPECIAL_TOKENS) + len(QWEN_ADDED_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - reserved,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tok.add_tokens(list(QWEN_ADDED_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    hf.chat_template = resources.files("observe_r1.templates").joinpath(CHAT_TEMPLATE).read_text()
    return hf


def build_config(size: ModelSize, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = size.hidden_size // size.heads
    if sum(size.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {size.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden_size,
            intermediate_size=size.intermediate_size,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=32768,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": list(size.mrope_section),
                "rope_theta": 1e6,
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden_size,
            fullatt_block_indexes=[size.vision_depth - 1],
            window_size=112,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build(
    out_dir: str | Path, size: str | ModelSize = "tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a randomly initialised Qwen2.5-VL model folder to `out_dir`, atomically. `size` names one
    of `SIZES` or is a `ModelSize` of its own."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if isinstance(size, ModelSize):
        spec = size
    elif size in SIZES:
        spec = SIZES[size]
    else:
        raise InvalidValue(f"unknown size '{size}' (choose from {', '.join(SIZES)})")
    tokenizer = build_tokenizer(spec.vocab_size)
    config = build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=spec.max_pixels)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        # Name the stock classes, as a real Qwen2.5-VL folder does, so the Auto* loaders pick them.
        _update_json(
            tmp / "preprocessor_config.json",
            image_processor_type="Qwen2VLImageProcessor",
            processor_class="Qwen2_5_VLProcessor",
        )
        _update_json(tmp / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer")
    return Path(out_dir)


def _update_json(path: Path, **changes: str) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
