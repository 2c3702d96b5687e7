"""Held-out teacher recall of explain-CNN variants (issue 13's study; results in
``bench/results/explain_cnn_study_demo.json``).

``vlmprune train explain`` selects its epoch on a 10 % validation split of the samples it trains
on; this script measures on samples it never saw. It reads a label cache written by
``vlmprune train explain`` (``<stem>.labels.pt``) that holds more train-split samples than the
training pool: records ``[0, --pool)`` are split as the trainer splits them (train / val), the
correctly answered records from ``--pool`` on are the test set. Each variant is either a
checkpoint (``{"name": ..., "checkpoint": PATH}``) or an :class:`ExplainTrainConfig` to train
here (``{"name": ..., "loss": "ranks", "channels": [16, 32, 64, 128, 256], "epochs": 12}``).

    vlmprune train explain --model demo --samples 1600 --epochs 1 --out /tmp/s/cnn.pt  # labels 0..1599
    python bench/explain_study.py /tmp/s/cnn.labels.pt out.json \\
        '[{"name": "shipped", "checkpoint": "vlmprune/testbed/models/demo/vlmprune_explain_cnn.pt"}]'
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from vlmprune.core.explain import RelevanceCNN
    from vlmprune.testbed import train_explain as TE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", help="a label cache of vlmprune train explain")
    parser.add_argument("out", help="JSON file; variants already in it are kept")
    parser.add_argument("variants", help="JSON list of variants (see the module doc)")
    parser.add_argument("--pool", type=int, default=1200, help="records used for training (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = torch.load(args.labels, map_location="cpu", weights_only=True)["records"]
    use = lambda rows: [r for r in rows if r["correct"] and r["teacher"] is not None]  # noqa: E731
    pool, test = use(records[: args.pool]), use(records[args.pool :])
    if not test:
        raise SystemExit(f"no test records: the cache has {len(records)} records, --pool is {args.pool}")
    order = list(range(len(pool)))
    random.Random(0).shuffle(order)  # train_explain's split (seed 0)
    n_val = max(1, round(TE.VAL_FRACTION * len(pool))) if len(pool) >= 2 else 0
    val = [(pool[i]["student"], pool[i]["teacher"]) for i in order[:n_val]]
    train = [(pool[i]["student"], pool[i]["teacher"]) for i in order[n_val:]]
    xs, teachers = [r["student"] for r in test], [r["teacher"] for r in test]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for variant in json.loads(args.variants):
        variant = dict(variant)
        name = variant.pop("name")
        extra: dict = {}
        if "checkpoint" in variant:
            model = RelevanceCNN.load(variant["checkpoint"])
            extra["checkpoint"] = variant["checkpoint"]
        else:
            channels = tuple(variant.get("channels", TE.ExplainTrainConfig.channels))
            cfg = TE.ExplainTrainConfig(**{**variant, "channels": channels})
            t = time.time()
            model, fit = TE.train_student(train, val, cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
            extra = {"config": variant, "train_s": round(time.time() - t, 1), "best_epoch": fit["best_epoch"]}
        metrics = TE.evaluate_student(model, xs, teachers, [TE.teacher_target(t) for t in teachers], 64)
        results[name] = {**extra, "test_samples": len(test), **{k: round(v, 4) for k, v in metrics.items()}}
        out.write_text(json.dumps(results, indent=1))
        print(name, {k: results[name][k] for k in ("top50_recall", "top25_recall", "top10_recall", "top5_recall")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
