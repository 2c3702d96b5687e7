"""A micro model of the demo's architecture (224 px, 256 visual tokens, hub layout), trained by the
real demo recipe code for a few steps in seconds. Its answers are near chance: tests that use it
check commands and plumbing; tests/testbed/test_demo.py checks the shipped weights."""

from __future__ import annotations

from pathlib import Path


def train_micro(out: Path) -> Path:
    from vlmprune.testbed import train as T

    cfg = T.DemoConfig(vit_steps=1, vit_batch=2, cache_scenes=4, steps=2, batch=2, val_samples=2)
    T.train_demo(out, cfg, threads=1, progress=False, log=lambda m: None)
    return out
