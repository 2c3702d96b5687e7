"""The README's example request, reproducible: a test scene of a testbed model written as a PNG.

``vlmprune scene --out scene.png`` writes the first test-split scene whose question is
:data:`EXAMPLE_QUESTION` (or test sample ``--index N`` with its own question) at the canvas the
model sees, and prints the question and the expected answer, so the README's curl command and
``deploy/client.py`` run as pasted.
"""

from __future__ import annotations

from pathlib import Path

from vlmprune.testbed import scenes

EXAMPLE_QUESTION = "what colour is the circle ?"
"""The README's question (typed there as people type it: ``What color is the circle?``)."""
SEARCH_LIMIT = 1000
"""Test samples searched for :data:`EXAMPLE_QUESTION` (one in ~30 asks it)."""


def example_sample(scale: float = 1.0, index: int | None = None) -> scenes.Sample:
    """Test sample ``index``, or the first test sample asking :data:`EXAMPLE_QUESTION`."""
    if index is not None:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return scenes.sample("test", index, scale)
    for i in range(SEARCH_LIMIT):
        s = scenes.sample("test", i, scale)
        if s.question == EXAMPLE_QUESTION:
            return s
    raise ValueError(f"no test sample among the first {SEARCH_LIMIT} asks {EXAMPLE_QUESTION!r}")


def write_scene(model_dir: Path, out: Path, index: int | None = None) -> scenes.Sample:
    """Render the example scene for the model in ``model_dir`` (its canvas and scale) to ``out``."""
    from transformers import AutoConfig

    from vlmprune.testbed.registry import scene_layout

    size, scale = scene_layout(AutoConfig.from_pretrained(model_dir))
    sample = example_sample(scale, index)
    scenes.render(sample.scene, size).save(out)
    return sample
