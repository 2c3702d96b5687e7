"""Fixtures for the vLLM plugin tests (helpers: :mod:`engine_helpers`).

Every engine is a real vLLM 0.32 CPU engine with the vlmprune plugin loaded through its entry point
(as in production). One engine per test module (module-scoped); the stock engine without the plugin
runs in a subprocess (:mod:`vllm_stock_runner`), started in the background while the module's own
engine starts, so the two start-ups overlap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("vllm", reason="the vLLM plugin tests need vLLM (pip install -e .[cpu])")

# Re-exported for test modules that import the helpers from here (prefer ``engine_helpers``).
from engine_helpers import (  # noqa: E402,F401
    Engine,
    StockRun,
    assert_same_output,
    build_model,
    hf_request,
    spec,
)
from vllm_stock_runner import ENGINE_KWARGS, sampling_params, summarize, vllm_request  # noqa: E402,F401


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    """Measured numbers of a module, printed at its end (run pytest with -s to see them)."""
    numbers: dict[str, float] = {}
    yield numbers
    print("\n[vllm timings] " + ", ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
