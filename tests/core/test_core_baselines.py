"""Baselines: seeded random subset and exact-count spatial pooling."""

from __future__ import annotations

import pytest
import torch

from vlmprune.core.baselines import pool_reduce, random_reduce
from vlmprune.policy import kept_count


def test_random_deterministic_per_seed():
    """Same seed -> same subset; different seeds -> different subsets (576 choose 58)."""
    prunable = torch.ones(576, dtype=torch.bool)
    a = random_reduce(prunable, 58, seed=0)
    b = random_reduce(prunable, 58, seed=0)
    c = random_reduce(prunable, 58, seed=1)
    assert a.index.tolist() == b.index.tolist()
    assert a.index.tolist() != c.index.tolist()


@pytest.mark.parametrize("keep", [0, 1, 10, 17])
def test_random_keeps_non_prunable(keep):
    """count = keep + non-prunable; non-prunable always present; ascending."""
    prunable = torch.ones(20, dtype=torch.bool)
    prunable[[0, 5, 19]] = False
    red = random_reduce(prunable, keep, seed=3)
    assert red.count == keep + 3
    assert {0, 5, 19} <= set(red.index.tolist())
    assert torch.all(red.index[1:] > red.index[:-1])


@pytest.mark.parametrize("keep", [144, 58, 29, 1])
def test_pool_llava_counts(keep):
    """24x24 -> exactly keep outputs, unique ascending representatives."""
    red = pool_reduce(torch.randn(576, 4), (24, 24), keep)
    assert red.count == keep and red.features.shape == (keep, 4)
    assert torch.all(red.index[1:] > red.index[:-1])


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (5, 9), (12, 7), (24, 24)], ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
def test_pool_exact_counts(grid, ratio):
    """Any grid, any ratio: exact count, representatives unique, ascending, inside the grid."""
    n = grid[0] * grid[1]
    keep = kept_count(n, ratio)
    red = pool_reduce(torch.randn(n, 2), grid, keep)
    assert red.count == keep
    assert torch.all(red.index[1:] > red.index[:-1]) and int(red.index.max()) < n


def test_pool_constant_grid():
    """Pooling a constant grid returns the constant."""
    red = pool_reduce(torch.full((576, 3), 2.5), (24, 24), 58)
    torch.testing.assert_close(red.features, torch.full((58, 3), 2.5))


def test_pool_hand_example():
    """2x4 grid of 0..7, keep 2: one band, cells cols [0,2) and [2,4): means 2.5 and 4.5,
    centres (0, 0) and (0, 2)."""
    red = pool_reduce(torch.arange(8, dtype=torch.float32)[:, None], (2, 4), 2)
    assert red.index.tolist() == [0, 2]
    assert red.features[:, 0].tolist() == [2.5, 4.5]


def test_pool_identity():
    """keep == n returns the identity (no merged features)."""
    red = pool_reduce(torch.randn(6, 2), (2, 3), 6)
    assert red.features is None and red.index.tolist() == list(range(6))
