"""Analytic prefill FLOPs of a vision-language model, with and without visual-token compression.

Counting rules
--------------
A multiply-add counts as **2 FLOPs** (``MACs = FLOPs / 2`` exactly, since only multiply-adds are
counted). Counted: every matrix multiplication of the prefill, i.e.

- vision tower, per view (image, AnyRes crop or thumbnail): patch embedding
  ``2 * P * (C * T * p^2) * d`` (P patches, C channels, T frames per temporal patch, p pixels);
  per layer with ``n`` tokens (CLIP: 576 patches + [CLS] = 577; Qwen: all patches of the grid)
  ``2 * n * 4d^2`` (q, k, v, out) + ``2 * 2 * n * k * d`` (scores q.K^T and A.V over ``k`` keys per
  query: ``k = n`` -- the ViT is bidirectional -- or the window size on Qwen2.5-VL's windowed
  layers) + ``2 * n * d * i * (2 or 3)`` (MLP; 3 matrices when gated, Qwen2.5-VL);
- projector: ``2 * tokens * sum(w_j * w_{j+1})`` over the MLP widths, on the *uncompressed* visual
  tokens (LLaVA 1024->4096->4096 per patch; Qwen merger (4*1280)->5120->3584 per 2x2 group);
- LLM, per decoder layer with ``n`` tokens: ``2 * n * d * (2*H*h + 2*H_kv*h)`` (q, o and the GQA
  k, v projections), ``2 * 2 * H * h * keys`` (scores and A.V; ``keys = n(n+1)/2`` with
  ``attention="causal"`` -- the **default**, what causal kernels compute -- or ``n^2`` with
  ``attention="full"``, the FastV-style convention most papers use), ``2 * n * 3 * d * I`` (gated
  MLP);
- lm_head ``2 * d * V`` per position: ``lm_head="last"`` (default, what prefill needs for the
  first token), ``"all"`` or ``"none"`` (papers ignore it);
- scoring probes, separately (:func:`method_probe_flops`): a [CLS] query row ``2 * N * d`` per ViT
  layer used; a shallow probe of K decoder layers over visual + instruction tokens; instruction ->
  visual attention rows ``2 * n_instr * N * H * h``; PageRank ``2 * H * L^2 * iterations`` plus
  recomputing the ``L x L`` logits (fused kernels never return them); ToMe similarity
  ``2 * (N/2)^2 * d`` per merge round.

Not counted: norms, activations, softmax, RoPE, residual adds, biases, embedding lookups, pooling
and gather/scatter, the explain method's small CNN, TTV norms (all ``O(n*d)`` or smaller).

LLaVA-1.5 takes features from CLIP layer 23 of 24 (``vision_feature_layer=-2``): vLLM builds only
23 layers, transformers runs all 24 and drops the last. The presets count 23 (``layers=23``).

Which convention the papers used (reproduced by ``bench/flops_table.py`` / ``vlmprune flops``)
---------------------------------------------------------------------------------------------
- TransPrune's 3.82 T for LLaVA-1.5-7B = LLM only, the 576 visual tokens and **no text**, full
  ``n^2`` attention, counted in **MACs** (ours 3.82 T, -0.1 %); the same rule gives its
  TransPrune-High 1.56 T (ratio 0.59, -0.2 %) and LLaVA-NeXT 8.33 T (-0.0 %).
- FasterVLM's 43.58 T -> 11.51 / 5.71 / 3.80 T for LLaVA-NeXT-7B = **FLOPs**, visual tokens only
  (no text), full attention, **plus the vision tower** (5 views of 577 tokens, 23 layers) and
  projector (ours 43.60 / 11.55 / 5.75 / 3.84 T: +0.0 / +0.3 / +0.7 / +1.1 %, with the official
  per-view counts 5 x 144 / 58 / 29 = 720 / 290 / 145; one budget over all 2880 tokens, 720 / 288 /
  144, gave 5.72 / 3.83 T, closer to the paper's figures than its own code's counts).
- FastV's 2.01 T in TransPrune's Table 1 (K = 2, R = 50 %) = the same TransPrune rule at the
  layer-averaged ratio 0.47 (ours 2.00 T, -0.4 %).
- GlobalCom2's 41.7 T for LLaVA-NeXT-7B = the same FLOPs without the tower (ours 41.65 T, -0.1 %).
Adding 64 / 100 text tokens moves the LLaVA-1.5 figure by +11 / +18 %, so none of the papers
counted the text; causal instead of full attention moves it by -1 % (LLaVA-NeXT: -5 %). All
count LLaVA-NeXT as 2880 visual tokens (5 x 576, no row-newline tokens); so do the presets.
Counting 24 CLIP layers instead of 23 adds 0.08 T (0.2 %) to FasterVLM's baseline.

Our default (causal, 64 text tokens, FLOPs, tower included, lm_head on the last position) is
the served cost, not any paper's convention: compare ratios (compressed / baseline) with papers,
not absolute numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

AttentionMode = Literal["causal", "full"]
LMHeadMode = Literal["none", "last", "all"]
_ATTENTION_MODES = ("causal", "full")
_LM_HEAD_MODES = ("none", "last", "all")


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


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsBreakdown:
    """Prefill FLOPs by part (2 FLOPs per multiply-add)."""

    vision: float
    projector: float
    llm: float
    """Decoder layers plus the lm_head positions asked for."""
    probe: float = 0.0
    """Scoring done only for compression (signals, shallow probes, PageRank)."""

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm + self.probe

    @property
    def tflops(self) -> float:
        return self.total / 1e12

    def as_dict(self) -> dict[str, float]:
        return {
            "vision": self.vision, "projector": self.projector, "llm": self.llm, "probe": self.probe,
            "total": self.total, "tflops": self.tflops,
        }


def _check_mode(attention: str, lm_head: str | None = None) -> None:
    if attention not in _ATTENTION_MODES:
        raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {attention!r}")
    if lm_head is not None and lm_head not in _LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {_LM_HEAD_MODES}, got {lm_head!r}")


def attention_keys(n: int, attention: AttentionMode = "causal") -> int:
    """Query-key pairs scored over ``n`` tokens: ``n(n+1)/2`` causal, ``n^2`` full."""
    _check_mode(attention)
    return n * (n + 1) // 2 if attention == "causal" else n * n


def lm_layer_flops(lm: LMGeometry, n: int, attention: AttentionMode = "causal") -> float:
    """One decoder layer over ``n`` tokens (projections, attention, gated MLP)."""
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    q_o = 2 * lm.hidden * lm.heads * lm.head_dim  # q and o projections
    k_v = 2 * lm.hidden * lm.kv_heads * lm.head_dim  # GQA: k, v have kv_heads heads
    proj = 2 * n * (q_o + k_v)
    attn = 2 * 2 * lm.heads * lm.head_dim * attention_keys(n, attention)  # q.K^T and A.V
    mlp = 2 * n * 3 * lm.hidden * lm.intermediate
    return float(proj + attn + mlp)


def vision_tower_flops(vision: VisionGeometry, n_views: int = 1) -> float:
    """Patch embedding + encoder layers for ``n_views`` views."""
    n = vision.seq_len
    d = vision.hidden
    patch_in = vision.in_channels * vision.temporal_patch * vision.patch_size**2
    embed = 2 * vision.patches_per_view * patch_in * d
    proj = 2 * n * 4 * d * d
    mlp = 2 * n * d * vision.intermediate * (3 if vision.gated_mlp else 2)
    if vision.window_tokens is None:
        full_layers, window_layers = vision.layers, 0
    else:
        full_layers = min(vision.full_attention_layers, vision.layers)
        window_layers = vision.layers - full_layers
    attn_full = 2 * 2 * n * n * d
    attn_window = 2 * 2 * n * min(n, vision.window_tokens or n) * d
    per_view = embed + vision.layers * (proj + mlp) + full_layers * attn_full + window_layers * attn_window
    return float(n_views * per_view)


def projector_flops(vision: VisionGeometry, n_tokens: int) -> float:
    """The projector MLP over ``n_tokens`` LLM visual tokens."""
    widths = vision.projector
    return float(2 * n_tokens * sum(a * b for a, b in zip(widths, widths[1:])))


def prefill_flops(
    lm: LMGeometry,
    n_text: int,
    visual_per_layer: Sequence[int] | int,
    vision: VisionGeometry | None = None,
    n_views: int = 1,
    probe: float | None = None,
    *,
    attention: AttentionMode = "causal",
    lm_head: LMHeadMode = "last",
) -> FlopsBreakdown:
    """Prefill FLOPs of one request.

    ``visual_per_layer``: visual tokens entering each decoder layer (an int = the same count in every
    layer, as after pre-LLM compression). ``vision=None`` leaves the tower and projector out; the
    projector runs on the uncompressed ``n_views * vision.visual_tokens_per_view`` tokens.
    ``probe``: FLOPs of compression-only scoring (:func:`method_probe_flops`).
    """
    _check_mode(attention, lm_head)
    if n_text < 0:
        raise ValueError(f"n_text must be >= 0, got {n_text}")
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    per_layer = [visual_per_layer] * lm.layers if isinstance(visual_per_layer, int) else list(visual_per_layer)
    if len(per_layer) != lm.layers:
        raise ValueError(f"visual_per_layer has {len(per_layer)} entries, the LLM has {lm.layers} layers")
    if any(c < 0 for c in per_layer):
        raise ValueError(f"visual_per_layer must be >= 0, got {min(per_layer)}")
    llm = sum(lm_layer_flops(lm, n_text + c, attention) for c in per_layer)
    positions = {"none": 0, "last": 1, "all": n_text + per_layer[-1]}[lm_head]
    llm += 2.0 * positions * lm.hidden * lm.vocab
    if vision is None:
        tower = proj = 0.0
    else:
        tower = vision_tower_flops(vision, n_views)
        proj = projector_flops(vision, n_views * vision.visual_tokens_per_view)
    return FlopsBreakdown(vision=tower, projector=proj, llm=llm, probe=float(probe or 0.0))


# ---------------------------------------------------------------------------------------------
# Methods: token counts per layer and probe costs
# ---------------------------------------------------------------------------------------------


def _resolve_policy(method: str, ratio: float, policy: Any):
    from vlmprune.policy import PolicyError, parse_policy

    if policy is None:
        return parse_policy({"method": method}, ratio=ratio)
    if isinstance(policy, Mapping):
        policy = {"method": method, **policy}
    resolved = parse_policy(policy, ratio=ratio)
    if resolved.method != method:
        raise PolicyError(f"policy is for method {resolved.method!r}, not {method!r}")
    return resolved


def method_visual_per_layer(
    method: str,
    ratio: float,
    n_visual: int,
    num_layers: int,
    policy: Any = None,
    *,
    in_llm: bool = True,
    view_sizes: Sequence[int] | None = None,
) -> list[int]:
    """Visual tokens entering each decoder layer under ``method`` at ``ratio``.

    Progressive methods (transprune, aim, fastv) follow their schedule scaled to the layer-averaged
    ``ratio`` when ``in_llm`` (the transformers backend); with ``in_llm=False`` (the vLLM shallow
    probe, pruned at the LLM input) and for every other method, each layer sees
    ``image_kept_count(view_sizes, ratio)`` tokens (``kept_count`` of every view, summed;
    ``view_sizes`` defaults to one view of ``n_visual``). FastV has no LLM-input variant: it is
    counted in the LLM whatever ``in_llm`` says (every token before layer K, the kept ones after).
    ``ratio`` is bucketed as a policy would be.
    """
    from vlmprune.core import schedule
    from vlmprune.methods import METHODS
    from vlmprune.policy import image_kept_count
    from vlmprune.reduction.stages import progressive_schedule

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    views = (n_visual,) if view_sizes is None else tuple(view_sizes)
    if sum(views) != n_visual:
        raise ValueError(f"view_sizes {views} do not sum to n_visual={n_visual}")
    resolved = _resolve_policy(method, ratio, policy)
    if METHODS[method].stage != "in_llm" or (not in_llm and method != "fastv"):
        return [image_kept_count(views, resolved.ratio)] * num_layers
    counts = schedule.stage_counts(progressive_schedule(resolved, num_layers), n_visual)
    return schedule.counts_per_layer(counts, n_visual, num_layers)


def cls_row_flops(vision: VisionGeometry, n_views: int = 1, layers: int = 1) -> float:
    """The single [CLS] query row ``q_cls . K^T`` over all heads: ``2 * N * d`` per layer used."""
    return float(2 * vision.seq_len * vision.hidden * layers * n_views)


def attention_rows_flops(lm: LMGeometry, n_queries: int, n_keys: int) -> float:
    """Attention logits of ``n_queries`` rows over ``n_keys`` keys, all heads (e.g. instruction->visual)."""
    return float(2 * n_queries * n_keys * lm.heads * lm.head_dim)


def pagerank_flops(heads: int, n_tokens: int, iterations: int, head_dim: int | None = None) -> float:
    """PageRank ``v <- v M`` over an ``n x n`` attention matrix per head; with ``head_dim``, also
    recompute the logits ``Q K^T`` (fused attention kernels never return them)."""
    cost = 2 * heads * n_tokens * n_tokens * iterations
    if head_dim is not None:
        cost += 2 * heads * n_tokens * n_tokens * head_dim
    return float(cost)


def shallow_probe_flops(lm: LMGeometry, n_tokens: int, layers: int, attention: AttentionMode = "causal") -> float:
    """The first ``layers`` decoder layers over ``n_tokens`` (visual + instruction), outside the cache."""
    return layers * lm_layer_flops(lm, n_tokens, attention)


def tome_merge_flops(n_tokens: int, keep: int, dim: int) -> float:
    """Bipartite-matching similarity (A x B cosine) for the merge rounds from ``n_tokens`` to ``keep``;
    each round removes at most half of the tokens."""
    cost = 0
    n = n_tokens
    while n > keep:
        cost += 2 * (n - n // 2) * (n // 2) * dim
        n = max(keep, n - n // 2)
    return float(cost)


def method_probe_flops(
    method: str,
    ratio: float,
    lm: LMGeometry,
    vision: VisionGeometry | None,
    n_visual: int,
    n_instruction: int,
    n_views: int = 1,
    policy: Any = None,
    *,
    in_llm: bool = True,
) -> float:
    """FLOPs spent only to decide what to compress (0 at ratio 0: nothing is scored).

    fastervlm/globalcom2: one [CLS] row per view (no [CLS] on Qwen: the full score matrix of one
    layer, for the mean attention received); aim: ToMe similarity (metric = tower width) + PageRank
    with recomputed logits at each pruning layer (``in_llm``) or after a shallow probe; transprune:
    instruction->visual rows at each pruning layer, or a shallow probe; fastv: the query rows of
    layer K-1 (the last prompt token, or ``n_instruction`` rows) over every token present there
    (its k are the layer's own; only the rows' scores are extra); explain: q/k projections
    of decoder layer 0 + instruction->visual rows; random/pool: 0.
    """
    resolved = _resolve_policy(method, ratio, policy)
    if resolved.ratio == 0.0 or n_visual == 0:
        return 0.0
    if method in ("fastervlm", "globalcom2"):
        if vision is None:
            return 0.0
        if vision.cls_token:
            return cls_row_flops(vision, n_views)
        return float(2 * vision.seq_len**2 * vision.hidden * n_views)
    if method == "explain":
        n = n_visual + n_instruction
        qk = 2 * n * lm.hidden * (lm.heads + lm.kv_heads) * lm.head_dim
        return float(qk) + attention_rows_flops(lm, n_instruction, n_visual)
    if method == "transprune":
        if not in_llm:
            return shallow_probe_flops(lm, n_visual + n_instruction, resolved.probe_layers) + (
                attention_rows_flops(lm, n_instruction, n_visual)
            )
        per_layer = method_visual_per_layer(method, ratio, n_visual, lm.layers, resolved)
        cuts = [i for i in range(1, lm.layers) if per_layer[i] < per_layer[i - 1]]
        if per_layer[0] < n_visual:
            cuts.insert(0, 0)
        # scores use the tokens present before each cut
        return float(sum(attention_rows_flops(lm, n_instruction, per_layer[i - 1] if i else n_visual) for i in cuts))
    if method == "aim":
        if not in_llm:  # merge + prune at the LLM input, scored by PageRank after the shallow probe
            n = n_visual + n_instruction
            return shallow_probe_flops(lm, n, resolved.probe_layers) + pagerank_flops(
                lm.heads, n, resolved.pagerank_iterations, lm.head_dim
            )
        per_layer = method_visual_per_layer(method, ratio, n_visual, lm.layers, resolved)
        cost = 0.0
        if vision is not None and per_layer[0] < n_visual:  # ToMe merging before the LLM
            cost += tome_merge_flops(n_visual, per_layer[0], vision.hidden)
        for i in range(1, lm.layers):  # PageRank over the tokens present where a layer prunes
            if per_layer[i] < per_layer[i - 1]:
                n = per_layer[i - 1] + n_instruction
                cost += pagerank_flops(lm.heads, n, resolved.pagerank_iterations, lm.head_dim)
        return cost
    if method == "fastv":  # always in the LLM (no probe variant)
        per_layer = method_visual_per_layer(method, ratio, n_visual, lm.layers, resolved)
        rows = 1 if resolved.query == "last" else n_instruction
        return float(sum(
            attention_rows_flops(lm, rows, per_layer[i - 1] + n_instruction)
            for i in range(1, lm.layers) if per_layer[i] < per_layer[i - 1]
        ))
    return 0.0  # random, pool


def method_prefill_flops(
    model: ModelGeometry,
    method: str,
    ratio: float,
    n_text: int = 64,
    *,
    n_views: int | None = None,
    policy: Any = None,
    in_llm: bool = True,
    attention: AttentionMode = "causal",
    lm_head: LMHeadMode = "last",
    include_vision: bool = True,
    include_probe: bool = True,
) -> FlopsBreakdown:
    """:func:`prefill_flops` of ``model``'s reference image under ``method`` at ``ratio``; the probe
    takes all ``n_text`` tokens as the instruction (an upper bound)."""
    views = model.n_views if n_views is None else n_views
    n_visual = views * model.vision.visual_tokens_per_view
    per_layer = method_visual_per_layer(
        method, ratio, n_visual, model.lm.layers, policy, in_llm=in_llm,
        view_sizes=(model.vision.visual_tokens_per_view,) * views,
    )
    probe = (
        method_probe_flops(method, ratio, model.lm, model.vision, n_visual, n_text, views, policy, in_llm=in_llm)
        if include_probe
        else 0.0
    )
    return prefill_flops(
        model.lm, n_text, per_layer, model.vision if include_vision else None, views, probe,
        attention=attention, lm_head=lm_head,
    )


# ---------------------------------------------------------------------------------------------
# The papers' figures and the conventions that reproduce them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Convention:
    """An accounting convention: what is in the count and in which unit."""

    n_text: int = 0
    attention: AttentionMode = "full"
    vision: bool = False
    unit: Literal["flops", "macs"] = "flops"

    @property
    def label(self) -> str:
        parts = [f"text={self.n_text}", self.attention, "LLM+vision" if self.vision else "LLM only", self.unit.upper()]
        return ", ".join(parts)

    def tera(self, model: ModelGeometry, method: str, ratio: float) -> float:
        b = method_prefill_flops(
            model, method, ratio, self.n_text, attention=self.attention, lm_head="none",
            include_vision=self.vision, include_probe=False,
        )
        return b.tflops / (2.0 if self.unit == "macs" else 1.0)


@dataclass(frozen=True)
class PaperFigure:
    source: str
    model: str
    method: str
    ratio: float
    tflops: float
    convention: Convention
    """The convention that reproduces it (found by :func:`convention_search`)."""


# TransPrune (arXiv 2507.20630) Table 1: LLaVA-1.5-7B base 3.82 T, TransPrune-High 1.56 T; LLaVA-NeXT
# 8.33 T at 40 % of the base. FasterVLM (arXiv 2412.01818) LLaVA-NeXT-7B efficiency table. GlobalCom2
# (arXiv 2501.05179) LLaVA-NeXT-7B base.
_TRANSPRUNE_CONV = Convention(n_text=0, attention="full", vision=False, unit="macs")
_FASTERVLM_CONV = Convention(n_text=0, attention="full", vision=True, unit="flops")
_GLOBALCOM2_CONV = Convention(n_text=0, attention="full", vision=False, unit="flops")
PAPER_FIGURES: tuple[PaperFigure, ...] = (
    PaperFigure("TransPrune", "llava-1.5-7b", "transprune", 0.0, 3.82, _TRANSPRUNE_CONV),
    PaperFigure("TransPrune", "llava-1.5-7b", "transprune", 0.59, 1.56, _TRANSPRUNE_CONV),
    PaperFigure("TransPrune", "llava-next-7b", "transprune", 0.59, 8.33, _TRANSPRUNE_CONV),
    # TransPrune's Table 1 row for FastV (K = 2, R = 50 %: 288 of 576 after layer 2), 2.01 T; the
    # layer-averaged ratio of that schedule is 0.5 * 30 / 32 = 0.469, bucketed 0.47 (287 kept).
    PaperFigure("TransPrune (FastV row)", "llava-1.5-7b", "fastv", 0.47, 2.01, _TRANSPRUNE_CONV),
    PaperFigure("FasterVLM", "llava-next-7b", "fastervlm", 0.0, 43.58, _FASTERVLM_CONV),
    PaperFigure("FasterVLM", "llava-next-7b", "fastervlm", 0.75, 11.51, _FASTERVLM_CONV),
    PaperFigure("FasterVLM", "llava-next-7b", "fastervlm", 0.9, 5.71, _FASTERVLM_CONV),
    PaperFigure("FasterVLM", "llava-next-7b", "fastervlm", 0.95, 3.80, _FASTERVLM_CONV),
    PaperFigure("GlobalCom2", "llava-next-7b", "globalcom2", 0.0, 41.7, _GLOBALCOM2_CONV),
)

CANDIDATE_CONVENTIONS: tuple[Convention, ...] = tuple(
    Convention(n_text=t, attention=a, vision=v, unit=u)
    for u in ("flops", "macs")
    for v in (False, True)
    for a in ("full", "causal")
    for t in (0, 64, 100)
)


def convention_search(figure: PaperFigure) -> list[tuple[Convention, float, float]]:
    """Every candidate convention with its value and relative error for ``figure``, best first."""
    model = get_preset(figure.model)
    rows = []
    for conv in CANDIDATE_CONVENTIONS:
        value = conv.tera(model, figure.method, figure.ratio)
        rows.append((conv, value, value / figure.tflops - 1.0))
    rows.sort(key=lambda r: abs(r[2]))
    return rows


# ---------------------------------------------------------------------------------------------
# Tables (``bench/flops_table.py`` and ``vlmprune flops``)
# ---------------------------------------------------------------------------------------------

DEFAULT_RATIOS = (0.0, 0.75, 0.9, 0.95)
TABLE_METHODS = ("fastervlm", "transprune")


def flops_rows(
    models: Sequence[str] = ("llava-1.5-7b", "llava-next-7b"),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    n_text: int = 64,
    methods: Sequence[str] = TABLE_METHODS,
    attention: AttentionMode = "causal",
) -> list[dict[str, Any]]:
    """Rows of the served-cost table (our default convention), JSON-ready."""
    rows = []
    for name in models:
        model = get_preset(name)
        for method in methods:
            for ratio in ratios:
                per_layer = method_visual_per_layer(
                    method, ratio, model.n_visual, model.lm.layers, view_sizes=model.view_sizes
                )
                b = method_prefill_flops(model, method, ratio, n_text, attention=attention)
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        "ratio": ratio,
                        "n_text": n_text,
                        "visual_tokens": model.n_visual,
                        "visual_tokens_layer_avg": sum(per_layer) / len(per_layer),
                        "llm_tflops": b.llm / 1e12,
                        "vision_tflops": (b.vision + b.projector) / 1e12,
                        "probe_gflops": b.probe / 1e9,
                        "total_tflops": b.tflops,
                    }
                )
    return rows


def paper_rows() -> list[dict[str, Any]]:
    """Each paper figure beside our number under its documented convention, and the best candidate."""
    rows = []
    for fig in PAPER_FIGURES:
        ours = fig.convention.tera(get_preset(fig.model), fig.method, fig.ratio)
        best, best_value, best_err = convention_search(fig)[0]
        rows.append(
            {
                "source": fig.source, "model": fig.model, "method": fig.method, "ratio": fig.ratio,
                "paper_tflops": fig.tflops, "convention": fig.convention.label, "ours_tflops": ours,
                "rel_error": ours / fig.tflops - 1.0, "best_convention": best.label, "best_tflops": best_value,
                "best_rel_error": best_err,
            }
        )
    return rows


def convention_grid(models: Sequence[str] = ("llava-1.5-7b", "llava-next-7b")) -> list[dict[str, Any]]:
    """Baseline (ratio 0) tera-ops of each model under every candidate convention."""
    return [
        {"convention": conv.label, **{m: conv.tera(get_preset(m), "fastervlm", 0.0) for m in models}}
        for conv in CANDIDATE_CONVENTIONS
    ]


def render_markdown(rows: list[dict[str, Any]], papers: list[dict[str, Any]] | None = None,
                    grid: list[dict[str, Any]] | None = None) -> str:
    """Markdown tables: served cost per model/method/ratio, then the paper comparison."""
    n_text = rows[0]["n_text"] if rows else 0
    out = [
        f"Prefill TFLOPs (2 FLOPs per multiply-add; causal attention; {n_text} text tokens; lm_head on the "
        "last position; transprune layer-averaged, reference backend).",
        "",
        "| model | method | ratio | visual tokens (layer avg) | LLM | LLM + vision | probe GFLOPs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['method']} | {r['ratio']:.2f} | {r['visual_tokens_layer_avg']:.1f} "
            f"| {r['llm_tflops']:.2f} | {r['llm_tflops'] + r['vision_tflops']:.2f} | {r['probe_gflops']:.2f} |"
        )
    if grid:
        models = [k for k in grid[0] if k != "convention"]
        out += ["", "Baseline (ratio 0) under each accounting convention, tera-ops:", "",
                "| convention | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        for g in grid:
            out.append(f"| {g['convention']} | " + " | ".join(f"{g[m]:.2f}" for m in models) + " |")
    if papers:
        out += ["", "The papers' figures and the convention that reproduces them:", "",
                "| source | model | method | ratio | paper T | convention | ours T | error "
                f"| closest of {len(CANDIDATE_CONVENTIONS)} candidates (error) |",
                "|---|---|---|---:|---:|---|---:|---:|---|"]
        for p in papers:
            out.append(
                f"| {p['source']} | {p['model']} | {p['method']} | {p['ratio']:.2f} | {p['paper_tflops']:.2f} "
                f"| {p['convention']} | {p['ours_tflops']:.2f} | {100 * p['rel_error']:+.1f} % "
                f"| {p['best_convention']} ({100 * p['best_rel_error']:+.1f} %) |"
            )
    return "\n".join(out)

