"""Which visual tokens a policy keeps, drawn on the image: ``vlmprune visualize``.

Token counts (``vlmprune eval``) say how much a method prunes, not *what*: whether FasterVLM keeps
the asked-about object or the background clutter is only visible when the kept tokens are put back
where they came from. This module runs one image + question through the transformers reference
backend (so the choice is exactly the one evaluation and serving make), maps every kept visual
token back to the image region it encodes, and writes a PNG: kept patches at full brightness with a
thin outline, pruned ones darkened and greyed, a title line above the image.

Geometry (token -> image region), per model family:

- LLaVA-1.5 (``llava``): one square ViT grid, the [CLS] token dropped, so token ``i`` is patch
  ``(i // side, i % side)`` of the model input. The model input is the image after the processor's
  resize (shortest edge) and centre crop (and pad-to-square where the processor pads), so the grid
  covers a centred square of a non-square image; the rest of the image, never seen by the model,
  is drawn darkened.
- LLaVA-NeXT (``llava_next``): two panels side by side, each the whole image: the base
  (thumbnail) view's grid and the stitched, unpadded AnyRes crop grid, placed with the adapter's
  per-token ``coords`` (both views cover the whole image; exact up to the processor's rounding).
  ``image_newline`` tokens are not image content and never pruned: they are not drawn or counted.
- Qwen2-VL / Qwen2.5-VL: the merged (2x2) token grid in raster order over the whole image (the
  processor resizes without cropping).

In-LLM methods (``transprune``, ``aim``) prune further between decoder layers; what is drawn is
what survives to the last layer (the title says so). Merging methods (``aim``, ``pool``) show each
merged token at the patch it stands in for (its representative).

Shapes: ``n`` tokens of one image (the adapter's order), ``m`` tokens of one panel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmprune.methods import METHODS

DEFAULT_QUESTION = "what colour is the circle ?"
"""A question in the demo model's vocabulary (vlmprune.testbed.scenes); any text is accepted."""

OUTLINE = (255, 210, 0)
"""Outline of a kept patch: saturated yellow, which the dimmed (grey, dark) pruned area never is."""
DIM = 0.3
"""Brightness of a pruned patch relative to its greyed original: dark enough to read as removed,
bright enough to still show what was there."""
PANEL_GAP = 8
"""Pixels between panels (LLaVA-NeXT's two views)."""

SUPPORTED_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
MERGING = ("aim", "pool")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Panel:
    """One drawing of the whole image with (some of) its tokens placed on it."""

    name: str
    """A caption ("" when the model has one grid)."""
    tokens: np.ndarray
    """(m,) image-local token indices (the adapter's order) drawn in this panel."""
    boxes: np.ndarray
    """(m, 4) float ``x0, y0, x1, y1`` in the original image's pixels; may extend past its edges."""


@dataclass(frozen=True)
class TokenLayout:
    """Where every prunable visual token of one image lies in that image."""

    image_size: tuple[int, int]
    """(width, height) of the original image."""
    panels: tuple[Panel, ...]
    n_tokens: int
    """Tokens of the image (the adapter's order, non-prunable ones included)."""


# --- geometry (pure) ---------------------------------------------------------------------------


