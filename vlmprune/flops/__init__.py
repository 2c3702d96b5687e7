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

Modules: :mod:`~vlmprune.flops.shapes` (LM and vision geometry, presets, a model's config),
:mod:`~vlmprune.flops.counting` (the rules above), :mod:`~vlmprune.flops.methods` (per-method token
counts per layer, from the image's plan, and scoring costs), :mod:`~vlmprune.flops.papers` (the papers'
figures and the tables of ``vlmprune flops``). Everything public is importable from here.
"""

from vlmprune.flops.counting import (
    AttentionMode,
    FlopsBreakdown,
    LMHeadMode,
    attention_keys,
    lm_layer_flops,
    prefill_flops,
    projector_flops,
    vision_tower_flops,
)
from vlmprune.flops.methods import (
    attention_rows_flops,
    cls_row_flops,
    method_prefill_flops,
    method_probe_flops,
    method_visual_per_layer,
    pagerank_flops,
    shallow_probe_flops,
    tome_merge_flops,
)
from vlmprune.flops.papers import (
    CANDIDATE_CONVENTIONS,
    DEFAULT_RATIOS,
    PAPER_FIGURES,
    TABLE_METHODS,
    Convention,
    PaperFigure,
    convention_grid,
    convention_search,
    flops_rows,
    paper_rows,
    render_markdown,
)
from vlmprune.flops.shapes import (
    LLAVA_15_7B,
    LLAVA_NEXT_7B,
    PRESETS,
    QWEN2_VL_7B,
    QWEN25_VL_7B,
    LMGeometry,
    ModelGeometry,
    VisionGeometry,
    from_hf_config,
    get_preset,
)

__all__ = [
    "CANDIDATE_CONVENTIONS", "DEFAULT_RATIOS", "LLAVA_15_7B", "LLAVA_NEXT_7B", "PAPER_FIGURES", "PRESETS",
    "QWEN25_VL_7B", "QWEN2_VL_7B", "TABLE_METHODS", "AttentionMode", "Convention", "FlopsBreakdown",
    "LMGeometry", "LMHeadMode", "ModelGeometry", "PaperFigure", "VisionGeometry", "attention_keys",
    "attention_rows_flops", "cls_row_flops", "convention_grid", "convention_search", "flops_rows",
    "from_hf_config", "get_preset", "lm_layer_flops", "method_prefill_flops", "method_probe_flops",
    "method_visual_per_layer", "pagerank_flops", "paper_rows", "prefill_flops", "projector_flops",
    "render_markdown", "shallow_probe_flops", "tome_merge_flops", "vision_tower_flops",
]
