"""The README's example request, reproducible: a test scene of a testbed model written as a PNG.

``vlmprune scene --out scene.png`` writes the first test-split scene whose question is
:data:`EXAMPLE_QUESTION` (or test sample ``--index N`` with its own question) at the canvas the
model sees, and prints the question and the expected answer, so the README's curl command and
``deploy/client.py`` run as pasted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

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


def render_for(config: Any, sample_for_scale: Callable[[float], scenes.Sample],
               min_px: int = 0) -> tuple[scenes.Sample, Image.Image]:
    """A test sample drawn at the canvas and object scale a model with this transformers ``config``
    reads the testbed at (:func:`vlmprune.testbed.registry.scene_layout`; at least ``min_px``)."""
    from vlmprune.testbed.registry import scene_layout

    size, scale = scene_layout(config)
    sample = sample_for_scale(scale)
    return sample, scenes.render(sample.scene, max(size, min_px))


def write_scene(model_dir: Path, out: Path, index: int | None = None) -> scenes.Sample:
    """Render the example scene for the model in ``model_dir`` (its canvas and scale) to ``out``."""
    from transformers import AutoConfig

    sample, image = render_for(AutoConfig.from_pretrained(model_dir), lambda scale: example_sample(scale, index))
    image.save(out)
    return sample
