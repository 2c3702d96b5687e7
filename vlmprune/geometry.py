"""Visual tokens per image, from the served model's config files alone (no transformers, no torch).

The gateway must report "visual tokens in / kept" and count FLOPs *before* the request reaches vLLM,
and vLLM's processor must emit exactly ``kept`` placeholders; both use :func:`image_tokens` plus
the image's plan (:func:`vlmprune.reduction.plan.plan_image`), so the two sides agree by construction. The formulas follow
vLLM 0.32's ``get_num_image_tokens`` of each family (verified against the transformers processors
in ``tests/test_geometry.py``):

- LLaVA-1.5: the processor resizes and centre-crops every image to the tower's size, so
  ``(image_size / patch)**2`` tokens (+1 with ``vision_feature_select_strategy="full"``).
- LLaVA-NeXT (AnyRes, ``spatial_unpad``): base view ``(image_size / patch)**2`` + the unpadded crop
  grid ``h x w`` + ``h`` row-newline tokens. Newline tokens are **never pruned** and not counted
  in ``prunable``.
- Qwen2-VL / Qwen2.5-VL: ``smart_resize`` to multiples of ``patch * merge`` within
  ``[min_pixels, max_pixels]``, then ``(H/patch) * (W/patch) / merge**2`` tokens.

Budget symbol: ``n`` = ``ImageTokenCounts.prunable``; at the LLM input kept = ``kept_count(n, ratio)``,
per view on LLaVA-NeXT (``image_kept_count(view_sizes, ratio)``: the thumbnail and every crop keep
their own share, as FasterVLM's official code does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmprune.reduction.anyres import crop_view_sizes

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class ImageTokenCounts:
    """What one image costs the LLM before compression."""

    prunable: int
    """Visual tokens a method may remove (``n`` in ``kept_count(n, ratio)``)."""
    newline: int = 0
    """LLaVA-NeXT row-newline tokens: always kept, never counted in ``prunable``."""
    views: int = 1
    """Vision-tower passes (LLaVA-NeXT: crops + thumbnail; 1 otherwise)."""
    grid_thw: tuple[int, int, int] | None = None
    """Qwen: the patch grid ``(t, h, w)`` before the 2x2 merge."""
    view_sizes: tuple[int, ...] = ()
    """LLaVA-NeXT: prunable tokens per view (thumbnail, then each crop after unpadding, row-major);
    they sum to ``prunable``. Empty: one view of ``prunable`` tokens."""

    @property
    def total(self) -> int:
        """Placeholder tokens the stock model emits for this image."""
        return self.prunable + self.newline


@dataclass(frozen=True)
class ModelVisionSpec:
    """The few config values that decide token counts, read once from a model directory."""

    family: str
    patch_size: int
    image_size: int = 0
    """LLaVA: the tower's input side in pixels."""
    select_strategy: str = "default"
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    """LLaVA-NeXT AnyRes resolutions, ``(height, width)``."""
    merge_size: int = 1
    temporal_patch_size: int = 1
    min_pixels: int = 0
    max_pixels: int = 0

    @classmethod
    def from_dicts(cls, config: Mapping[str, Any], image_processor: Mapping[str, Any] | None = None) -> ModelVisionSpec:
        """From ``config.json`` and the image processor's config (Qwen needs its pixel bounds)."""
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}")
        vis = config.get("vision_config") or {}
        proc = dict(image_processor or {})
        if family in ("llava", "llava_next"):
            return cls(
                family=family,
                patch_size=int(vis.get("patch_size", 14)),
                image_size=int(vis.get("image_size", 336)),
                select_strategy=str(config.get("vision_feature_select_strategy", "default")),
                grid_pinpoints=tuple(tuple(int(v) for v in p) for p in config.get("image_grid_pinpoints") or ()),
            )
        size = proc.get("size") or {}
        min_pixels = proc.get("min_pixels") or size.get("shortest_edge") or 56 * 56
        max_pixels = proc.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
        return cls(
            family=family,
            patch_size=int(vis.get("patch_size", 14)),
            merge_size=int(vis.get("spatial_merge_size", 2)),
            temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, config: Mapping[str, Any] | None = None) -> ModelVisionSpec:
        """From a model directory: ``config.json`` (or ``config``, e.g. a transformers config's
        ``to_dict()``, which fills in the defaults a hub ``config.json`` may omit) and the image
        processor's config (:func:`read_image_processor_config`)."""
        path = Path(path)
        if config is None:
            config_file = path / "config.json"
            if not config_file.is_file():
                raise ValueError(f"model directory {str(path)!r} has no config.json")
            config = json.loads(config_file.read_text())
        return cls.from_dicts(config, read_image_processor_config(path))

    def image_tokens(self, width: int, height: int) -> ImageTokenCounts:
        """Tokens of one ``width x height`` image (pixels of the image as sent, before resizing)."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.family == "llava":
            return ImageTokenCounts(prunable=self._base_tokens())
        if self.family == "llava_next":
            return self._llava_next(width, height)
        return self._qwen(width, height)

    # -- per family ----------------------------------------------------------------------------

    def _base_tokens(self) -> int:
        side = self.image_size // self.patch_size
        return side * side + (1 if self.select_strategy == "full" else 0)

    def _llava_next(self, width: int, height: int) -> ImageTokenCounts:
        # 1. AnyRes: the best pinpoint resolution decides the crop grid (rows x cols of views).
        best_h, best_w = select_best_resolution((height, width), self.grid_pinpoints)
        rows, cols = best_h // self.image_size, best_w // self.image_size
        # 2. Unpad: the crops' feature grid loses the padding the resize added (vLLM's rounding).
        side = self.image_size // self.patch_size
        cur_h, cur_w = side * rows, side * cols
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        # 3. Base view + unpadded crops are prunable; one newline per unpadded feature row.
        base = self._base_tokens()
        return ImageTokenCounts(
            prunable=base + cur_h * cur_w,
            newline=cur_h,
            views=rows * cols + 1,
            view_sizes=(base, *crop_view_sizes(side, (rows, cols), (cur_h, cur_w))),
        )

    def _qwen(self, width: int, height: int) -> ImageTokenCounts:
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        grid = (1, h // self.patch_size, w // self.patch_size)
        return ImageTokenCounts(prunable=grid[1] * grid[2] // (self.merge_size**2), grid_thw=grid)


def read_image_processor_config(path: str | Path) -> dict[str, Any]:
    """``preprocessor_config.json``, or the ``image_processor`` section of transformers 5's
    ``processor_config.json``; ``{}`` when neither exists."""
    path = Path(path)
    if (path / "preprocessor_config.json").is_file():
        return json.loads((path / "preprocessor_config.json").read_text())
    if (path / "processor_config.json").is_file():
        return json.loads((path / "processor_config.json").read_text()).get("image_processor") or {}
    return {}


def select_best_resolution(size_hw: tuple[int, int], resolutions: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's AnyRes choice: most effective pixels, then least waste (``(height, width)``)."""
    if not resolutions:
        raise ValueError("LLaVA-NeXT config has no image_grid_pinpoints")
    height, width = size_hw
    best, best_eff, best_waste = resolutions[0], -1, math.inf
    for res_h, res_w in resolutions:
        scale = min(res_w / width, res_h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = res_w * res_h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (res_h, res_w), eff, waste
    return best


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: multiples of ``factor``, pixel count within bounds, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
