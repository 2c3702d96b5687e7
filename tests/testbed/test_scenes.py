"""The synthetic VQA task: determinism, exact answers, splits, families (vlmprune/testbed/scenes.py)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from vlmprune.testbed import scenes
from vlmprune.testbed.scenes import Item, Scene

# A hand-built scene: three red shapes (two of them small), a big blue circle, one box with a 7.
SCENE = Scene(
    seed=123,
    background=120,
    items=(
        Item("circle", "red", "small", 0.15, 0.20),
        Item("square", "red", "big", 0.70, 0.25),
        Item("triangle", "red", "small", 0.40, 0.75),
        Item("circle", "blue", "big", 0.80, 0.75),
        Item("box", "green", "small", 0.20, 0.60, digit="7"),
    ),
)


def _find(scene: Scene, colour: str, kind: str) -> Item:
    (item,) = [s for s in scene.shapes if s.colour == colour and s.kind == kind]
    return item


def oracle(scene: Scene, question: str) -> str:
    """An independent answer, from the question text and the scene's items alone."""
    words = question.split()
    if m := re.fullmatch(r"how many (\w+) objects are there \?", question):
        return scenes.NUMBER_WORDS[sum(s.colour == m[1] for s in scene.shapes)]
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", question):
        return "yes" if any(s.colour == m[1] and s.kind == m[2] for s in scene.shapes) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+) \?", question):
        a, b = _find(scene, m[1], m[2]), _find(scene, m[4], m[5])
        if m[3].startswith("left"):
            return "left" if a.x < b.x else "right"
        return "above" if a.y < b.y else "below"
    if m := re.fullmatch(r"what digit is in the (\w+) box \?", question):
        (box,) = [b for b in scene.boxes if b.colour == m[1]]
        return box.digit
    if m := re.fullmatch(r"what colour is the (\w+) \?", question):
        (item,) = [s for s in scene.shapes if s.kind == m[1]]
        return item.colour
    if m := re.fullmatch(r"what shape is the (\w+) object \?", question):
        (item,) = [s for s in scene.shapes if s.colour == m[1]]
        return item.kind
    if m := re.fullmatch(r"what size is the (\w+) (\w+) \?", question):
        return _find(scene, m[1], m[2]).size
    raise AssertionError(f"unknown question form: {words}")


@pytest.mark.parametrize("family", scenes.FAMILIES)
def test_answers_on_constructed_scene(family):
    """Every question the generator asks about a hand-built scene has the oracle's answer."""
    for k in range(40):
        question, answer, _ = scenes.make_question(SCENE, family, random.Random(k))
        assert answer == oracle(SCENE, question), question


def test_count_equals_objects_of_that_colour():
    """'how many red objects' on the constructed scene is three; blue is one; an absent colour zero."""
    answers = {}
    for k in range(200):
        q, a, _ = scenes.make_question(SCENE, "count", random.Random(k))
        answers[q] = a
    assert answers["how many red objects are there ?"] == "three"
    assert answers["how many blue objects are there ?"] == "one"
    assert any(a == "zero" for a in answers.values())


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_generated_samples_match_oracle(split):
    """Random samples of every split: the stored answer is the oracle's and is in the answer set."""
    for i in range(60):
        s = scenes.sample(split, i)
        assert s.answer == oracle(s.scene, s.question), (split, i, s.question)
        assert s.answer in scenes.ANSWERS


def test_determinism():
    """Same split and index -> same scene, question and pixels; another index differs."""
    a, b = scenes.sample("test", 5), scenes.sample("test", 5)
    assert (a.scene, a.question, a.answer) == (b.scene, b.question, b.answer)
    assert scenes.render(a.scene).tobytes() == scenes.render(b.scene).tobytes()
    assert scenes.render(scenes.sample("test", 6).scene).tobytes() != scenes.render(a.scene).tobytes()


def test_render_colours_and_resolution():
    """Each shape's centre pixel has the shape's colour (noise is at most 12); any size renders."""
    for size in (224, 336):
        img = np.asarray(scenes.render(SCENE, size)).astype(int)
        assert img.shape == (size, size, 3)
        for it in SCENE.shapes:
            px = img[int(it.y * size), int(it.x * size)]
            assert np.abs(px - np.array(scenes.COLOURS[it.colour])).max() <= 12, (it, px)


def test_patch_labels_cover_objects():
    """Dense labels: the patch under each shape's centre carries its colour, kind and size."""
    labels = scenes.patch_labels(SCENE, 224, 14)
    colours = list(scenes.COLOURS)
    for it in SCENE.shapes:
        p = int(it.y * 16) * 16 + int(it.x * 16)
        assert labels["colour"][p] == colours.index(it.colour) + 1
        assert labels["kind"][p] == scenes.PATCH_KINDS.index(it.kind) + 1
        assert labels["size"][p] == scenes.SIZES.index(it.size) + 1
    assert (labels["digit"] == scenes.DIGITS.index("7") + 1).sum() >= 2
    assert (labels["colour"] == 0).sum() > 150  # mostly background


def test_splits_disjoint_and_heldout_never_in_train():
    """Seed ranges do not overlap; the held-out combination appears only in the heldout split."""
    bases = sorted(scenes.SPLITS.values())
    assert all(b - a >= scenes.SPLIT_SIZE for a, b in zip(bases, bases[1:]))
    seeds = {split: {scenes.sample(split, i).scene.seed for i in range(50)} for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"]) and not (seeds["val"] & seeds["test"])
    for split in ("train", "val", "test"):
        assert not any(scenes.sample(split, i).question == "what colour is the cross ?" for i in range(300))
    held = [scenes.sample("heldout", i) for i in range(20)]
    assert all(s.question == "what colour is the cross ?" for s in held)
    # Training questions never hold it either.
    rng = random.Random(0)
    for seed in range(200):
        for _, q, _ in scenes.training_questions(scenes.make_scene(seed), rng, 5):
            assert q != "what colour is the cross ?"


def test_families_present_and_balanced():
    """Every family appears in the first test samples, in equal shares."""
    families = [scenes.sample("test", i).family for i in range(50)]
    assert {f: families.count(f) for f in scenes.FAMILIES} == {f: 10 for f in scenes.FAMILIES}


def test_answers_are_not_trivial():
    """Per family, no single answer dominates the test split (chance stays well below 1)."""
    by_family: dict[str, list[str]] = {}
    for i in range(500):
        s = scenes.sample("test", i)
        by_family.setdefault(s.family, []).append(s.answer)
    for family, answers in by_family.items():
        assert scenes.majority_chance(answers) < 0.6, family


def test_vocabulary_covers_every_prompt():
    """Every word of every question and answer is in the task vocabulary (no <unk> ever)."""
    vocab = set(scenes.VOCAB_WORDS)
    for split in ("train", "test", "heldout"):
        for i in range(100):
            s = scenes.sample(split, i)
            assert set(s.question.split()) <= vocab and s.answer in vocab


def test_bad_split_and_index():
    with pytest.raises(ValueError, match="split"):
        scenes.sample("dev", 0)
    with pytest.raises(ValueError, match="index"):
        scenes.sample("test", -1)
