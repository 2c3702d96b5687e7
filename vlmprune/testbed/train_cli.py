"""``vlmprune train demo | demo-next``: checks the flags, runs the recipe, prints one JSON line.

The command line of both testbed recipes (:mod:`vlmprune.testbed.train`,
:mod:`vlmprune.testbed.train_next`), kept apart from them so that neither recipe imports the other.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from vlmprune.testbed.train import DemoConfig, train_demo
from vlmprune.testbed.train_next import NextConfig, train_next


def run_cli(args) -> int:
    """``vlmprune train demo``: checks the arguments (ValueError names the flag), trains, prints
    one JSON line {model, out}. Progress and logs go to stderr."""
    if args.model not in ("demo", "demo-next"):
        raise ValueError(f"model: 'demo' or 'demo-next' can be trained, got {args.model!r}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.model == "demo-next":
        return _run_next(args)
    cfg = DemoConfig(seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.vit_steps is not None:
        if args.vit_steps < 1:
            raise ValueError(f"--vit-steps must be >= 1, got {args.vit_steps}")
        cfg = dataclasses.replace(cfg, vit_steps=args.vit_steps)
    out = Path(args.out) if args.out else Path("runs") / args.model
    train_demo(
        out, cfg, work=Path(args.work) if args.work else None, threads=args.threads,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(json.dumps({"model": args.model, "out": str(out)}))
    return 0


def _run_next(args) -> int:
    """``vlmprune train demo-next``: see :mod:`vlmprune.testbed.train_next`."""
    if args.vit_steps is not None:
        raise ValueError("--vit-steps: demo-next reuses the ViT of its --base model")
    cfg = NextConfig(seed=args.seed)
    if args.base is not None:
        cfg = dataclasses.replace(cfg, base=args.base)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
    out = Path(args.out) if args.out else Path("runs") / args.model
    train_next(
        out, cfg, work=Path(args.work) if args.work else None, threads=args.threads, device=args.device,
        workers=workers, log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(json.dumps({"model": args.model, "out": str(out)}))
    return 0