def grid_boxes(rows: int, cols: int, box: Box) -> np.ndarray:
    """(rows*cols, 4) boxes of a ``rows x cols`` grid laid over ``box``, in raster order."""
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    x0, y0, x1, y1 = box
    xs = np.linspace(x0, x1, cols + 1)
    ys = np.linspace(y0, y1, rows + 1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def model_input_box(image_size: tuple[int, int], image_processor: Any) -> Box:
    """The region of the original image that a LLaVA-1.5 processor turns into the model input.

    CLIP-style preprocessing: optional pad to a centred square, resize (shortest edge to S, or to
    an exact height x width), optional centre crop. The patch grid covers exactly this region, so
    drawing it on the original image (not on the model's 224 px input) keeps the user's picture
    while placing every patch correctly. Returned in original pixels; with padding the box extends
    past the image (the padding is drawn nowhere)."""
    width, height = image_size
    cx0, cy0, cw, ch = 0.0, 0.0, float(width), float(height)  # the canvas the resize sees
    if getattr(image_processor, "do_pad", False):
        side = float(max(width, height))
        cx0, cy0, cw, ch = (width - side) / 2, (height - side) / 2, side, side
    size = getattr(image_processor, "size", None)
    sx = sy = 1.0  # resized pixels per canvas pixel
    if getattr(image_processor, "do_resize", True) and size is not None:
        short = _size_field(size, "shortest_edge")
        if short is not None:
            sx = sy = short / min(cw, ch)
        elif _size_field(size, "height") is not None and _size_field(size, "width") is not None:
            sx, sy = _size_field(size, "width") / cw, _size_field(size, "height") / ch
    rw, rh = cw * sx, ch * sy
    bx0, by0, bx1, by1 = 0.0, 0.0, rw, rh
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        kw, kh = _size_field(crop, "width"), _size_field(crop, "height")
        if kw is not None and kh is not None:
            bx0, by0 = (rw - kw) / 2, (rh - kh) / 2
            bx1, by1 = bx0 + kw, by0 + kh
    return (cx0 + bx0 / sx, cy0 + by0 / sy, cx0 + bx1 / sx, cy0 + by1 / sy)


def token_layout(family: str, image: Any, image_size: tuple[int, int], image_processor: Any = None) -> TokenLayout:
    """The :class:`TokenLayout` of one image's tokens.

    ``image`` is a :class:`~vlmprune.reduction.image_tokens.ImageTokens`; ``family`` is the model type (``config.model_type``); ``image_processor`` is needed for
    LLaVA-1.5's resize/crop box. ValueError for a family whose geometry is not known here."""
    def array(name: str) -> np.ndarray | None:
        value = getattr(image, name, None)  # LLaVA-NeXT only
        return None if value is None else value.cpu().numpy()

    return layout_of(family, int(image.features.shape[0]), image.grid, image_size, image_processor,
                     view=array("view"), coords=array("coords"), view_shape=getattr(image, "view_shape", None))


def layout_of(family: str, n: int, grid: Any, image_size: tuple[int, int], image_processor: Any = None, *,
              view: Any = None, coords: Any = None, view_shape: Any = None) -> TokenLayout:
    """:func:`token_layout` from the geometry alone (the shape of an ``ImageTokens`` without its
    features), as the vLLM plugin's kept-token traces carry it (``vlmprune.trace``): ``n`` tokens,
    the ``grid``; LLaVA-NeXT also ``view`` (n,), ``coords`` (n, 2) and ``view_shape``."""
    width, height = image_size
    whole: Box = (0.0, 0.0, float(width), float(height))
    if family == "llava":
        rows, cols = grid
        if rows * cols != n:
            raise ValueError(f"LLaVA image has {n} tokens, not its {rows}x{cols} patch grid")
        box = model_input_box(image_size, image_processor) if image_processor is not None else whole
        panel = Panel("", np.arange(n), grid_boxes(rows, cols, box))
        return TokenLayout((width, height), (panel,), n)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rows, cols = grid
        if rows * cols != n:
            raise ValueError(f"Qwen image has {n} tokens, not its {rows}x{cols} merged grid")
        return TokenLayout((width, height), (Panel("", np.arange(n), grid_boxes(rows, cols, whole)),), n)
    if family == "llava_next":
        if view is None or coords is None or view_shape is None:
            raise ValueError("LLaVA-NeXT image lacks the adapter's per-token geometry (view, coords)")
        view = np.asarray(view)
        coords = np.asarray(coords).reshape(-1, 2)
        panels = []
        for v, label in ((0, "base view"), (1, "AnyRes crops")):
            rows, cols = (int(x) for x in view_shape[v])
            members = np.nonzero(view == v)[0]
            if members.size == 0 or rows < 1 or cols < 1:
                continue
            cells = grid_boxes(rows, cols, whole)
            r, c = coords[members, 0], coords[members, 1]
            if r.min() < 0 or c.min() < 0 or r.max() >= rows or c.max() >= cols:
                raise ValueError(f"LLaVA-NeXT view {v} coords fall outside its {rows}x{cols} grid")
            panels.append(Panel(f"{label} {rows}x{cols}", members, cells[r * cols + c]))
        return TokenLayout((width, height), tuple(panels), n)
    raise ValueError(
        f"visualize has no token geometry for model type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def kept_token_mask(n_tokens: int, kept: Any) -> np.ndarray:
    """(n,) bool, True at the kept token indices ``kept`` (image-local, any integer sequence).

    The one place indices are checked: a wrong index space (e.g. sequence rows instead of
    image-local tokens) fails loudly here instead of drawing a plausible but wrong picture."""
    idx = np.asarray(kept.cpu() if hasattr(kept, "cpu") else kept, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n_tokens):
        raise ValueError(f"kept indices must lie in [0, {n_tokens}), got {int(idx.min())}..{int(idx.max())}")
    mask = np.zeros(n_tokens, dtype=bool)
    mask[idx] = True
    return mask


def _pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Float box -> integer pixel box clipped to the image. Shared edges round identically, so
    neighbouring patches neither overlap nor leave gaps."""
    x0, y0, x1, y1 = (int(math.floor(v + 0.5)) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def dim(pixels: np.ndarray) -> np.ndarray:
    """How a pruned (or unseen) region is drawn: half-desaturated, then darkened to :data:`DIM`."""
    pixels = pixels.astype(np.float32)
    grey = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(DIM * (0.5 * pixels + 0.5 * grey[..., None]), 0, 255).astype(np.uint8)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(image: Image.Image, kept: np.ndarray, layout: TokenLayout, title: str = "") -> Image.Image:
    """The image with kept tokens' patches highlighted; a title band above it when ``title``.

    ``kept``: (n,) bool over the image's tokens (:func:`kept_token_mask`). Each panel is the
    image at its own size: everything dimmed (:func:`dim`), then every kept token's patch restored
    to the original pixels and outlined in :data:`OUTLINE` (1 px, inside the patch). Regions no
    token covers (outside a centre crop) stay dimmed. Panels sit side by side, :data:`PANEL_GAP`
    apart; the title (with panel captions) is wrapped to the canvas width in a white band on top,
    so no patch is hidden by text."""
    kept = np.asarray(kept, dtype=bool)
    if kept.shape != (layout.n_tokens,):
        raise ValueError(f"kept must be a ({layout.n_tokens},) mask, got shape {kept.shape}")
    rgb = image.convert("RGB")
    if rgb.size != layout.image_size:
        raise ValueError(f"image is {rgb.size[0]}x{rgb.size[1]}, the layout is for {layout.image_size}")
    width, height = rgb.size
    original = np.asarray(rgb)
    drawn = []
    for panel in layout.panels:
        canvas = dim(original)
        outlines = []
        for token, box in zip(panel.tokens, panel.boxes):
            if not kept[token]:
                continue
            x0, y0, x1, y1 = _pixel_box(box, width, height)
            if x1 > x0 and y1 > y0:
                canvas[y0:y1, x0:x1] = original[y0:y1, x0:x1]
                outlines.append((x0, y0, x1 - 1, y1 - 1))
        out = Image.fromarray(canvas)
        draw = ImageDraw.Draw(out)
        for rect in outlines:
            draw.rectangle(rect, outline=OUTLINE, width=1)
        drawn.append(out)

    total_w = sum(p.width for p in drawn) + PANEL_GAP * (len(drawn) - 1)
    lines: list[str] = []
    font = _font(12)
    if title:
        captions = [p.name for p in layout.panels if p.name]
        text = title + (f" (left to right: {', '.join(captions)})" if len(captions) > 1 else "")
        lines = _wrap(text, font, total_w - 8)
    line_h = 16
    band = len(lines) * line_h + (6 if lines else 0)
    canvas = Image.new("RGB", (total_w, band + height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * line_h), line, fill=(0, 0, 0), font=font)
    x = 0
    for p in drawn:
        canvas.paste(p, (x, band))
        x += p.width + PANEL_GAP
    return canvas


def _wrap(text: str, font: Any, max_width: int) -> list[str]:
    """Greedy word wrap by measured width (a small image is narrower than the title)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > max_width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def title_for(method: str, ratio: float, kept: int, total: int, last_stage: bool) -> str:
    """The title line: ``method M, ratio R: kept K of N tokens`` (+ where K is counted)."""
    where = " (surviving to the last LLM layer)" if last_stage else ""
    return f"method {method}, ratio {ratio:g}: kept {kept} of {total} tokens{where}"


# --- the backend run ---------------------------------------------------------------------------


def visualize(engine: Any, image: Image.Image, policy: Any, question: str = DEFAULT_QUESTION,
              max_new_tokens: int = 4) -> tuple[Image.Image, dict[str, Any]]:
    """Prefill ``image`` + ``question`` under ``policy`` on a ``ReferenceBackend``; return the
    overlay and the result dict (``method, ratio, visual_tokens, kept_tokens, kept_indices, ...``).

    ``kept_indices`` are image-local token indices of the kept *prunable* tokens, ascending (for
    LLaVA-1.5 and Qwen the raster index of the patch; LLaVA-NeXT the adapter's packed order). For
    in-LLM methods they are the tokens that reach the last decoder layer. ``answer`` is the
    model's greedy answer under the same pruning (is the answer still right with these tokens?)."""
    from vlmprune.backends.hf.pipeline import Request

    family = engine.family
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"visualize has no token geometry for model type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    rgb = image.convert("RGB")
    pre = engine.prefill([Request(question, [rgb])], policy)[0]
    if pre.images is None or pre.final_kept_index is None:
        raise ValueError(
            "this backend does not report which tokens it kept (Prefill.final_kept_index); "
            "visualize needs the transformers reference backend (vlmprune.backends.hf)"
        )
    if len(pre.images) != 1:
        raise ValueError(f"expected one image in the request, the backend saw {len(pre.images)}")
    tokens = pre.images[0]
    image_processor = getattr(engine.processor, "image_processor", None)
    layout = token_layout(family, tokens, rgb.size, image_processor)
    prunable = tokens.prunable.bool().cpu().numpy()
    kept = kept_token_mask(tokens.n_tokens, pre.final_kept_index[0]) & prunable
    last_stage = METHODS[policy.method].stage == "in_llm"
    kept_indices = np.nonzero(kept)[0].tolist()
    title = title_for(policy.method, policy.ratio, len(kept_indices), int(prunable.sum()), last_stage)
    overlay = render_overlay(rgb, kept, layout, title)

    answer_ids = engine.greedy_tokens(pre, max_new_tokens)
    answer = engine.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()

    result = {
        "method": policy.method,
        "ratio": policy.ratio,
        "visual_tokens": int(prunable.sum()),
        "kept_tokens": len(kept_indices),
        "kept_indices": kept_indices,
        "input_kept_tokens": int(pre.kept_tokens),
        "stage": "last_layer" if last_stage else "llm_input",
        "question": question,
        "answer": answer,
        "title": title,
    }
    return overlay, result


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path``, fully decoded, RGB; ValueError naming the file when it is missing or
    not a readable image (Pillow only reads lazily, so a truncated file would otherwise fail later)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"IMAGE: no such file: {str(p)!r}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"IMAGE: cannot read {str(p)!r} as an image ({exc})") from None


def run_cli(args: Any) -> int:
    """``vlmprune visualize``: cheap checks first (ratio, policy, image, model folder), then the
    model; writes the PNG and prints one JSON line on stdout. ValueError -> exit 2 (cli.py)."""
    from vlmprune.policy import parse_policy
    from vlmprune.testbed.registry import resolve_model

    from vlmprune.cli_options import ratio_value, set_options

    options = set_options(args.set)
    ratio = ratio_value(args.ratio)
    policy = parse_policy({**options, "method": args.method, "ratio": ratio})  # names a bad field
    image = load_image(args.image)
    path = resolve_model(args.model)
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise ValueError(f"-o: {str(out)!r} is a directory; give a file name such as out.png")

    from vlmprune.backends.hf import ReferenceBackend

    engine = ReferenceBackend.from_pretrained(path)
    overlay, result = visualize(engine, image, policy, args.question)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Title", result["title"])
        overlay.save(out, format="PNG", pnginfo=info)
    except OSError as exc:
        raise ValueError(f"-o: cannot write {str(out)!r} ({exc})") from None
    print(json.dumps({"out": str(out), **result, "model": str(args.model)}))
    return 0
