"""One readable sentence for a pydantic ``ValidationError`` on a request body.

Pydantic reports every branch of every union it tried (``"content": 5`` gives one error per
content-part model), with internal branch labels in the location. A client needs one sentence:
the deepest place where its body went wrong, written as a path (``messages[0].content``), what was
expected there and what was received. The path is rebuilt by walking the received body along the
error's location, so branch labels (which are not keys of the body) drop out on their own.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_EXPECTED = {
    "string_type": "a string",
    "list_type": "a list",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}
_SHOWN_CHARS = 60


def describe(value: Any) -> str:
    """What a client sent, in words, bounded in length (values may be megabytes)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + '...'}"
    if isinstance(value, str):
        return f"the string {shorten(value)}"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"an object with keys {shorten(', '.join(map(str, value)))}" if value else "an empty object"
    return type(value).__name__


def shorten(text: str, limit: int = _SHOWN_CHARS) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters with the full length noted."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def _path(body: Any, loc: tuple[Any, ...], missing: bool) -> tuple[str, Any]:
    """The location as the client wrote it, and the value found there."""
    path, node = "", body
    for i, key in enumerate(loc):
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            path, node = f"{path}[{key}]", node[key]
        elif isinstance(key, str) and isinstance(node, dict) and key in node:
            path, node = f"{path}.{key}" if path else key, node[key]
        elif missing and i == len(loc) - 1:
            return (f"{path}.{key}" if path else str(key)), None
    return path or "body", node


def summarize(exc: ValidationError, body: Any) -> tuple[str, str]:
    """``(sentence, param)`` for the deepest error; errors of union branches at that same place
    are merged into one "expected X or Y"."""
    found = []
    for err in exc.errors(include_url=False):
        path, value = _path(body, tuple(err["loc"]), err["type"] == "missing")
        found.append((path.count(".") + path.count("["), path, value, err))
    depth = max(f[0] for f in found)
    deepest = [f for f in found if f[0] == depth]
    _, path, value, first = deepest[0]
    kind = first["type"]
    if kind == "missing":
        return f"{path}: this field is required", path
    if kind == "extra_forbidden":
        return f"{path}: unknown field", path
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = first.get("ctx") or {}
        field = ctx.get("discriminator", "").strip("'") or "type"
        where = f"{path}.{field}" if path != "body" else field
        if kind == "union_tag_not_found":
            return f"{path}: {field!r} is required", where
        return (f"{where}: unknown {field} {shorten(str(ctx.get('tag', '')))}; expected one of "
                f"{ctx.get('expected_tags', '')}"), where
    expected = []
    for _, _, _, err in deepest:
        words = _EXPECTED.get(err["type"])
        if words is None:
            return f"{path}: {err['msg'][0].lower()}{err['msg'][1:]} (got {describe(value)})", path
        if words not in expected:
            expected.append(words)
    return f"{path}: expected {' or '.join(expected)}, got {describe(value)}", path
