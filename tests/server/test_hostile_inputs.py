"""Hand-made hostile inputs against the real gateway in front of a real vLLM CPU engine (tiny
LLaVA, 36 visual tokens per image), one engine for the module.

Each input gets either a 4xx whose message names what is wrong in one sentence (no dump of
pydantic errors, no echo of megabytes), or a correct answer (prompt tokens = text + kept visual
tokens). After each batch the engine still answers a good request: nothing reached it that made it
fail for others. Wrong types at every level of the body are generated with hypothesis (bounded,
derandomised); the image cases are a table, their images made here with Pillow.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.chat.protocol import AppliedPolicy
from tests.server.conftest import image_data_url, image_message

pytestmark = pytest.mark.slow
N_VISUAL = 36
MAX_MESSAGE_CHARS = 400
"""A refusal is a sentence, not a dump of the input or of every validation error."""


def post(url: str, body=None, *, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=120,
                      headers={"content-type": "application/json", **(headers or {})})


def assert_refused(r: httpx.Response, status: int = 400, *words: str) -> str:
    """A 4xx in OpenAI's shape whose one-sentence message contains ``words``."""
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == status and error["type"] == "invalid_request_error", error
    message = error["message"]
    assert "\n" not in message and len(message) <= MAX_MESSAGE_CHARS, message
    for word in words:
        assert word in message, message
    return message


def assert_serves(url: str, model_id: str) -> None:
    """The engine answers a good image request with the right visual-token count."""
    r = post(url, {"model": model_id, "messages": image_message(), "max_tokens": 2},
             headers={"X-VLMPrune-Ratio": "0.5"})
    assert r.status_code == 200, r.text[:300]
    assert AppliedPolicy.parse(r.headers["x-vlmprune-applied"]).kept == 18


def png_url(img: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return data_url(buf.getvalue(), fmt)


def data_url(raw: bytes, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def gateway(engine_gateway):
    url, _, model_id = engine_gateway
    return url, model_id


# -- the body: malformed JSON, wrong types at every level -------------------------------------


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"model": "m", "messages": [', ["not valid JSON", "line 1"]),
    (b'{"model": "\xff"}', ["not UTF-8"]),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', ["NaN is not a JSON number"]),
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    (b'"just a string"', ["body: expected an object"]),
    (b"", ["not valid JSON"]),
], ids=["truncated", "not-utf8", "nan", "deep-nesting", "not-an-object", "empty"])
def test_malformed_json_is_one_sentence(gateway, raw, words):
    """Bodies that are not a JSON object get a 400 saying why."""
    assert_refused(post(gateway[0], content=raw), 400, *words)


def test_content_5_is_one_sentence_not_22_errors(gateway):
    """``"content": 5`` (22 pydantic errors at vLLM) is one sentence naming the field and the value."""
    url, model_id = gateway
    message = assert_refused(post(url, {"model": model_id, "messages": [{"role": "user", "content": 5}]}))
    assert message == "invalid request: messages[0].content: expected a string or a list, got the number 5"


@pytest.mark.parametrize(("part", "words"), [
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, ["content[0].type", "'input_audio'"]),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, ["'video_url'", "'image_url'"]),
    ({"text": "no type"}, ["content[0]: 'type' is required"]),
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, ["content[0].image_url: expected an object"]),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, ["neither a data URL nor http(s)"]),
], ids=["audio", "video", "no-type", "bare-url-string", "file-url"])
def test_unknown_content_parts_are_named(gateway, part, words):
    """Content parts the gateway does not serve are refused naming the part and what is accepted."""
    url, model_id = gateway
    assert_refused(post(url, {"model": model_id, "messages": [{"role": "user", "content": [part]}]}), 400, *words)


# Wrong values for every level of a valid body: each path below is replaced by a value of a wrong type.
_VALID = {"model": "m", "max_tokens": 2, "stream": False,
          "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                    {"type": "image_url", "image_url": {"url": "data:"}}]}]}
_PATHS = {
    ("messages",): ("a list", "list"),
    ("messages", 0): ("an object", "dict"),
    ("messages", 0, "content"): ("a string or a list", "str|list"),
    ("messages", 0, "content", 0): ("an object", "dict"),
    ("messages", 0, "content", 0, "text"): ("a string", "str"),
    ("messages", 0, "content", 1, "image_url"): ("an object", "dict"),
    ("messages", 0, "content", 1, "image_url", "url"): ("a string", "str"),
    ("model",): ("a string", "str|none"),
    ("max_tokens",): ("an integer", "int|none"),
    ("stream",): ("a boolean", "bool"),
}
_KINDS = {"str": str, "list": list, "dict": dict, "int": int, "bool": bool, "none": type(None)}
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _wrong_type(value, allowed: str) -> bool:
    kinds = tuple(_KINDS[k] for k in allowed.split("|"))
    if isinstance(value, bool):
        return bool not in kinds
    return not isinstance(value, kinds) or (int in kinds and isinstance(value, float))


def _path_name(path) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(sorted(_PATHS, key=str)), value=_json_values)
def test_wrong_type_at_any_level_names_the_path(gateway, path, value):
    """A wrong-typed value anywhere in the body: 400 naming that path and what it should be."""
    expected, allowed = _PATHS[path]
    if not _wrong_type(value, allowed):
        return
    body = json.loads(json.dumps(_VALID))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    message = assert_refused(post(gateway[0], body))
    assert f"{_path_name(path)}: expected {expected}" in message or f"{_path_name(path)}: input should" in message, (
        path, value, message)


def test_serving_after_body_batch(gateway):
    """After the malformed bodies above, the engine still answers."""
    assert_serves(*gateway)


# -- sizes: texts, header values, base64, image counts ---------------------------------------


