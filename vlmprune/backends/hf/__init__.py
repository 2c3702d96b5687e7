"""The transformers reference backend: exact paper semantics with real token removal.

Only transformers-specific code lives here (adapters, the pipeline, the progressive LLM loop); what
it shares with the vLLM plugin (the image-tokens type, signal names, the policy -> reduction
mapping, stage plans) is :mod:`vlmprune.reduction`.

Public entry points are imported lazily (``from vlmprune.backends.hf import ReferenceBackend``), so
importing a submodule such as ``base`` never pulls in every adapter.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ReferenceBackend": "vlmprune.backends.hf.pipeline",
    "Request": "vlmprune.backends.hf.pipeline",
    "Prefill": "vlmprune.backends.hf.pipeline",
    "Generation": "vlmprune.backends.hf.pipeline",
    "Decoder": "vlmprune.backends.hf.pipeline",
    "adapter_for": "vlmprune.backends.hf.pipeline",
    "family_of": "vlmprune.backends.hf.pipeline",
    "apply_reductions": "vlmprune.backends.hf.pipeline",
    "ModelAdapter": "vlmprune.backends.hf.base",
    "Sequence": "vlmprune.backends.hf.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
