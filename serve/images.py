"""Turn a request's `image_url` into a checked RGB image: data URLs, http(s) URLs, and local files
only when the server allows them. Every failure is a `RequestError` naming the request parameter."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError

from observe_r1_serve.config import RequestError, ServerConfig


def _open(data: bytes, param: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns (and past 2x raises) on decompression bombs; our own pixel limit is the rule here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
            raise RequestError(f"not a readable image: {e}", param=param) from e
    if width * height > max_pixels:
        raise RequestError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
            param=param,
        )
    try:
        img.load()
    except (OSError, SyntaxError) as e:
        raise RequestError(f"truncated or corrupt image: {e}", param=param) from e
    return img.convert("RGB")


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


async def _download(url: str, param: str, config: ServerConfig) -> bytes:
    limit = config.max_body_bytes
    try:
        async with httpx.AsyncClient(timeout=config.image_fetch_timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise RequestError(
                        f"fetching the image returned HTTP {response.status_code}", param=param
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(f"image download exceeds {limit} bytes", param=param)
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise RequestError(f"cannot fetch the image: {e}", param=param) from e


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


async def load_image(url: str, param: str, config: ServerConfig) -> Image.Image:
    """The image behind `url`, as RGB, within the server's pixel limit."""
    if url.startswith("data:"):
        data = _from_data_url(url, param)
    elif url.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise RequestError("image URLs are disabled on this server; send a data: URL", param=param)
        data = await _download(url, param, config)
    elif url.startswith("file://") or url.startswith("/"):
        data = _from_local(url, param, config)
    else:
        raise RequestError(
            "image_url must be a data: URL, an http(s) URL, or (if allowed) a local path", param=param
        )
    return await asyncio.to_thread(_open, data, param, config.max_image_pixels)
