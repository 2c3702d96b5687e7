"""GlobalCom2: crop budgets (hand example, exact sums) and selection over a LLaVA-NeXT layout."""

from __future__ import annotations

import math

import pytest
import torch

from vlmprune.core import globalcom2
from vlmprune.policy import kept_count


def test_crop_budgets_hand_example():
    """Thumbnail 2x2 [[0, 10], [0, 10]] over crop grid (1, 2): S = (0, 20), tau 10.

    p = softmax((-2, 0)) = (.1192, .8808); R = 6 / 12 = .5;
    raw = thumb 2, crop0 .5 * (1 + .1192 - .5) * 4 = 1.238, crop1 .5 * 1.3808 * 4 = 2.762;
    largest remainder of (2, 1.238, 2.762) with total 6 -> (2, 1, 3).
    """
    thumb = torch.tensor([[0.0, 10.0], [0.0, 10.0]])
    t, crops = globalcom2.crop_budgets(thumb, (1, 2), torch.tensor([4, 4]), 4, total=6)
    assert t == 2
    assert crops.tolist() == [1, 3]


def test_crop_budgets_clip_at_capacity():
    """A crop whose raw share exceeds its capacity is clipped; the sum stays exact."""
    thumb = torch.tensor([[0.0, 1000.0]])
    t, crops = globalcom2.crop_budgets(thumb, (1, 2), torch.tensor([3, 3]), 2, total=7)
    assert t + int(crops.sum()) == 7
    assert int(crops[1]) <= 3 and t <= 2


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3)], ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 0.95])
def test_crop_budgets_sum_exactly(grid, ratio):
    """Budgets sum exactly to the total and never exceed any capacity."""
    torch.manual_seed(hash(grid) % 1000)
    gh, gw = grid
    thumb = torch.randn(6, 6) * 5
    cap = torch.randint(5, 17, (gh * gw,))
    n = 36 + int(cap.sum())
    total = kept_count(n, ratio)
    t, crops = globalcom2.crop_budgets(thumb, grid, cap, 36, total)
    assert t + int(crops.sum()) == total
    assert 0 <= t <= 36
    assert torch.all(crops <= cap) and torch.all(crops >= 0)


def _next_layout(base=(2, 2), crop_grid=(1, 1), crop_size=(4, 4)):
    """LLaVA-NeXT-like token layout: base view raster, then the stitched crop grid with a newline
    after each row. Returns view, crop, coords, view_shape."""
    rows0, cols0 = base
    gh, gw = crop_grid
    ch, cw = crop_size
    rows1, cols1 = gh * ch, gw * cw
    view, crop, coords = [], [], []
    for r in range(rows0):
        for c in range(cols0):
            view.append(0), crop.append(-1), coords.append((r, c))
    for r in range(rows1):
        for c in range(cols1):
            view.append(1), crop.append((r // ch) * gw + c // cw), coords.append((r, c))
        view.append(-1), crop.append(-1), coords.append((-1, -1))
    return (torch.tensor(view), torch.tensor(crop), torch.tensor(coords), [(rows0, cols0), (rows1, cols1)])


def test_reduce_global_guidance_hand_example():
    """alpha = 0: crop tokens ranked by the upsampled thumbnail alone, whatever their local score.

    Thumbnail [[1, 2], [3, 4]] bilinearly resized to 4x4 (align_corners=False):
    row 2 = (2.5, 2.75, 3.25, 3.5), row 3 = (3, 3.25, 3.75, 4). keep 5 of 20: R = .25,
    thumb budget 1 (score 4, base token 3), crop budget 4 -> (3,3)=4, (3,2)=3.75, (2,3)=3.5,
    (2,2)=3.25 (tie with (3,1), lower index wins). Sequence index of (r, c) = 4 + 5r + c;
    newlines at 8, 13, 18, 23.
    """
    view, crop, coords, shapes = _next_layout()
    scores = torch.zeros(view.shape[0])
    scores[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    crop_tokens = (view == 1).nonzero().squeeze(1)
    scores[crop_tokens] = -torch.arange(16, dtype=torch.float32)  # local order opposes the global one
    red = globalcom2.reduce(scores, view, crop, coords, shapes, (1, 1), keep=5, alpha=0.0)
    assert red.index.tolist() == [3, 8, 13, 16, 17, 18, 21, 22, 23]


def test_reduce_local_only():
    """alpha = 1: crop tokens ranked by their own crop-pass scores."""
    view, crop, coords, shapes = _next_layout()
    scores = torch.zeros(view.shape[0])
    scores[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    crop_tokens = (view == 1).nonzero().squeeze(1)
    scores[crop_tokens] = -torch.arange(16, dtype=torch.float32)  # first crop tokens score highest
    red = globalcom2.reduce(scores, view, crop, coords, shapes, (1, 1), keep=5, alpha=1.0)
    assert red.index.tolist() == [3, 4, 5, 6, 7, 8, 13, 18, 23]


@pytest.mark.parametrize("crop_grid", [(1, 2), (2, 1), (2, 2), (1, 3)], ids=str)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9, 0.95])
def test_reduce_counts_order_newlines(crop_grid, ratio):
    """count = keep + newlines; ascending; every newline kept; per-crop counts = crop_budgets."""
    torch.manual_seed(7)
    view, crop, coords, shapes = _next_layout(base=(4, 4), crop_grid=crop_grid, crop_size=(3, 3))
    n = view.shape[0]
    scores = torch.randn(n)
    prunable = view >= 0
    keep = kept_count(int(prunable.sum()), ratio)
    red = globalcom2.reduce(scores, view, crop, coords, shapes, crop_grid, keep)
    n_newlines = int((view == -1).sum())
    assert red.count == keep + n_newlines
    assert torch.all(red.index[1:] > red.index[:-1])
    assert set((view == -1).nonzero().squeeze(1).tolist()) <= set(red.index.tolist())
    thumb = scores[:16].view(4, 4)
    cap = torch.bincount(crop[view == 1], minlength=math.prod(crop_grid))
    t, budgets = globalcom2.crop_budgets(thumb, crop_grid, cap, 16, keep)
    kept_view, kept_crop = view[red.index], crop[red.index]
    assert int((kept_view == 0).sum()) == t
    for j in range(math.prod(crop_grid)):
        assert int(((kept_view == 1) & (kept_crop == j)).sum()) == int(budgets[j])
