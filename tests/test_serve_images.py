"""Odd images against the real server: sweeps of sizes, aspect ratios and pixel modes, each answered
200 or 400 naming the image's part (never 500), and refused exactly where the model's own image
processor would refuse it (or, for modes, where the server's rule does). The pixel limit is tested
with the other limits in test_serve_robustness.py."""

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from observe_r1.modeling import load_processor

CHAT = "/v1/chat/completions"
PARAM = "messages[0].content[0].image_url.url"
# Around the patch (14) and patch x merge (28) sides, and past the tiny model's largest side (224),
# where images are scaled down; then the aspect-ratio bound at several scales.
SIDES = (1, 2, 13, 14, 27, 28, 29, 57, 225, 600)
RATIO_EDGES = [(s, 200 * s + d) for s in (1, 2, 28) for d in (0, 1)]
SIZES = sorted({(w, h) for w in SIDES for h in SIDES} | set(RATIO_EDGES) | {(h, w) for w, h in RATIO_EDGES})
# Every mode Pillow decodes, in a format that holds it (PNG where it can).
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I", "F")
# Pixels wider than 16 bits have no standard 8-bit reading (the server's rule).
WIDE_MODES = {"I", "F"}


def encoded(image: Image.Image) -> bytes:
    for fmt in ("PNG", "TIFF", "WEBP"):
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            continue
        return buf.getvalue()
    raise AssertionError(f"no format holds mode {image.mode}")


def pattern(mode: str, size: tuple[int, int]) -> Image.Image:
    """A non-uniform image in `mode` (a gradient through Pillow's own conversion)."""
    w, h = size
    grey = Image.fromarray((np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8))
    if mode == "P":
        image = grey.convert("RGB").convert("P")
        image.info["transparency"] = 0
        return image
    return grey.convert(mode) if mode != "I;16" else grey.convert("I").convert(mode)


def data_url(data: bytes) -> str:
    kind = Image.open(io.BytesIO(data)).format.lower()
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def body(data: bytes) -> dict:
    url = data_url(data)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1}


async def post_all(base_url: str, bodies: list[dict]) -> list[httpx.Response]:
    limit = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def post(b):
            async with limit:
                return await client.post(CHAT, json=b)

        return await asyncio.gather(*(post(b) for b in bodies))


def wrong_answers(cases, responses, expect_refused) -> list:
    """Cases whose answer is neither the expected 200 nor a 400 naming the image's part."""
    wrong = []
    for case, r in zip(cases, responses, strict=True):
        error = r.json().get("error") if r.status_code != 200 else None
        refused = r.status_code == 400 and error["param"] == PARAM and bool(error["message"])
        if (r.status_code, refused) not in ((200, False), (400, True)) or refused != expect_refused(case):
            wrong.append((case, r.status_code, error))
    return wrong


@pytest.fixture(scope="module")
def image_processor(tiny_model_dir):
    return load_processor(tiny_model_dir).image_processor


def processor_refuses(image_processor, image: Image.Image) -> bool:
    try:
        image_processor(images=[image.convert("RGB")], return_tensors="np")
    except (ValueError, RuntimeError):  # torch's reshape (torchvision processors) raises RuntimeError
        return True
    return False


def test_a_sweep_of_sizes_and_aspect_ratios_is_answered_200_or_400_as_the_processor_decides(
    server, image_processor
):
    images = {size: Image.new("RGB", size, (90, 140, 200)) for size in SIZES}
    responses = asyncio.run(post_all(server.base_url, [body(encoded(i)) for i in images.values()]))

    def expect_refused(size):
        return processor_refuses(image_processor, images[size])

    assert not wrong_answers(SIZES, responses, expect_refused)
    assert 0 < sum(r.status_code == 400 for r in responses) < len(SIZES)


def test_a_sweep_of_pixel_modes_is_answered_200_or_400_naming_the_mode(server, image_processor):
    cases = [(mode, size) for mode in MODES for size in ((40, 30), (3, 600), (2, 401))]
    data = [encoded(pattern(mode, size)) for mode, size in cases]
    assert {Image.open(io.BytesIO(d)).mode for d in data} == set(MODES)
    responses = asyncio.run(post_all(server.base_url, [body(d) for d in data]))

    def expect_refused(case):
        mode, size = case
        return mode in WIDE_MODES or processor_refuses(image_processor, Image.new("RGB", size))

    assert not wrong_answers(cases, responses, expect_refused)
    for (mode, size), r in zip(cases, responses, strict=True):
        if mode in WIDE_MODES and size == (40, 30):
            assert f"mode {mode}" in r.json()["error"]["message"]


def test_sixteen_bit_greys_keep_their_levels_and_transparency_drops_as_in_training(tmp_path):
    from observe_r1_serve.config import ServerConfig
    from observe_r1_serve.image_rules import ImageRules
    from observe_r1_serve.images import load_image

    rules = ImageRules(resize=True, factor=28)
    config = ServerConfig(model=tmp_path)
    deep = Image.fromarray(np.full((4, 4), 0x8000 + 0x7F, dtype=np.uint16))  # mode I;16
    assert deep.mode == "I;16"
    clear = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    for image, rgb in ((deep, (128, 128, 128)), (clear, (10, 200, 30))):
        loaded = asyncio.run(load_image(data_url(encoded(image)), PARAM, config, rules))
        assert loaded.mode == "RGB" and loaded.getpixel((1, 1)) == rgb
