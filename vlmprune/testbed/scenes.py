"""A synthetic VQA task with exact answers and question-dependent relevance (Pillow, seeded).

A scene holds 3-6 coloured, dark-outlined shapes (unique colour+shape pairs; small ones cover ~2
ViT patches at 224 px) and 1-2 glyph boxes (a white box with a coloured border and a black 5x7 bitmap digit) over a
textured grey background with clutter lines and noise. Geometry is in normalised [0, 1] units, so
the same scene renders at any resolution (``render(scene, size)``).

``scale`` shrinks every object (and the clutter) by that factor: the LLaVA-NeXT-style ``demo-next``
sees scenes drawn at ``scale=0.5`` on a 448 px canvas, so that in each 224 px AnyRes crop an object
looks exactly as a ``demo`` object does at 224 px (the ViT's training distribution), while in the
224 px thumbnail it is half that size and its small details (digits) are unreadable. Such scenes
keep every object off the crop seams (:func:`make_scene`).

Question families (answers are single words, so accuracy = exact match of the greedy answer):

- ``attribute``: "what colour is the {shape} ?", "what shape is the {colour} object ?",
  "what size is the {colour} {shape} ?"
- ``count``: "how many {colour} objects are there ?" (shapes only; boxes are not objects)
- ``presence``: "is there a {colour} {shape} ?" (negatives reuse a colour and a shape that are in
  the scene, so the answer depends on binding, not on a colour alone)
- ``position``: "is the {c} {s} left or right of the {c} {s} ?" / "... above or below the ..."
- ``glyph``: "what digit is in the {colour} box ?"

The asked-about object is drawn uniformly, so it is often a small one beside bigger, more salient
objects. Splits are seed ranges (:data:`SPLITS`); the ``heldout`` split holds the one family/object
combination never asked in train/val/test: the colour of the cross.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "big")
DIGITS = tuple("0123456789")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
FAMILIES = ("attribute", "count", "presence", "position", "glyph")

# Radius (half extent) of each size class, in units of the image side.
RADIUS = {"small": 0.045, "big": 0.085}
BOX_HALF = (0.06, 0.075)  # glyph box half width, half height

# 5x7 bitmaps, so digits render identically everywhere (no font files involved).
_DIGIT_BITMAPS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}

# Split name -> first seed; a split's sample i uses seed base + i (ranges never overlap).
SPLITS: dict[str, int] = {"train": 0, "val": 10_000_000, "test": 20_000_000, "heldout": 30_000_000}
SPLIT_SIZE = 10_000_000
RETRY_OFFSET = 100_000_000  # re-drawn scenes use seeds above every split range

QUESTION_WORDS = (
    "what colour shape size is the object objects how many are there a left right above below or of "
    "digit in box ?"
).split()
ANSWERS = (
    tuple(COLOURS) + SHAPES + SIZES + NUMBER_WORDS + ("yes", "no", "left", "right", "above", "below") + DIGITS
)
VOCAB_WORDS: tuple[str, ...] = tuple(dict.fromkeys(QUESTION_WORDS + list(ANSWERS) + ["USER", "ASSISTANT", ":"]))
"""Every word a prompt or an answer can hold (the word-level tokenizer's vocabulary)."""

# Per-patch label classes of the ViT's dense auxiliary objective (0 = background).
PATCH_KINDS = SHAPES + ("box",)


@dataclass(frozen=True)
class Item:
    """One object (a shape, or a glyph box when ``kind == 'box'``); centre and radius in [0, 1]."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    digit: str | None = None
    scale: float = 1.0

    @property
    def half(self) -> tuple[float, float]:
        hx, hy = BOX_HALF if self.kind == "box" else (RADIUS[self.size], RADIUS[self.size])
        return hx * self.scale, hy * self.scale


@dataclass(frozen=True)
class Scene:
    seed: int
    background: int
    items: tuple[Item, ...]
    scale: float = 1.0

    @property
    def shapes(self) -> tuple[Item, ...]:
        return tuple(it for it in self.items if it.kind != "box")

    @property
    def boxes(self) -> tuple[Item, ...]:
        return tuple(it for it in self.items if it.kind == "box")


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    scene: Scene
    family: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)


# --- scenes -----------------------------------------------------------------------------------------


def make_scene(seed: int, scale: float = 1.0) -> Scene:
    """A random scene: 3-6 shapes with unique (colour, shape) pairs from 2-4 colours, 1-2 boxes.

    With ``scale < 1`` objects are ``scale`` times smaller and none crosses a seam of the
    ``1/scale x 1/scale`` crop grid (so each object is whole in one AnyRes crop)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    rng = random.Random(seed)
    seams = [k * scale for k in range(1, round(1 / scale))]
    palette = rng.sample(list(COLOURS), rng.randint(2, 4))
    n_shapes = rng.randint(3, 6)
    pairs = [(c, s) for c in palette for s in SHAPES]
    rng.shuffle(pairs)
    chosen = pairs[:n_shapes]
    n_boxes = rng.randint(1, 2)
    box_colours = rng.sample(list(COLOURS), n_boxes)
    box_digits = rng.sample(DIGITS, n_boxes)

    specs = [(s, c, rng.choice(SIZES), None) for c, s in chosen]
    specs += [("box", c, "small", d) for c, d in zip(box_colours, box_digits)]
    # Place big things first (they are hardest to fit), without overlaps.
    order = sorted(range(len(specs)), key=lambda i: -max(_half_of(specs[i])))
    placed: dict[int, Item] = {}
    border, gap = 0.02 * scale, 0.015 * scale
    for i in order:
        kind, colour, size, digit = specs[i]
        hx, hy = (h * scale for h in _half_of(specs[i]))
        for _ in range(200):
            x = rng.uniform(hx + border, 1 - hx - border)
            y = rng.uniform(hy + border, 1 - hy - border)
            if all(
                abs(x - o.x) > hx + o.half[0] + gap or abs(y - o.y) > hy + o.half[1] + gap
                for o in placed.values()
            ) and all(abs(x - c) > hx + border and abs(y - c) > hy + border for c in seams):
                break
        else:  # extremely crowded: retry the whole scene with a derived seed
            return make_scene(seed + RETRY_OFFSET, scale)
        placed[i] = Item(kind, colour, size, round(x, 4), round(y, 4), digit, scale)
    background = rng.randint(85, 165)
    return Scene(seed=seed, background=background, items=tuple(placed[i] for i in range(len(specs))), scale=scale)


def _half_of(spec) -> tuple[float, float]:
    kind, _, size, _ = spec
    return BOX_HALF if kind == "box" else (RADIUS[size], RADIUS[size])


def render(scene: Scene, size: int = 224) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` px (deterministic for a seed and size)."""
    rng = random.Random(scene.seed ^ 0x5EED)
    g = scene.background
    image = Image.new("RGB", (size, size), (g, g, g))
    draw = ImageDraw.Draw(image)
    # 1. Clutter: grey blotches and lines (colourless, so they never look like an object); at the
    #    same density and (scaled) size as in a scale-1 scene.
    unit = size * scene.scale
    per_area = round(1 / scene.scale**2)
    for _ in range(rng.randint(4, 9) * per_area):
        cx, cy, r = rng.random() * size, rng.random() * size, (0.03 + 0.1 * rng.random()) * unit
        v = max(0, min(255, g + rng.randint(-35, 35)))
        draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r], fill=(v, v, v))
    for _ in range(rng.randint(8, 20) * round(1 / scene.scale)):  # lines span the canvas: length ~ 1/scale
        v = max(0, min(255, g + rng.randint(-60, 60)))
        pts = [(rng.random() * size, rng.random() * size) for _ in range(2)]
        draw.line(pts, fill=(v, v, v), width=max(1, round(rng.uniform(0.004, 0.012) * unit)))
    # 2. Objects.
    for item in scene.items:
        _draw_item(draw, item, size, fill=COLOURS[item.colour])
    # 3. Pixel noise.
    arr = np.asarray(image, dtype=np.int16)
    noise = np.random.default_rng(scene.seed & 0xFFFFFFFF).integers(-12, 13, size=arr.shape[:2])
    arr = np.clip(arr + noise[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


OUTLINE = (20, 20, 20)
"""Shapes carry a dark outline. A ViT's patch embedding is linear in RGB, so a filled silhouette's
pattern is entangled with its colour (red and blue circle edges are different vectors) and this
small ViT never learnt shapes from fills alone (per-object shape accuracy stayed ~55 % in 1500
pretraining steps while the black-on-white digits reached 98 %); an outline is the same pattern in
every colour, as glyph strokes are."""


def _cross_outline(cx: float, cy: float, hx: float, hy: float, t: float) -> list[tuple[float, float]]:
    """The 12 corners of a plus sign (half extents hx, hy, bar half thickness t), clockwise."""
    return [(cx - t, cy - hy), (cx + t, cy - hy), (cx + t, cy - t), (cx + hx, cy - t), (cx + hx, cy + t),
            (cx + t, cy + t), (cx + t, cy + hy), (cx - t, cy + hy), (cx - t, cy + t), (cx - hx, cy + t),
            (cx - hx, cy - t), (cx - t, cy - t)]


def _draw_item(draw: ImageDraw.ImageDraw, item: Item, size: int, fill, mask_value: int | None = None) -> None:
    """Draw one item; with ``mask_value`` every pixel it covers gets that value (label maps)."""
    cx, cy = item.x * size, item.y * size
    hx, hy = item.half[0] * size, item.half[1] * size
    col = fill if mask_value is None else mask_value
    unit = size * item.scale  # outline and border widths shrink with the object
    line = {} if mask_value is not None else {"outline": OUTLINE, "width": max(1, round(0.009 * unit))}
    if item.kind == "circle":
        draw.ellipse([cx - hx, cy - hy, cx + hx, cy + hy], fill=col, **line)
    elif item.kind == "square":
        s = 0.85  # a square of the same area-ish as the circle
        draw.rectangle([cx - hx * s, cy - hy * s, cx + hx * s, cy + hy * s], fill=col, **line)
    elif item.kind == "triangle":
        draw.polygon([(cx, cy - hy), (cx + hx, cy + hy * 0.8), (cx - hx, cy + hy * 0.8)], fill=col, **line)
    elif item.kind == "cross":
        draw.polygon(_cross_outline(cx, cy, hx, hy, hx * 0.36), fill=col, **line)
    elif item.kind == "box":
        if mask_value is not None:
            draw.rectangle([cx - hx, cy - hy, cx + hx, cy + hy], fill=col)
            return
        border = max(2, round(0.012 * unit))
        draw.rectangle([cx - hx, cy - hy, cx + hx, cy + hy], fill=fill)
        draw.rectangle([cx - hx + border, cy - hy + border, cx + hx - border, cy + hy - border], fill=(245, 245, 245))
        bitmap = _DIGIT_BITMAPS[item.digit]
        cell = min((2 * hx - 2 * border) * 0.8 / 5, (2 * hy - 2 * border) * 0.8 / 7)
        x0, y0 = cx - 2.5 * cell, cy - 3.5 * cell
        for r, row in enumerate(bitmap):
            for c, bit in enumerate(row):
                if bit == "1":
                    draw.rectangle(
                        [x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1], fill=(15, 15, 15)
                    )
    else:
        raise ValueError(f"unknown item kind {item.kind!r}")


def patch_owner(scene: Scene, size: int, patch: int) -> np.ndarray:
    """(P,) index + 1 of the item covering the most of each patch (if >= 20 % of it), raster order;
    0 = background."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for i, item in enumerate(scene.items):
        _draw_item(draw, item, size, fill=None, mask_value=i + 1)
    side = size // patch
    m = np.asarray(mask)[: side * patch, : side * patch].reshape(side, patch, side, patch)
    m = m.transpose(0, 2, 1, 3).reshape(side * side, patch * patch)  # (P, patch*patch)
    counts = np.stack([(m == i + 1).sum(1) for i in range(len(scene.items))], 1)  # (P, items)
    covered = counts.max(1) >= 0.2 * patch * patch
    return np.where(covered, counts.argmax(1) + 1, 0)


def item_patches(scene: Scene, owner: np.ndarray, items) -> np.ndarray:
    """(P,) bool: the patches an owner map (:func:`patch_owner`) gives to one of ``items`` (what a
    question is about)."""
    return np.isin(owner, [scene.items.index(it) + 1 for it in items])


def patch_labels(scene: Scene, size: int, patch: int) -> dict[str, np.ndarray]:
    """Per-patch labels on the (size/patch)^2 grid, raster order, of the item :func:`patch_owner`
    gives the patch: colour (1..6), kind (1..5), digit (1..10), size (1..2) and, for a shape, the
    number of shapes of its colour in the scene (1..6, as ``count``); 0 = none. Every patch also
    gets its own grid row and column + 1 (``row``, ``col``, 1..side)."""
    owner = patch_owner(scene, size, patch)
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    out = {k: np.zeros(owner.shape[0], dtype=np.int64) for k in ("colour", "kind", "digit", "size", "count")}
    for p in np.nonzero(owner)[0]:
        item = scene.items[owner[p] - 1]
        out["colour"][p] = colour_ids[item.colour]
        out["kind"][p] = PATCH_KINDS.index(item.kind) + 1
        out["digit"][p] = DIGITS.index(item.digit) + 1 if item.digit is not None else 0
        out["size"][p] = SIZES.index(item.size) + 1 if item.kind != "box" else 0
        out["count"][p] = sum(s.colour == item.colour for s in scene.shapes) if item.kind != "box" else 0
    side = size // patch
    out["row"] = np.arange(side * side, dtype=np.int64) // side + 1
    out["col"] = np.arange(side * side, dtype=np.int64) % side + 1
    return out


def scene_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Scene-level [CLS] targets: (colour, shape) presence (24), box digit presence (10),
    box colour presence (6) as one multi-hot (40,), and the shape count per colour (6,) in 0..4+."""
    colours = list(COLOURS)
    multi = np.zeros(len(colours) * len(SHAPES) + len(DIGITS) + len(colours), dtype=np.float32)
    counts = np.zeros(len(colours), dtype=np.int64)
    for it in scene.shapes:
        multi[colours.index(it.colour) * len(SHAPES) + SHAPES.index(it.kind)] = 1
        counts[colours.index(it.colour)] += 1
    base = len(colours) * len(SHAPES)
    for it in scene.boxes:
        multi[base + DIGITS.index(it.digit)] = 1
        multi[base + len(DIGITS) + colours.index(it.colour)] = 1
    return {"multi": multi, "counts": np.minimum(counts, 4)}


# --- questions --------------------------------------------------------------------------------------


def is_heldout(family: str, meta: dict) -> bool:
    """The one combination never asked in train/val/test: the colour of the cross."""
    return family == "attribute" and meta.get("template") == "colour_of_shape" and meta.get("shape") == "cross"


def make_question(scene: Scene, family: str, rng: random.Random) -> tuple[str, str, dict]:
    """(question, answer, meta) of one family about ``scene``; meta names the asked items."""
    shapes = scene.shapes
    if family == "attribute":
        target = rng.choice(shapes)
        options = ["size"]
        if sum(s.kind == target.kind for s in shapes) == 1:
            options.append("colour_of_shape")
        if sum(s.colour == target.colour for s in shapes) == 1:
            options.append("shape_of_colour")
        template = rng.choice(options)
        meta = {"template": template, "shape": target.kind, "colour": target.colour, "targets": [target]}
        if template == "colour_of_shape":
            return f"what colour is the {target.kind} ?", target.colour, meta
        if template == "shape_of_colour":
            return f"what shape is the {target.colour} object ?", target.kind, meta
        return f"what size is the {target.colour} {target.kind} ?", target.size, meta
    if family == "count":
        present = sorted({s.colour for s in shapes})
        # Mostly colours in the scene (counts 1..4), sometimes an absent one (zero).
        colour = rng.choice(present) if rng.random() < 0.85 else rng.choice(list(COLOURS))
        targets = [s for s in shapes if s.colour == colour]
        return f"how many {colour} objects are there ?", NUMBER_WORDS[len(targets)], {"colour": colour, "targets": targets}
    if family == "presence":
        if rng.random() < 0.5:
            t = rng.choice(shapes)
            return f"is there a {t.colour} {t.kind} ?", "yes", {"targets": [t]}
        have = {(s.colour, s.kind) for s in shapes}
        colours = sorted({s.colour for s in shapes})
        kinds = sorted({s.kind for s in shapes})
        hard = [(c, k) for c in colours for k in kinds if (c, k) not in have]
        pool = hard if hard and rng.random() < 0.8 else [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in have]
        c, k = rng.choice(pool)
        return f"is there a {c} {k} ?", "no", {"targets": []}
    if family == "position":
        for _ in range(100):
            a, b = rng.sample(shapes, 2)
            axis = rng.choice(("x", "y"))
            delta = (a.x - b.x) if axis == "x" else (a.y - b.y)
            if abs(delta) >= 0.08:
                break
        else:
            axis, (a, b) = "x", max(
                ((p, q) for p in shapes for q in shapes if p is not q), key=lambda pq: abs(pq[0].x - pq[1].x)
            )
            delta = a.x - b.x
        if axis == "x":
            answer = "left" if delta < 0 else "right"
            return f"is the {a.colour} {a.kind} left or right of the {b.colour} {b.kind} ?", answer, {"targets": [a, b]}
        answer = "above" if delta < 0 else "below"
        return f"is the {a.colour} {a.kind} above or below the {b.colour} {b.kind} ?", answer, {"targets": [a, b]}
    if family == "glyph":
        box = rng.choice(scene.boxes)
        return f"what digit is in the {box.colour} box ?", box.digit, {"targets": [box]}
    raise ValueError(f"unknown question family {family!r}; known: {', '.join(FAMILIES)}")


def question_for(scene: Scene, family: str, rng: random.Random, heldout: bool = False) -> tuple[str, str, dict]:
    """A question of ``family`` that is (``heldout=True``) or is not the held-out combination."""
    for _ in range(200):
        q, a, meta = make_question(scene, family, rng)
        if is_heldout(family, meta) == heldout:
            return q, a, meta
    raise ValueError(f"scene {scene.seed}: no {'held-out' if heldout else 'regular'} {family} question")


def sample(split: str, index: int, scale: float = 1.0) -> Sample:
    """Sample ``index`` of ``split``: scene seed ``SPLITS[split] + index``, families in rotation;
    ``scale``: see :func:`make_scene` (the same questions are drawn whatever the scale).

    The ``heldout`` split holds only held-out questions (scenes are redrawn until one has a cross
    whose shape is unique in the scene)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    seed = SPLITS[split] + index
    rng = random.Random(seed * 2 + 1)
    if split == "heldout":
        attempt = 0
        while True:
            scene = make_scene(seed if attempt == 0 else RETRY_OFFSET + seed * 64 + attempt, scale)
            if sum(s.kind == "cross" for s in scene.shapes) == 1:
                break
            attempt += 1
        q, a, meta = question_for(scene, "attribute", _HeldoutRng(rng), heldout=True)
        return Sample(split, index, scene, "attribute", q, a, meta)
    scene = make_scene(seed, scale)
    family = FAMILIES[index % len(FAMILIES)]
    q, a, meta = question_for(scene, family, rng)
    return Sample(split, index, scene, family, q, a, meta)


class _HeldoutRng(random.Random):
    """Steers the attribute question to the unique cross and its colour template."""

    def __init__(self, base: random.Random) -> None:
        super().__init__(base.random())

    def choice(self, seq):
        items = list(seq)
        if items and isinstance(items[0], Item):
            crosses = [i for i in items if i.kind == "cross"]
            return crosses[0] if crosses else super().choice(items)
        if "colour_of_shape" in items:
            return "colour_of_shape"
        return super().choice(items)


def training_questions(scene: Scene, rng: random.Random, per_scene: int) -> list[tuple[str, str, str]]:
    """``per_scene`` (family, question, answer) triples for training: families in rotation from a
    random start, never the held-out combination."""
    start = rng.randrange(len(FAMILIES))
    out = []
    for k in range(per_scene):
        family = FAMILIES[(start + k) % len(FAMILIES)]
        q, a, _ = question_for(scene, family, rng)
        out.append((family, q, a))
    return out


def majority_chance(answers: list[str]) -> float:
    """Accuracy of always giving the most frequent answer (the chance level of a family)."""
    if not answers:
        return 0.0
    values, counts = np.unique(np.asarray(answers), return_counts=True)
    return float(counts.max() / len(answers))


def render_layout(view_size: int, grid_pinpoints=None) -> tuple[int, float]:
    """(canvas px, object scale) at which a model sees the testbed: a plain ViT model the scale-1
    scenes at its own resolution; an AnyRes model (``grid_pinpoints``) the largest square its grid
    tiles, with objects shrunk so that a crop of ``view_size`` px looks like a scale-1 scene."""
    if not grid_pinpoints:
        return int(view_size), 1.0
    canvas = max(min(int(h), int(w)) for h, w in grid_pinpoints)
    return canvas, view_size / canvas
