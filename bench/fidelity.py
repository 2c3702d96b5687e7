"""What the issue-13 fidelity fixes change on the shipped testbed models (measurements for FIDELITY.md).

1. FasterVLM on ``demo-next``: per-view budgets (the official code: top ``T`` of the thumbnail and
   of every crop) vs the former joint crop budget (the crops competed for one share): per-crop
   counts and the overlap of the two kept sets.
2. AIM on ``demo``: merging the projector's input (CLIP features, the official code) vs merging the
   projected features: the same groups, the median relative difference of the merged values.
3. AIM's schedule on 28 layers: the official Qwen layers vs the former depth-scaled ones.

    python bench/fidelity.py [--samples 20]   # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def fastervlm_views(samples: int) -> dict:
    import torch

    from vlmprune.backends.hf import ReferenceBackend, Request
    from vlmprune.core import fastervlm
    from vlmprune.core.select import allocate_exact
    from vlmprune.policy import image_kept_count, view_kept_counts
    from vlmprune.reduction.image_tokens import CLS_ATTENTION
    from vlmprune.testbed import scenes
    from vlmprune.testbed.registry import resolve_model, scene_layout

    backend = ReferenceBackend.from_pretrained(resolve_model("demo-next"))
    size, scale = scene_layout(backend.model.config)
    out = {}
    for ratio in (0.75, 0.9):
        overlaps, crop_counts = [], []
        for i in range(samples):
            s = scenes.sample("test", i, scale)
            ((_, (im,)),) = backend.sequences([Request(s.question, [scenes.render(s.scene, size)])],
                                              frozenset({CLS_ATTENTION}))
            score, prunable, key = im.signals[CLS_ATTENTION], im.prunable.bool(), im.view_key()
            new = fastervlm.reduce(score, prunable, view_kept_counts(im.view_sizes, ratio), groups=key)
            # The former rule: one budget, split between the thumbnail and all crops by size.
            keep = image_kept_count(im.view_sizes, ratio)
            sizes = torch.tensor([im.view_sizes[0], sum(im.view_sizes[1:])])
            thumb, crops = allocate_exact(keep, sizes.double(), sizes).tolist()
            old = fastervlm.reduce(score, prunable, [thumb, crops], groups=key.clamp_max(1))
            a, b = set(new.index[prunable[new.index]].tolist()), set(old.index[prunable[old.index]].tolist())
            overlaps.append(len(a & b) / len(a))
            crop_counts.append([int((key[old.index] == v).sum()) for v in range(1, len(im.view_sizes))])
        out[str(ratio)] = {
            "per_view_budgets": view_kept_counts(im.view_sizes, ratio),
            "former_crop_counts_first_samples": crop_counts[:3],
            "kept_set_overlap_median": statistics.median(overlaps),
            "kept_set_overlap_min": min(overlaps),
        }
    return out


def aim_projector(samples: int) -> dict:
    import torch

    from vlmprune.backends.hf import ReferenceBackend, Request
    from vlmprune.core import aim
    from vlmprune.reduction.image_tokens import MERGE_METRIC, VISION_FEATURES
    from vlmprune.testbed import scenes
    from vlmprune.testbed.registry import resolve_model, scene_layout

    backend = ReferenceBackend.from_pretrained(resolve_model("demo"))
    size, scale = scene_layout(backend.model.config)
    rel = []
    with torch.no_grad():
        for i in range(samples):
            s = scenes.sample("test", i, scale)
            ((_, (im,)),) = backend.sequences([Request(s.question, [scenes.render(s.scene, size)])],
                                              frozenset({MERGE_METRIC, VISION_FEATURES}))
            keep = im.n_prunable * 7 // 16  # the paper's 576 -> 252 merge share
            official = aim.merge_to_count(im.signals[VISION_FEATURES], im.signals[MERGE_METRIC], keep)
            before = im.project(official.features)  # merge, then project
            after = aim.merge_to_count(im.features, im.signals[MERGE_METRIC], keep).features  # the former order
            diff = (after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)  # (keep,)
            rel += diff[diff > 1e-5].tolist()  # merged tokens (unmerged ones agree to rounding)
    return {"merged_value_rel_diff_median": statistics.median(rel), "merged_tokens_measured": len(rel)}


def aim_schedule() -> dict:
    from vlmprune.core import schedule

    qwen = schedule.aim_stages(28, 0.4375)
    former = [schedule.Stage(0, 0.4375)] + [
        schedule.Stage(schedule.depth_scaled_layer(13 + k, 28), 0.4375 * max(0.0, 1 - 0.125 * k)) for k in range(1, 9)
    ]
    return {
        "qwen28_prune_after_layers": [s.layer for s in qwen[1:]],
        "former_prune_after_layers": sorted({s.layer for s in former[1:]}),
        "qwen28_paper_ratio": 1 - schedule.layer_average_keep(qwen, 28),
        "former_paper_ratio": 1 - schedule.layer_average_keep(former, 28),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args(argv)
    result = {"aim_schedule": aim_schedule(), "aim_projector_demo": aim_projector(args.samples),
              "fastervlm_views_demo_next": fastervlm_views(args.samples)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
