"""Counting prefill FLOPs: one decoder layer, the vision tower, the projector, a whole prefill
(the rules are in :mod:`vlmprune.flops`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vlmprune.flops.shapes import LMGeometry, VisionGeometry

AttentionMode = Literal["causal", "full"]
LMHeadMode = Literal["none", "last", "all"]
_ATTENTION_MODES = ("causal", "full")
_LM_HEAD_MODES = ("none", "last", "all")


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
