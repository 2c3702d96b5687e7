"""Images in chat messages: find them, decode data URLs, check them with Pillow, measure them.

The gateway needs each image's pixel size to count its visual tokens before vLLM sees it, and it
rejects corrupt or non-image data with a 400 here rather than a late error from the engine.
Remote ``http(s)`` URLs are refused unless the settings allow them; then the gateway fetches the
image (size-capped), checks it the same way and forwards it as a data URL, so the upstream never
fetches anything.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from server.errors import GatewayError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


@dataclass(frozen=True)
class DecodedImage:
    width: int
    height: int
    format: str
    data_url: str


def iter_image_parts(messages: Any) -> Iterator[dict[str, Any]]:
    """Every ``{"type": "image_url", ...}`` content part, in message order."""
    if not isinstance(messages, list):
        raise GatewayError(400, "'messages' must be a list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise GatewayError(400, f"messages[{i}] must be an object", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    yield part


def image_url_of(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise GatewayError(400, "image_url part without a url string", param="messages")
    return url


def decode_data_url(url: str, max_pixels: int) -> DecodedImage:
    """``data:image/<fmt>;base64,<payload>`` -> a verified image; 400 naming what is wrong."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise GatewayError(400, "image data URL is malformed (expected data:image/...;base64,...)", param="messages")
    if ";base64" not in header:
        raise GatewayError(400, "image data URL must be base64-encoded", param="messages")
    mime = header[5:].split(";")[0]
    if mime and not mime.startswith("image/"):
        raise GatewayError(400, f"data URL has media type {mime!r}, not an image", param="messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, "image data URL is not valid base64", param="messages") from None
    return check_image_bytes(raw, max_pixels)


def check_image_bytes(raw: bytes, max_pixels: int) -> DecodedImage:
    """Open, fully decode and measure image bytes with Pillow (truncated files fail here)."""
    from PIL import Image

    if not raw:
        raise GatewayError(400, "image data is empty", param="messages")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                fmt = img.format or ""
                width, height = img.size
                if width * height > max_pixels:
                    raise GatewayError(
                        400, f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                        param="messages",
                    )
                img.load()  # decode everything: catches truncated or corrupt data
    except GatewayError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise GatewayError(400, f"image data could not be decoded ({type(exc).__name__})", param="messages") from None
    if fmt not in ALLOWED_FORMATS:
        raise GatewayError(400, f"image format {fmt or 'unknown'!r} is not accepted", param="messages")
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode()
    return DecodedImage(width=width, height=height, format=fmt, data_url=url)


async def fetch_remote(url: str, client: Any, max_bytes: int, timeout_s: float, max_pixels: int) -> DecodedImage:
    """Download an http(s) image (streamed, capped at ``max_bytes``) and check it."""
    import httpx

    try:
        async with client.stream("GET", url, timeout=timeout_s, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise GatewayError(400, f"image URL answered HTTP {resp.status_code}", param="messages")
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise GatewayError(400, f"remote image is larger than {max_bytes} bytes", param="messages")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise GatewayError(400, f"image URL could not be fetched ({type(exc).__name__})", param="messages") from None
    return check_image_bytes(b"".join(chunks), max_pixels)
