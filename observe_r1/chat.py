"""One chat turn with images through a loaded model and processor: prompt building and generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from observe_r1.format import SYSTEM_PROMPT
from observe_r1.sampling import SamplingParams, end_of_turn_ids, to_generation_config


def build_messages(question: str, n_images: int, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for one question: the system prompt, then the images before the text (Qwen style)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def open_images(paths: list[str]) -> list[Image.Image]:
    """Local image files as RGB (the processor expects 3 channels)."""
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int


@torch.inference_mode()
def generate(
    model, processor, messages: list[dict], images: list[Image.Image], params: SamplingParams
) -> Generation:
    """One response sampled with exactly `params` (greedy when its temperature is 0), stopping at the
    end of the turn (`params.n` and `params.stop` are not used: one response, no stop strings)."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt").to(model.device)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    tokenizer = processor.tokenizer
    eos = end_of_turn_ids(tokenizer, model.generation_config.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    output = model.generate(**inputs, generation_config=to_generation_config(params, eos, pad))
    prompt_len = inputs["input_ids"].shape[1]
    new_tokens = output[0, prompt_len:]
    completion_tokens = next((i + 1 for i, t in enumerate(new_tokens.tolist()) if t in eos), len(new_tokens))
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return Generation(text=text, prompt_tokens=prompt_len, completion_tokens=completion_tokens)
