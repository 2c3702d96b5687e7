"""FasterVLM selection: exact counts, raster order, per-view budgets (as the official code), non-prunable tokens kept."""

from __future__ import annotations

import pytest
import torch

from vlmprune.core import fastervlm
from vlmprune.policy import kept_count, view_kept_counts


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


def test_groups_budget_each_view_by_itself():
    """LLaVA-NeXT views: 8 base + 2 crops of 12, budgets (2, 3, 3): each view keeps its own top-k,
    whatever the other views score; newlines kept."""
    groups = torch.tensor([0] * 8 + [1] * 12 + [2] * 12 + [-1] * 4)
    prunable = groups >= 0
    scores = torch.cat([torch.linspace(10, 11, 8), torch.linspace(0, 1, 12), torch.linspace(-5, -4, 12), torch.zeros(4)])
    red = fastervlm.reduce(scores, prunable, [2, 3, 3], groups=groups)
    kept_groups = groups[red.index]
    assert [int((kept_groups == g).sum()) for g in (0, 1, 2, -1)] == [2, 3, 3, 4]
    assert red.index[kept_groups == 0].tolist() == [6, 7]  # top-2 inside the base view
    assert red.index[kept_groups == 1].tolist() == [17, 18, 19]
    assert red.index[kept_groups == 2].tolist() == [29, 30, 31]  # the lowest scores overall, still kept


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


def _next_layout(side: int, crop_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-NeXT's packed order without padding: thumbnail patches, then the stitched crop grid row
    by row with a newline after each row. Returns (view (n,): 0 thumbnail, 1 + k crop k, -1
    newline; patch (n,): the patch index inside its view)."""
    rows, cols = crop_grid
    view, patch = [0] * side * side, list(range(side * side))
    for r in range(rows * side):
        for c in range(cols * side):
            view.append(1 + (r // side) * cols + c // side)
            patch.append((r % side) * side + c % side)
        view.append(-1)
        patch.append(-1)
    return torch.tensor(view), torch.tensor(patch)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.95])
def test_per_view_selection_equals_the_official_code_on_672px(ratio):
    """A 672x672 LLaVA-NeXT image (thumbnail + 2x2 crops of 24x24, no padding): the same kept set
    as the official FasterVLM code, which takes ``torch.topk`` of each view's 576 scores with
    ``T = round(576 (1 - r))`` (144 / 58 / 29 at .75 / .9 / .95 per view, 5 T in all)."""
    torch.manual_seed(int(ratio * 100))
    side, views = 24, 5
    official_scores = torch.rand(views, side * side)  # (V, P), distinct values: no ties
    t = round(side * side * (1 - ratio) + 1e-9)
    official = torch.zeros(views, side * side, dtype=torch.bool)
    official.scatter_(1, torch.topk(official_scores, k=t, dim=1).indices, True)  # the official mask, (V, P)

    view, patch = _next_layout(side, (2, 2))
    prunable = view >= 0
    scores = torch.where(prunable, official_scores[view.clamp_min(0), patch.clamp_min(0)], 0.0)
    sizes = [int((view == v).sum()) for v in range(views)]
    budgets = view_kept_counts(sizes, ratio)
    assert budgets == [t] * views
    red = fastervlm.reduce(scores, prunable, budgets, groups=view)
    kept = torch.zeros_like(official)
    mine = red.index[prunable[red.index]]
    kept[view[mine], patch[mine]] = True
    assert torch.equal(kept, official)
    assert red.count == views * t + 2 * side  # every newline kept


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9, 0.95])
def test_groups_exact_count(ratio):
    """Per-view budgets: the count is the sum of every view's kept_count; each view keeps its own."""
    torch.manual_seed(3)
    groups = torch.tensor([0] * 36 + [1] * 100 + [2] * 30 + [-1] * 10)[torch.randperm(176)]
    prunable = groups >= 0
    budgets = view_kept_counts([36, 100, 30], ratio)
    red = fastervlm.reduce(torch.randn(176), prunable, budgets, groups=groups)
    assert red.count == sum(budgets) + 10
    assert [int((groups[red.index] == g).sum()) for g in range(3)] == budgets
