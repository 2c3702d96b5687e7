"""The shapes FLOPs are counted on: LM and vision geometry, the 7B presets, reading a model's config."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMGeometry:
    """Decoder-only LLM shape (LLaMA/Qwen2 style: GQA attention, gated MLP)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class VisionGeometry:
    """Vision tower + projector shape, per view (one image, crop or thumbnail)."""

    hidden: int
    layers: int
    """Encoder layers run to produce the features (LLaVA: 23 of CLIP's 24, penultimate layer)."""
    heads: int
    intermediate: int
    patch_size: int
    patches_per_view: int
    """Patch tokens per view (CLIP-336: 24*24 = 576; Qwen: t*h*w of the patch grid)."""
    cls_token: bool = False
    """A [CLS] token joins the encoder sequence (CLIP); it is not passed to the LLM."""
    in_channels: int = 3
    temporal_patch: int = 1
    """Frames per patch (Qwen: 2; an image is repeated to fill them)."""
    gated_mlp: bool = False
    spatial_merge: int = 1
    """The projector maps ``spatial_merge**2`` neighbouring patches to one LLM token (Qwen: 2)."""
    projector: tuple[int, ...] = ()
    """Widths of the projector MLP, input first (LLaVA: (1024, 4096, 4096))."""
    window_tokens: int | None = None
    """Qwen2.5-VL: patches per attention window in windowed layers; None = all layers full."""
    full_attention_layers: int = 0
    """With windows: how many of ``layers`` still attend over the whole image."""

    @property
    def seq_len(self) -> int:
        """Encoder tokens per view (patches, plus [CLS] where present)."""
        return self.patches_per_view + int(self.cls_token)

    @property
    def visual_tokens_per_view(self) -> int:
        """LLM visual tokens one view yields before compression."""
        return self.patches_per_view // (self.spatial_merge**2)

    def with_grid(self, grid_thw: Sequence[int]) -> VisionGeometry:
        """The same tower for an image/video whose patch grid is ``(t, h, w)`` (Qwen's grid_thw)."""
        t, h, w = (int(v) for v in grid_thw)
        if min(t, h, w) < 1:
            raise ValueError(f"grid_thw must be positive, got {tuple(grid_thw)}")
        return dataclasses.replace(self, patches_per_view=t * h * w)


@dataclass(frozen=True)
class ModelGeometry:
    """A named model: tower, LLM and the view count of its reference image."""

    name: str
    family: str
    vision: VisionGeometry
    lm: LMGeometry
    n_views: int = 1
    """Views of the reference image (LLaVA-NeXT 672x672: 2x2 crops + thumbnail = 5)."""

    @property
    def n_visual(self) -> int:
        """Visual tokens at the LLM input for the reference image, uncompressed."""
        return self.n_views * self.vision.visual_tokens_per_view

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Visual tokens per view of the reference image (each view is budgeted by itself)."""
        return (self.vision.visual_tokens_per_view,) * self.n_views


# Vicuna-7B v1.5 (LLaMA-2-7B shape) and CLIP ViT-L/14-336: the llava-hf/llava-1.5-7b-hf and
# llava-v1.6-vicuna-7b-hf config.json; LLaVA-NeXT's thumbnail + 2x2 crops of a 672x672 image.
_VICUNA_7B = LMGeometry(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
_CLIP_L_336_LLAVA = VisionGeometry(
    hidden=1024, layers=23, heads=16, intermediate=4096, patch_size=14, patches_per_view=576, cls_token=True,
    projector=(1024, 4096, 4096),
)
LLAVA_15_7B = ModelGeometry("llava-1.5-7b", "llava", _CLIP_L_336_LLAVA, _VICUNA_7B, n_views=1)
LLAVA_NEXT_7B = ModelGeometry("llava-next-7b", "llava_next", _CLIP_L_336_LLAVA, _VICUNA_7B, n_views=5)

# Qwen2-VL-7B / Qwen2.5-VL-7B: the Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct
# config.json (transformers' Qwen2VL*Config class defaults hold the 72B text sizes; their vision
# defaults match 7B). Text: hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064.
# Qwen2-VL ViT: 1280 wide, 32 layers, 16 heads, MLP 4*1280 (fc1/fc2); Qwen2.5-VL ViT: 1280 wide,
# 32 layers, SwiGLU MLP 3420, windows of 112 px = 8x8 patches except layers 7/15/23/31.
# Merger: 2x2 patches (4*1280 = 5120) -> 5120 -> 3584. Reference image 672x672: 48x48 patches,
# 576 visual tokens (the same count as LLaVA-1.5).
_QWEN2_7B_LM = LMGeometry(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064)
QWEN2_VL_7B = ModelGeometry(
    "qwen2-vl-7b", "qwen2_vl",
    VisionGeometry(
        hidden=1280, layers=32, heads=16, intermediate=5120, patch_size=14, patches_per_view=48 * 48,
        temporal_patch=2, spatial_merge=2, projector=(5120, 5120, 3584),
    ),
    _QWEN2_7B_LM,
)
QWEN25_VL_7B = ModelGeometry(
    "qwen2.5-vl-7b", "qwen2_5_vl",
    VisionGeometry(
        hidden=1280, layers=32, heads=16, intermediate=3420, patch_size=14, patches_per_view=48 * 48,
        temporal_patch=2, gated_mlp=True, spatial_merge=2, projector=(5120, 5120, 3584),
        window_tokens=64, full_attention_layers=4,
    ),
    _QWEN2_7B_LM,
)
PRESETS: dict[str, ModelGeometry] = {m.name: m for m in (LLAVA_15_7B, LLAVA_NEXT_7B, QWEN2_VL_7B, QWEN25_VL_7B)}


def get_preset(name: str) -> ModelGeometry:
    """A preset by name; a ``ValueError`` lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(PRESETS)}") from None


