"""Explainability compressor: CNN shapes on any N, save/load, labels, KL loss, training signal."""

from __future__ import annotations

import math

import pytest
import torch

from vlmprune.core import explain
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig


@pytest.mark.parametrize("n", [7, 64, 300])
def test_cnn_any_length(n):
    """Fully convolutional: (B, N) -> (B, N) log-probs summing to 1, for N unseen in training."""
    torch.manual_seed(0)
    model = RelevanceCNN()
    attn = torch.rand(2, n)
    out = model(attn)
    assert out.shape == (2, n)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))
    rel = model.relevance(attn[0])
    assert rel.shape == (n,)
    torch.testing.assert_close(rel, out[0].exp())


def test_padding_mask():
    """A padded batch row gives the same distribution as the unpadded sample; padding gets 0."""
    torch.manual_seed(0)
    model = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3)).eval()
    a = torch.rand(10)
    batch = torch.zeros(2, 14)
    batch[0, :10], batch[1] = a, torch.rand(14)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 10:] = False
    out = model(batch, mask)
    assert torch.all(out[0, 10:].exp() == 0)
    # Zero padding enters the convolutions at the boundary exactly like the conv's own zero padding.
    torch.testing.assert_close(out[0, :10], model(a[None])[0], atol=1e-5, rtol=1e-4)


def test_save_load_roundtrip(tmp_path):
    """Config and weights come back from one file loaded with weights_only=True."""
    torch.manual_seed(0)
    model = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16, 32), kernel_size=3))
    path = tmp_path / "cnn.pt"
    model.save(path)
    loaded = RelevanceCNN.load(path)
    assert loaded.config == model.config
    attn = torch.rand(1, 40)
    torch.testing.assert_close(loaded(attn), model(attn))


