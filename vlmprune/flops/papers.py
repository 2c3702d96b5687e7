"""The papers' FLOPs figures, the accounting conventions that reproduce them, and the tables of
``vlmprune flops`` and ``bench/flops_table.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlmprune.flops.counting import AttentionMode
from vlmprune.flops.methods import method_prefill_flops, method_visual_per_layer
from vlmprune.flops.shapes import ModelGeometry, get_preset


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