def from_hf_config(config: Any) -> tuple[VisionGeometry, LMGeometry]:
    """Geometry of a transformers LlavaConfig / LlavaNextConfig / Qwen2VLConfig / Qwen2_5_VLConfig.

    For LLaVA the tower depth is the deepest feature layer used (``vision_feature_layer``); for Qwen
    ``patches_per_view`` is a 672x672 reference image (use :meth:`VisionGeometry.with_grid`).
    """
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    vis = getattr(config, "vision_config", None)
    if text is None or vis is None:
        raise ValueError(f"config of model_type {model_type!r} has no text_config/vision_config")
    lm = _lm_from_text_config(text)
    if model_type in ("llava", "llava_next"):
        return _llava_vision(config, vis, lm), lm
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_vision(model_type, vis, lm), lm
    raise ValueError(
        f"unsupported model_type {model_type!r}; supported: llava, llava_next, qwen2_vl, qwen2_5_vl"
    )


def _lm_from_text_config(text: Any) -> LMGeometry:
    heads = int(text.num_attention_heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return LMGeometry(
        hidden=int(text.hidden_size), layers=int(text.num_hidden_layers), heads=heads, kv_heads=int(kv_heads),
        head_dim=int(head_dim), intermediate=int(text.intermediate_size), vocab=int(text.vocab_size),
    )


def _llava_vision(config: Any, vis: Any, lm: LMGeometry) -> VisionGeometry:
    depth = int(vis.num_hidden_layers)
    feature_layers = config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    # hidden_states[i] is the output of layer i (0 = embeddings): layers needed = max resolved index.
    used = max(idx if idx >= 0 else depth + 1 + idx for idx in feature_layers)
    side = int(vis.image_size) // int(vis.patch_size)
    return VisionGeometry(
        hidden=int(vis.hidden_size), layers=used, heads=int(vis.num_attention_heads),
        intermediate=int(vis.intermediate_size), patch_size=int(vis.patch_size), patches_per_view=side * side,
        cls_token=True, in_channels=int(getattr(vis, "num_channels", 3)),
        projector=(int(vis.hidden_size) * len(feature_layers), lm.hidden, lm.hidden),
    )


def _qwen_vision(model_type: str, vis: Any, lm: LMGeometry) -> VisionGeometry:
    patch = int(vis.patch_size)
    merge = int(vis.spatial_merge_size)
    side = 672 // patch
    if model_type == "qwen2_vl":
        width = int(vis.embed_dim)
        return VisionGeometry(
            hidden=width, layers=int(vis.depth), heads=int(vis.num_heads),
            intermediate=int(width * vis.mlp_ratio), patch_size=patch, patches_per_view=side * side,
            in_channels=int(vis.in_channels), temporal_patch=int(vis.temporal_patch_size), spatial_merge=merge,
            projector=(width * merge * merge, width * merge * merge, int(vis.hidden_size)),
        )
    width = int(vis.hidden_size)
    window_side = int(vis.window_size) // patch  # window in patches per side (112 px -> 8)
    return VisionGeometry(
        hidden=width, layers=int(vis.depth), heads=int(vis.num_heads), intermediate=int(vis.intermediate_size),
        patch_size=patch, patches_per_view=side * side, in_channels=int(vis.in_channels),
        temporal_patch=int(vis.temporal_patch_size), gated_mlp=True, spatial_merge=merge,
        projector=(width * merge * merge, width * merge * merge, int(vis.out_hidden_size)),
        window_tokens=window_side * window_side,
        full_attention_layers=len([i for i in vis.fullatt_block_indexes if i < int(vis.depth)]),
    )