def test_long_texts_and_header_values(gateway):
    """A text longer than the context is vLLM's readable 400; a 8 KB header value is a short 400."""
    url, model_id = gateway
    r = post(url, {"model": model_id, "messages": image_message("colour " * 20_000), "max_tokens": 2})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"], r.text[:300]
    for header in ("X-VLMPrune-Method", "X-VLMPrune-Policy", "X-VLMPrune-Ratio"):
        message = assert_refused(post(url, {"model": model_id, "messages": image_message(), "max_tokens": 2},
                                      headers={header: "x" * 8000}), 400, header)
        assert "8000 characters" in message
    assert_serves(url, model_id)


def test_image_counts(gateway):
    """0 images is a text answer (no visual tokens); 50 images is a 400 naming the limit."""
    url, model_id = gateway
    r = post(url, {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and AppliedPolicy.parse(r.headers["x-vlmprune-applied"]).visual_tokens == 0
    assert_refused(post(url, {"model": model_id, "messages": image_message(n_images=50)}), 400,
                   "50 images", "limit of 8")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 12_000) -> bytes:
    """A valid PNG of ~140 KB that decodes to side x side 8-bit gray pixels (144 MB for 12 000),
    past Pillow's own bomb threshold."""
    packer, row = zlib.compressobj(1), b"\x00" * (side + 1)
    rows = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _bytes_of(url: str) -> bytes:
    return base64.b64decode(url.partition(",")[2])


def _animated_gif() -> str:
    frames = [Image.new("P", (64, 48), i) for i in (10, 80, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return data_url(buf.getvalue(), "GIF")


def _exif_rotated() -> str:
    img = Image.new("RGB", (80, 40), (30, 200, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return png_url(img, "JPEG", exif=exif.tobytes())


REFUSED_IMAGES = {
    "not-base64": ("data:image/png;base64,***", ["not valid base64"]),
    "not-an-image": (data_url(b"hello, this is text"), ["is not a", "PNG"]),
    "truncated-png": (data_url(_bytes_of(image_data_url(64, 48))[:-40]), ["truncated or corrupt"]),
    "truncated-jpeg": (data_url(_bytes_of(image_data_url(64, 48, fmt="JPEG"))[:200], "JPEG"),
                       ["truncated or corrupt"]),
    "decompression-bomb": (data_url(decompression_bomb()), ["144000000 pixels", "limit"]),
    "over-pixel-limit": (png_url(Image.new("L", (5000, 4000))), ["5000x4000", "over the limit"]),
    "tiff": (png_url(Image.new("RGB", (8, 8)), "TIFF"), ["is not a"]),
    "empty": ("data:image/png;base64,", ["empty"]),
    "not-image-mime": ("data:text/plain;base64,aGk=", ["not an image"]),
}
ANSWERED_IMAGES = {
    "animated-gif": _animated_gif,
    "cmyk-jpeg": lambda: png_url(Image.new("CMYK", (64, 48), (0, 200, 200, 0)), "JPEG"),
    "16-bit-png": lambda: png_url(Image.new("I;16", (64, 48), 40000)),
    "palette-transparency": lambda: png_url(Image.new("P", (64, 48), 3), transparency=3),
    "1x1": lambda: png_url(Image.new("RGB", (1, 1), (255, 0, 0))),
    "4000x1": lambda: png_url(Image.new("RGB", (4000, 1), (0, 0, 255))),
    "1x4000": lambda: png_url(Image.new("RGB", (1, 4000), (0, 0, 255))),
    "exif-rotated": _exif_rotated,
}


@pytest.mark.parametrize("name", sorted(REFUSED_IMAGES))
def test_bad_images_refused_with_reason(gateway, name):
    """Corrupt, truncated, oversized or non-image data: a 400 saying which."""
    url, model_id = gateway
    image, words = REFUSED_IMAGES[name]
    assert_refused(post(url, {"model": model_id, "messages": image_message(url=image), "max_tokens": 2}), 400,
                   *words)


def test_huge_base64_is_413(gateway):
    """A 30 MB base64 image is refused while the body is read (413), before anything is decoded."""
    url, model_id = gateway
    big = "data:image/png;base64," + "A" * (30 * 1024 * 1024)
    assert_refused(post(url, {"model": model_id, "messages": image_message(url=big)}), 413, "over the limit")


@pytest.mark.parametrize("name", sorted(ANSWERED_IMAGES))
def test_unusual_images_answered_with_exact_counts(gateway, name):
    """Unusual but valid images are answered; the prompt holds exactly the kept visual tokens."""
    url, model_id = gateway
    text_only = post(url, {"model": model_id, "messages": image_message(url=png_url(Image.new("RGB", (8, 8)))),
                           "max_tokens": 1}, headers={"X-VLMPrune-Ratio": "0"}).json()["usage"]["prompt_tokens"]
    r = post(url, {"model": model_id, "messages": image_message(url=ANSWERED_IMAGES[name]()), "max_tokens": 2},
             headers={"X-VLMPrune-Ratio": "0.75"})
    assert r.status_code == 200, r.text[:300]
    applied = AppliedPolicy.parse(r.headers["x-vlmprune-applied"])
    assert (applied.visual_tokens, applied.kept) == (N_VISUAL, 9)
    assert r.json()["usage"]["prompt_tokens"] == text_only - N_VISUAL + 9


def test_exif_orientation_counted_as_displayed():
    """An EXIF-rotated 80x40 JPEG is measured 40x80, as vLLM (which applies EXIF) will see it."""
    from server.images import decode_data_url

    image = decode_data_url(_exif_rotated(), 4096 * 4096)
    assert (image.width, image.height) == (40, 80)


def test_serving_after_image_batch(gateway):
    """After every hostile image, the engine still answers."""
    assert_serves(*gateway)
