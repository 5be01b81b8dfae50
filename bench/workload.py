"""The benchmark's workload: one picture, one question, one streamed request body, the levels.

Every setup (our server, the peer, in-process `generate`) is measured on exactly this, so their numbers
compare.
"""

from __future__ import annotations

import base64
import io

from observe_r1.format import SYSTEM_PROMPT

QUESTION = "How many circles are in the image? Answer with a single number."
CONCURRENCY = (1, 8, 32)


def make_image(size: int):
    """A deterministic picture of a few circles and squares (compressible, like a real chart)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    step = size // 4
    for i in range(3):
        x = step // 2 + i * step
        draw.ellipse((x, step // 2, x + step // 2, step), fill=("red", "green", "blue")[i])
        draw.rectangle((x, 2 * step, x + step // 2, 2 * step + step // 2), fill="orange")
    return img


def png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(model: str, image_url: str | None, seed: int, max_tokens: int) -> dict:
    """One streamed request (text only when `image_url` is None). The system prompt is sent
    explicitly so every server (ours would add it itself, the peers would not) sees the same prompt
    as the in-process run; temperature 1 and top_p 1 are sent so that no server's defaults apply."""
    image = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [*image, {"type": "text", "text": QUESTION}]},
        ],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
