"""Prefill TFLOPs of LLaVA-1.5-7B and LLaVA-NeXT-7B under compression, beside the papers' figures.

Prints markdown: (1) the served cost under vlmprune's default convention (FLOPs, causal attention,
text tokens, vision tower, lm_head on the last position) for FasterVLM (pre-LLM) and TransPrune
(progressive, layer-averaged) at each ratio; (2) the baselines under every candidate accounting
convention; (3) each paper figure with the convention that reproduces it and the error.
The formulas and conclusions are in :mod:`vlmprune.flops`; ``vlmprune flops --conventions``
prints the same tables.

    python bench/flops_table.py [--ratios 0,0.75,0.9,0.95] [--text-tokens 64]
"""

from __future__ import annotations

import argparse

from vlmprune import flops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0,0.75,0.9,0.95")
    parser.add_argument("--text-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = flops.flops_rows(("llava-1.5-7b", "llava-next-7b"), ratios, args.text_tokens)
    print(flops.render_markdown(rows, flops.paper_rows(), flops.convention_grid()))


if __name__ == "__main__":
    main()
