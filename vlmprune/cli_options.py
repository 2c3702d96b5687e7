"""Command-line values shared by ``vlmprune eval`` and ``vlmprune visualize`` (one parser, one message)."""

from __future__ import annotations

import json
from typing import Any


def set_options(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs -> policy fields; a value is JSON when it parses as JSON, else text."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def ratio_value(text: str) -> float:
    """``--ratio`` as a float (its range is checked by the policy, which names the field)."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--ratio: {text!r} is not a number") from None
