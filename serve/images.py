"""Turn a request's `image_url` into a checked RGB image: data URLs, http(s) URLs (fetched by
`observe_r1_serve.fetch`), and local files only when the server allows them. An image the model's
processor would refuse (`observe_r1_serve.image_rules`) or whose pixels have no 8-bit reading is
refused here, before either engine sees it. Every failure is a `RequestError` naming the request
parameter."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from observe_r1_serve.config import RequestError, ServerConfig
from observe_r1_serve.fetch import fetch_image
from observe_r1_serve.image_rules import ImageRules

# 32-bit integer and float pixels have no standard 8-bit reading: `convert("RGB")` clips them to
# 0-255, which turns most such images white or black.
_WIDE_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}


def _rgb(img: Image.Image) -> Image.Image:
    """`img` as RGB the way `observe-r1 chat` and training read images (`convert`, alpha dropped),
    except 16-bit greys: they keep their top byte, as Pillow reads 16-bit colour PNGs, where
    `convert` would clip them to white."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _open(data: bytes, param: str, max_pixels: int, rules: ImageRules) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns (and past 2x raises) on decompression bombs; our own pixel limit is the rule here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
        # Pillow's decoders raise many types on malformed input; whichever it is, the bytes are no image.
        except Exception as e:
            raise RequestError(f"not a readable image: {e}", param=param) from e
    if width * height > max_pixels:
        raise RequestError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
            param=param,
        )
    if problem := rules.size_problem(width, height):
        raise RequestError(problem, param=param)
    if img.mode in _WIDE_MODES:
        raise RequestError(
            f"image mode {img.mode} ({_WIDE_MODES[img.mode]} pixels) has no standard 8-bit reading; "
            "send 8- or 16-bit images",
            param=param,
        )
    try:
        img.load()
        return _rgb(img)
    except Exception as e:
        raise RequestError(f"truncated or corrupt image: {e}", param=param) from e


def _from_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise RequestError("malformed data URL: expected data:<type>;base64,<data>", param=param)
    if not header.endswith(";base64"):
        raise RequestError("data URLs must be base64-encoded (data:<type>;base64,...)", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"invalid base64 in data URL: {e}", param=param) from e


def _from_local(url: str, param: str, config: ServerConfig) -> bytes:
    if not config.allow_local_images:
        raise RequestError(
            "local image paths are disabled on this server (start it with --allow-local-images)", param=param
        )
    path = Path(url.removeprefix("file://"))
    try:
        return path.read_bytes()
    except OSError as e:
        raise RequestError(f"cannot read local image {path}: {e.strerror}", param=param) from e


async def load_image(url: str, param: str, config: ServerConfig, rules: ImageRules) -> Image.Image:
    """The image behind `url`, as RGB, within the server's pixel limit and the model's `rules`."""
    if url.startswith("data:"):
        data = _from_data_url(url, param)
    elif url.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise RequestError("image URLs are disabled on this server; send a data: URL", param=param)
        data = await fetch_image(url, param, config)
    elif url.startswith("file://") or url.startswith("/"):
        data = _from_local(url, param, config)
    else:
        raise RequestError(
            "image_url must be a data: URL, an http(s) URL, or (if allowed) a local path", param=param
        )
    return await asyncio.to_thread(_open, data, param, config.max_image_pixels, rules)
