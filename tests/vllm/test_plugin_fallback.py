"""The worker's fallback selection (vlmprune.vllm_plugin.fallback), on the core's real selection
functions; the engine-level behaviour is tested in test_plugin_survival.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlmprune.core.select import NonFiniteScoresError, topk_sorted
from vlmprune.reduction.stages import select_rows
from vlmprune.vllm_plugin import fallback


def test_nan_scores_cannot_be_ranked():
    with pytest.raises(NonFiniteScoresError, match="1 of 4 scores are NaN"):
        topk_sorted(torch.tensor([0.1, float("nan"), 0.3, 0.2]), 2)
    assert topk_sorted(torch.tensor([0.1, float("nan")]), 2).tolist() == [0, 1]  # keeping all ranks nothing


def test_evenly_spaced_keeps_every_fixed_row_and_spreads_the_rest():
    prunable = torch.ones(12, dtype=torch.bool)
    prunable[[3, 7]] = False  # e.g. LLaVA-NeXT newline rows
    got = fallback.evenly_spaced(prunable, 5).index.tolist()
    assert got == sorted(got) and {3, 7} <= set(got) and len(got) == 5
    assert fallback.evenly_spaced(prunable, 2).index.tolist() == [3, 7]
    assert fallback.evenly_spaced(torch.ones(9, dtype=torch.bool), 3).index.tolist() == [0, 4, 8]
    with pytest.raises(RuntimeError, match="the processor and the model disagree"):
        fallback.evenly_spaced(prunable, 1)  # fewer rows than the fixed ones
    with pytest.raises(RuntimeError, match="disagree"):
        fallback.evenly_spaced(prunable, 13)


def test_guarded_returns_the_reduction_or_the_fallback_and_its_error():
    item = SimpleNamespace(count=4, policy=SimpleNamespace(method="fastervlm"), trace=("t", 0))
    prunable = torch.ones(16, dtype=torch.bool)
    scores = torch.arange(16.0)
    fallback.read_failures()
    reduction, error = fallback.guarded(item, "llava", prunable, lambda: SimpleNamespace(index=topk_sorted(scores, 4)))
    assert error is None and reduction.index.tolist() == [12, 13, 14, 15]
    scores[5] = float("nan")
    reduction, error = fallback.guarded(item, "llava", prunable, lambda: SimpleNamespace(index=topk_sorted(scores, 4)))
    assert error.startswith("NonFiniteScoresError") and reduction.index.tolist() == [0, 5, 10, 15]
    assert [f["method"] for f in fallback.read_failures()] == ["fastervlm"] and fallback.read_failures() == []


def test_a_failing_in_llm_stage_keeps_evenly_spaced_rows_of_each_image():
    spans = [torch.arange(2, 10), torch.arange(12, 16)]  # two images among 18 rows
    scores = torch.full((18,), float("nan"))

    def scored():
        return select_rows(lambda rows, count: topk_sorted(scores[rows], count), spans, [4, 2], 18, "cpu")

    keep, new_spans = fallback.guarded_stage("req-1", "fastv", 0, scored,
                                             lambda: select_rows(fallback.evenly_spaced_choice, spans, [4, 2], 18, "cpu"))
    kept_visual = [int(r) for r in keep if 2 <= r < 10 or 12 <= r < 16]
    assert kept_visual == [2, 4, 7, 9, 12, 15] and len(keep) == 18 - 8 - 4 + 6
    assert [f["request"] for f in fallback.read_failures()] == ["req-1"]