def test_teacher_target_hand_example():
    """Relevance (.1, .4, .2, .3), keep half -> (0, .4, 0, .3) / .7."""
    target = explain.teacher_target(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    torch.testing.assert_close(target, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    batched = explain.teacher_target(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(batched[1].sum(), torch.tensor(1.0))  # all-zero row -> uniform on kept


def test_kl_loss_hand_example():
    """target (.5, .5, 0), prediction (.25, .25, .5): KL = 2 * .5 * ln(.5/.25) = ln 2."""
    log_probs = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    target = torch.tensor([[0.5, 0.5, 0.0]])
    torch.testing.assert_close(explain.kl_loss(log_probs, target), torch.tensor(math.log(2)))
    torch.testing.assert_close(explain.kl_loss(torch.log(target.clamp_min(1e-30)), target), torch.tensor(0.0))


def test_training_reduces_loss():
    """A few Adam steps on one batch lower the KL to the teacher labels (gradients flow)."""
    torch.manual_seed(0)
    model = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3))
    attn = torch.rand(4, 32)
    target = explain.teacher_target(attn.roll(1, dims=1))  # learnable: a shifted copy of the input's top half
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = explain.kl_loss(model(attn), target).item()
    for _ in range(30):
        opt.zero_grad()
        loss = explain.kl_loss(model(attn), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_reduce_sorted():
    """Top-k relevance, ascending."""
    assert explain.reduce(torch.tensor([0.1, 0.5, 0.2, 0.6]), 2).tolist() == [1, 3]


def test_grid_cnn_convolves_over_the_patch_grid(tmp_path):
    """With ``grid`` the blocks are 2-D: a patch's vertical neighbour (N/rows tokens away in the flat
    sequence) is inside one 3x3 block's reach, which the 1-D CNN's 3-wide kernel is not; the grid
    survives save/load; any other token count is a ValueError."""
    torch.manual_seed(0)
    grid_model = RelevanceCNN(RelevanceCNNConfig(channels=(4, 8), kernel_size=3, grid=(6, 5))).eval()
    flat_model = RelevanceCNN(RelevanceCNNConfig(channels=(4, 8), kernel_size=3)).eval()
    delta = torch.zeros(30)
    delta[2 * 5 + 2] = 1.0  # patch (2, 2)
    with torch.no_grad():
        g = grid_model.blocks[0](delta.reshape(1, 1, 6, 5))[0]  # (C, 6, 5)
        f = flat_model.blocks[0](delta.reshape(1, 1, 30))[0].reshape(-1, 6, 5)
    far = g[:, 5, 4]
    assert not torch.allclose(g[:, 1, 2], far)  # the patch above: reached in 2-D
    assert torch.allclose(f[:, 1, 2], f[:, 5, 4])  # 5 tokens away in 1-D: not reached
    rel = grid_model.relevance(torch.rand(30))
    assert rel.shape == (30,) and abs(float(rel.sum()) - 1) < 1e-5
    grid_model.save(tmp_path / "g.pt")
    loaded = RelevanceCNN.load(tmp_path / "g.pt")
    assert loaded.config.grid == (6, 5)
    x = torch.rand(30)
    assert torch.allclose(loaded.relevance(x), grid_model.relevance(x))
    with pytest.raises(ValueError, match="grid"):
        grid_model.relevance(torch.rand(31))


def test_rank_levels_and_rank_target_hand_example():
    """8 tokens, cuts 50 % / 25 %: the top 2 are in both cuts (level 2), the next 2 in one; the
    staircase label is the mean of uniform(top 4) and uniform(top 2)."""
    rel = torch.tensor([0.0, 0.9, 0.1, 0.5, 0.2, 0.05, 0.3, 0.01])  # order: 1, 3, 6, 4, ...
    levels = explain.rank_levels(rel, cuts=(0.5, 0.25))
    assert levels.tolist() == [0, 2, 0, 2, 1, 0, 1, 0]
    target = explain.rank_target(rel, cuts=(0.5, 0.25))
    want = torch.tensor([0, 3 / 8, 0, 3 / 8, 1 / 8, 0, 1 / 8, 0])
    torch.testing.assert_close(target, want)
    assert explain.rank_target(rel[None].repeat(3, 1)).shape == (3, 8)  # batched, default cuts
    with pytest.raises(ValueError, match="cuts"):
        explain.rank_levels(rel, cuts=(0.0,))


def test_pairwise_loss_orders_kept_above_dropped():
    """The loss is small when every kept token outscores every dropped one, large when reversed,
    ignores padding (level < 0) and gives gradients that raise the kept tokens' scores."""
    levels = torch.tensor([[2.0, 1.0, 0.0, 0.0, -1.0]])
    good = torch.tensor([[10.0, 5.0, 0.0, 0.0, float("-inf")]])
    bad = torch.tensor([[0.0, 0.0, 5.0, 10.0, float("-inf")]])
    gen = torch.Generator().manual_seed(0)
    assert explain.pairwise_loss(good, levels, generator=gen) < 0.01
    assert explain.pairwise_loss(bad, levels, generator=gen) > 4.0
    scores = torch.zeros(1, 5, requires_grad=True)
    explain.pairwise_loss(scores, levels.clone()).backward()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 2] > 0 and scores.grad[0, 4] == 0  # descent raises kept
    with pytest.raises(ValueError, match="shape"):
        explain.pairwise_loss(good, levels[:, :4])


def test_ranking_losses_train_the_cnn():
    """A few Adam steps with either ranking objective make the CNN recover a learnable teacher
    order (a shifted copy of its input) better than it did untrained."""
    from vlmprune.testbed.train_explain import topk_recall

    for loss in ("ranks", "pairwise"):
        torch.manual_seed(0)
        model = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3))
        attn = torch.rand(8, 40)
        teacher = attn.roll(2, dims=1)
        before = sum(topk_recall(model(attn)[i], teacher[i], 0.25) for i in range(8)) / 8
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            if loss == "ranks":
                objective = explain.kl_loss(model(attn), explain.rank_target(teacher))
            else:
                objective = explain.pairwise_loss(model(attn), explain.rank_levels(teacher))
            objective.backward()
            opt.step()
        after = sum(topk_recall(model(attn)[i].detach(), teacher[i], 0.25) for i in range(8)) / 8
        assert after > before + 0.2 and after > 0.6, (loss, before, after)
