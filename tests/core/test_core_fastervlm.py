"""FasterVLM selection: exact counts, raster order, per-view budgets, non-prunable tokens kept."""

from __future__ import annotations

import pytest
import torch

from vlmprune.core import fastervlm
from vlmprune.policy import kept_count


def test_hand_example():
    """Top-2 of (.1, .5, .3, .9, .2) are tokens 1 and 3, returned ascending."""
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2])
    red = fastervlm.reduce(scores, torch.ones(5, dtype=torch.bool), keep=2)
    assert red.index.tolist() == [1, 3]
    assert red.features is None


@pytest.mark.parametrize("n", [1, 7, 64, 576])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.995])
def test_exact_count_and_order(n, ratio):
    """count == kept_count(n, ratio); indices unique and ascending."""
    torch.manual_seed(n)
    keep = kept_count(n, ratio)
    red = fastervlm.reduce(torch.randn(n), torch.ones(n, dtype=torch.bool), keep)
    assert red.count == keep
    assert torch.all(red.index[1:] > red.index[:-1])


def test_non_prunable_always_kept():
    """Non-prunable tokens survive even with the lowest scores; count = keep + n_non_prunable."""
    torch.manual_seed(0)
    scores = torch.rand(20)
    prunable = torch.ones(20, dtype=torch.bool)
    prunable[[4, 9, 19]] = False
    scores[[4, 9, 19]] = -100.0
    red = fastervlm.reduce(scores, prunable, keep=5)
    assert red.count == 8
    assert {4, 9, 19} <= set(red.index.tolist())
    assert torch.all(red.index[1:] > red.index[:-1])


def test_groups_split_budget_per_view():
    """LLaVA-NeXT views: 8 base + 24 crop tokens, keep 8 -> 2 base + 6 crop, newlines kept.

    The base view holds the globally highest scores, but is only given its proportional share.
    """
    groups = torch.tensor([0] * 8 + [1] * 24 + [-1] * 4)
    prunable = groups >= 0
    scores = torch.cat([torch.linspace(10, 11, 8), torch.linspace(0, 1, 24), torch.zeros(4)])
    red = fastervlm.reduce(scores, prunable, keep=8, groups=groups)
    kept_groups = groups[red.index]
    assert int((kept_groups == 0).sum()) == 2
    assert int((kept_groups == 1).sum()) == 6
    assert int((kept_groups == -1).sum()) == 4
    assert red.index[(kept_groups == 0)].tolist() == [6, 7]  # top-2 inside the base view
    assert red.index[(kept_groups == 1)].tolist() == list(range(26, 32))


def test_keep_all_is_identity_and_bad_keep_rejected():
    """keep == n_prunable keeps everything; keep outside [0, n_prunable] raises ValueError."""
    prunable = torch.tensor([True, True, False])
    assert fastervlm.reduce(torch.zeros(3), prunable, 2).index.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="keep"):
        fastervlm.reduce(torch.zeros(3), prunable, 3)


def test_kept_indices_batched():
    """Batched top-k per row, ascending; matches the single-image reduce."""
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    idx = fastervlm.kept_indices(scores, 12)
    assert idx.shape == (3, 12)
    for b in range(3):
        single = fastervlm.reduce(scores[b], torch.ones(50, dtype=torch.bool), 12)
        assert idx[b].tolist() == single.index.tolist()


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9, 0.95])
def test_groups_exact_count(ratio):
    """Per-view budgets sum exactly to keep; each view's share follows its prunable count."""
    torch.manual_seed(3)
    groups = torch.tensor([0] * 36 + [1] * 130 + [-1] * 10)[torch.randperm(176)]
    prunable = groups >= 0
    keep = kept_count(166, ratio)
    red = fastervlm.reduce(torch.randn(176), prunable, keep, groups=groups)
    assert red.count == keep + 10
    base_kept = int((groups[red.index] == 0).sum())
    assert abs(base_kept - keep * 36 / 166) <= 1
