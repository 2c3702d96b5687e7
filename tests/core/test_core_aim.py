"""AIM: bipartite merging (group means, raster order, exact counts) and PageRank importance."""

from __future__ import annotations

import math

import pytest
import torch

from vlmprune.core import aim
from vlmprune.policy import kept_count


def test_bipartite_merge_pair():
    """A0 ~ B1 (cos 1), A2 ~ B3 (cos .8): r=1 merges token 0 into 1; r=2 also 2 into 3."""
    x = torch.tensor([[0.0], [2.0], [10.0], [20.0]])
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    feats, _, rep = aim.bipartite_merge(x, metric, 1)
    assert rep.tolist() == [1, 2, 3]
    assert feats[:, 0].tolist() == [1.0, 10.0, 20.0]
    feats, _, rep = aim.bipartite_merge(x, metric, 2)
    assert rep.tolist() == [1, 3]
    assert feats[:, 0].tolist() == [1.0, 15.0]


def test_merged_feature_is_plain_group_mean():
    """Two A tokens (0, 2) merged into B1 give mean(x0, x1, x2), no size weighting; metric too."""
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])
    feats, merged_metric, rep = aim.bipartite_merge(x, metric, 2)
    assert rep.tolist() == [1, 3, 4]
    torch.testing.assert_close(feats[0], x[:3].mean(0))
    torch.testing.assert_close(feats[1:], x[[3, 4]])
    torch.testing.assert_close(merged_metric[0], metric[:3].mean(0))


def test_bipartite_merge_rejects_too_many():
    """At most n // 2 tokens can go in one step."""
    with pytest.raises(ValueError, match="r must be"):
        aim.bipartite_merge(torch.zeros(5, 2), torch.zeros(5, 2), 3)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 37, 576])
@pytest.mark.parametrize("ratio", [0.0, 0.4375, 0.5, 0.75, 0.9, 0.99])
def test_merge_to_count_exact(n, ratio):
    """Exactly kept_count tokens remain; index unique and ascending; features (target, C)."""
    torch.manual_seed(n)
    target = kept_count(n, ratio)
    x, metric = torch.randn(n, 8), torch.randn(n, 4)
    red = aim.merge_to_count(x, metric, target)
    assert red.count == target
    assert torch.all(red.index[1:] > red.index[:-1])
    if target == n:
        assert red.features is None
    else:
        assert red.features.shape == (target, 8)
        assert int(red.index.max()) < n


def test_merge_to_count_composes_positions():
    """Two steps (8 -> 4 -> 2) on features that equal their position: each output stands for an
    original position, and with pairwise-identical metrics the merged value is its group's mean."""
    x = torch.arange(8, dtype=torch.float32)[:, None]
    # Tokens 2i and 2i+1 identical; pairs point in orthogonal-ish directions.
    dirs = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    metric = dirs.repeat_interleave(2, dim=0)
    red = aim.merge_to_count(x, metric, 4)
    assert red.index.tolist() == [1, 3, 5, 7]
    assert red.features[:, 0].tolist() == [0.5, 2.5, 4.5, 6.5]


def test_pagerank_hand_example():
    """2 heads, L=2, temperature 1, 2 iterations.

    head 0: M = [[1, 0], [.5, .5]];  v: (.5, .5) -> (.75, .25) -> (.875, .125)
    head 1: M = [[1, 0], [.25, .75]]; v: (.5, .5) -> (.625, .375) -> (.71875, .28125)
    importance = sqrt(mean_h v^2).
    """
    ninf = float("-inf")
    logits = torch.tensor([[[0.0, ninf], [0.0, 0.0]], [[0.0, ninf], [0.0, math.log(3)]]])
    imp = aim.pagerank_importance(logits, temperature=1.0, iterations=2)
    expected = torch.tensor(
        [math.sqrt((0.875**2 + 0.71875**2) / 2), math.sqrt((0.125**2 + 0.28125**2) / 2)]
    )
    torch.testing.assert_close(imp, expected)
    # Temperature divides the logits: logits * 0.1 at temperature 0.1 is the same computation.
    torch.testing.assert_close(aim.pagerank_importance(logits * 0.1, temperature=0.1, iterations=2), expected)


def test_prune_sorted_topk():
    """prune keeps the most important tokens, ascending."""
    assert aim.prune(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2).tolist() == [1, 3]
