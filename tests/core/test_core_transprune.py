"""TransPrune: token transition variation and the TTV + IGA combination."""

from __future__ import annotations

import math

import pytest
import torch

from vlmprune.core import transprune


def test_ttv_hand_example():
    """in (1,0),(1,0); out (2,0),(0,1): m = (2, 1); 1-cos = (0, 1) -> softmax (1, e)/(1+e).

    TTV = (2/(1+e), e/(1+e)) = (.53788, .73106).
    """
    x_in = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x_out = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    e = math.e
    expected = torch.tensor([2 / (1 + e), e / (1 + e)])
    torch.testing.assert_close(transprune.transition_variation(x_in, x_out), expected)


def test_ttv_abs_direction():
    """A sign flip (cos -1) is maximal change for 1-cos (2) and none for 1-|cos| (0).

    in (1,0),(1,0); out (-1,0),(0,1): m = (1, 1).
    1-cos = (2, 1) -> softmax (e^2, e)/(e^2+e); 1-|cos| = (0, 1) -> (1, e)/(1+e).
    """
    x_in = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x_out = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    e = math.e
    torch.testing.assert_close(
        transprune.transition_variation(x_in, x_out), torch.tensor([e**2, e]) / (e**2 + e)
    )
    torch.testing.assert_close(
        transprune.transition_variation(x_in, x_out, "one_minus_abs_cos"), torch.tensor([1.0, e]) / (1 + e)
    )
    with pytest.raises(ValueError, match="direction"):
        transprune.transition_variation(x_in, x_out, "cos")


def test_combine_hand_example():
    """ttv (1, 3) -> (.25, .75); iga (2, 2) -> (.5, .5); sum (.75, 1.25)."""
    iga = torch.tensor([2.0, 2.0])
    torch.testing.assert_close(transprune.combine(torch.tensor([1.0, 3.0]), iga), torch.tensor([0.75, 1.25]))


def test_combine_without_ttv_is_iga():
    """No TTV yet (None or all zeros): the normalised IGA alone."""
    iga = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(transprune.combine(None, iga), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(transprune.combine(torch.zeros(2), iga), torch.tensor([0.25, 0.75]))


def test_reduce_sorted():
    """Top-k of the combined score, ascending."""
    assert transprune.reduce(torch.tensor([0.2, 0.9, 0.8, 0.1, 0.5]), 3).tolist() == [1, 2, 4]
