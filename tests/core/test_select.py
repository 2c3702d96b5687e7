"""Shared selection primitives."""

import pytest
import torch

from vlmprune.core.select import TokenReduction, allocate_exact, topk_sorted


def test_topk_sorted_is_raster_ordered_and_stable():
    """Top-k comes back in ascending index order; ties go to the lower index."""
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert topk_sorted(scores, 2).tolist() == [1, 3]
    assert topk_sorted(scores, 3).tolist() == [1, 2, 3]
    assert topk_sorted(torch.zeros(4), 2).tolist() == [0, 1]
    batched = torch.stack([scores, scores.flip(0)])
    assert topk_sorted(batched, 2).tolist() == [[1, 3], [1, 3]]
    assert topk_sorted(scores, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        topk_sorted(scores, 6)


@pytest.mark.parametrize("total", [0, 1, 7, 50, 99, 100])
def test_allocate_exact_sums_and_respects_capacity(total):
    """Budgets sum exactly to the total and never exceed a group's capacity."""
    weights = torch.tensor([5.0, 1.0, 0.0, 3.0])
    cap = torch.tensor([10, 60, 20, 10])
    b = allocate_exact(total, weights, cap)
    assert int(b.sum()) == total
    assert bool((b <= cap).all()) and bool((b >= 0).all())


def test_allocate_exact_proportional_hand_example():
    """10 over weights 1:1:2 -> 2.5, 2.5, 5 -> the tie on .5 goes to the first group: 3, 2, 5."""
    assert allocate_exact(10, torch.tensor([1.0, 1.0, 2.0])).tolist() == [3, 2, 5]
    with pytest.raises(ValueError):
        allocate_exact(5, torch.ones(2), torch.tensor([2, 2]))


def test_token_reduction_apply():
    x = torch.arange(12.0).view(6, 2)
    r = TokenReduction(index=torch.tensor([1, 4]))
    assert torch.equal(r.apply(x), x[[1, 4]])
    merged = TokenReduction(index=torch.tensor([0]), features=torch.ones(1, 2))
    assert torch.equal(merged.apply(x), torch.ones(1, 2))
    assert TokenReduction.identity(3).index.tolist() == [0, 1, 2]
