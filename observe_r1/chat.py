"""One chat turn with images through a loaded model and processor: prompt building and generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from observe_r1.format import SYSTEM_PROMPT


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
    model,
    processor,
    messages: list[dict],
    images: list[Image.Image],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Generation:
    """Sample one response (greedy when `temperature` is 0), stopping at the end of the turn."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt").to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    prompt_len = inputs["input_ids"].shape[1]
    new_tokens = output[0, prompt_len:]
    eos_ids = model.generation_config.eos_token_id
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or [])
    completion_tokens = next((i + 1 for i, t in enumerate(new_tokens.tolist()) if t in eos), len(new_tokens))
    text = processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
    return Generation(text=text, prompt_tokens=prompt_len, completion_tokens=completion_tokens)
