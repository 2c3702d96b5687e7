"""``vlmprune demo``: one demo request through the transformers reference backend (no vLLM).

(This was ``vlmprune serve`` before the gateway landed; ``serve`` now starts vLLM and the gateway.)

The OpenAI-compatible gateway (server/) and the trained ``demo`` model are later issues. Until
then this runs the transformers reference backend on a tiny *randomly initialised* LLaVA built on
the spot (nothing is downloaded), one image and one question, at each requested ratio, and prints
what pruning changes: visual tokens in and kept, the prompt length the LLM prefills, analytic
prefill FLOPs and wall time. The answer text is meaningless (random weights); the counts are real.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEMO_PROMPT = "what colour is the small square in the top left ?"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vlmprune demo", description=__doc__.splitlines()[0])
    p.add_argument("--method", default="fastervlm", help="compression method (default: fastervlm)")
    p.add_argument("--ratios", default="0,0.5,0.9", help="comma-separated ratios (default: 0,0.5,0.9)")
    p.add_argument("--model-dir", default=None, help="where to build the tiny model (default: a temp dir)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import torch

    from vlmprune.backends.hf.pipeline import ReferenceBackend, Request
    from vlmprune.flops import from_hf_config, prefill_flops
    from vlmprune.methods import require_support
    from vlmprune.policy import PolicyError, parse_policy
    from vlmprune.testbed.tiny import build_llava, make_image

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        policies = [parse_policy({"method": args.method, "ratio": r}) for r in ratios]
        require_support(args.method, "llava")
    except (ValueError, PolicyError) as exc:
        print(f"vlmprune demo: error: {exc}", file=sys.stderr)
        return 2

    print(
        "vlmprune demo: no vLLM and no gateway here (that is `vlmprune serve`); running the\n"
        "transformers reference backend on one demo request with a tiny RANDOMLY INITIALISED LLaVA\n"
        "(answers are meaningless, token counts and FLOPs are real).",
        flush=True,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or tmp)
        model, processor = build_llava(model_dir)
        backend = ReferenceBackend(model, processor)
        vision, lm = from_hf_config(model.config)
        request = Request(prompt=DEMO_PROMPT, images=[make_image(160, 120, seed=1)])
        print(f"request: 1 image + {DEMO_PROMPT!r}; method {args.method}")
        print(f"{'ratio':>6} {'visual':>7} {'kept':>5} {'prompt':>7} {'prefill MFLOPs':>15} {'ms':>7}  answer")
        for policy in policies:
            start = time.perf_counter()
            gen = backend.generate([request], policy, max_new_tokens=args.max_new_tokens)[0]
            elapsed = (time.perf_counter() - start) * 1e3
            n_text = gen.prompt_tokens - gen.kept_tokens
            flops = prefill_flops(lm, n_text, gen.kept_tokens, vision).total
            print(
                f"{policy.ratio:>6.3f} {gen.visual_tokens:>7} {gen.kept_tokens:>5} {gen.prompt_tokens:>7} "
                f"{flops / 1e6:>15.1f} {elapsed:>7.1f}  {gen.text!r}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
