"""Images in chat messages: find them, decode data URLs, check them with Pillow, measure them.

The gateway needs each image's pixel size to count its visual tokens before vLLM sees it, and it
rejects corrupt or non-image data with a 400 here rather than a late error from the engine.
Remote ``http(s)`` URLs are refused unless the settings allow them; then the gateway fetches the
image (:mod:`server.remote_images`), checks it the same way and forwards it as a data URL, so the
upstream never fetches anything. Sizes are measured as vLLM will see the image: after its EXIF
orientation (vLLM applies it), so a portrait photo stored sideways is counted upright.
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
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that rotate by 90 degrees: width and height swap once applied."""


@dataclass(frozen=True)
class DecodedImage:
    width: int
    height: int
    format: str
    data_url: str


def iter_image_parts(messages: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every ``{"type": "image_url", ...}`` content part, in message order (of a body that
    :class:`server.chat.protocol.ChatCompletionRequest` validated)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    yield part


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


def _image_error(message: str) -> GatewayError:
    return GatewayError(400, message, param="messages")


def check_image_bytes(raw: bytes, max_pixels: int) -> DecodedImage:
    """Open, fully decode and measure image bytes with Pillow (truncated files fail here)."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise _image_error("image data is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=sorted(ALLOWED_FORMATS)) as img:
                fmt = img.format or ""
                width, height = img.size
                if width * height > max_pixels:
                    raise _image_error(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                       f"{max_pixels}")
                if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                    width, height = height, width
                img.load()  # decode everything: catches truncated or corrupt data
    except GatewayError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise _image_error(f"image is over the pixel limit ({exc})") from None
    except UnidentifiedImageError:
        names = sorted(ALLOWED_FORMATS)
        raise _image_error(f"image data is not a {', '.join(names[:-1])} or {names[-1]} image, or it is corrupt") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _image_error(f"image data is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode()
    return DecodedImage(width=width, height=height, format=fmt, data_url=url)
