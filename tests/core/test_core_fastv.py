"""FastV's pure functions: query rows, attention received, top-k selection, its one-stage schedule."""

import pytest
import torch

from vlmprune.core import fastv
from vlmprune.core.schedule import (
    Stage,
    counts_per_layer,
    fastv_layer,
    fastv_max_ratio,
    fastv_stages,
    layer_average_keep,
    stage_counts,
)


def test_query_rows_last_token_or_instruction():
    assert fastv.query_rows("last", 9).tolist() == [8]
    assert fastv.query_rows("instruction", 9, torch.tensor([5, 6, 7, 8])).tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="query must be one of"):
        fastv.query_rows("first", 9)
    with pytest.raises(ValueError, match="non-empty"):
        fastv.query_rows("instruction", 9, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        fastv.query_rows("instruction", 9, torch.tensor([7, 9]))


def test_attention_scores_are_the_head_and_row_mean():
    """Hand-checked: two heads, one row: the mean over heads; two rows: also over rows."""
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.0, 0.5, 0.5, 0.0]]])  # (H=2, t=1, L=4)
    assert torch.allclose(fastv.attention_scores(probs), torch.tensor([0.05, 0.35, 0.4, 0.2]))
    two_rows = torch.tensor([[[1.0, 0.0, 0.0], [0.2, 0.2, 0.6]]])  # (H=1, t=2, L=3)
    assert torch.allclose(fastv.attention_scores(two_rows), torch.tensor([0.6, 0.1, 0.3]))
    assert torch.allclose(fastv.attention_scores(torch.tensor([0.7, 0.3])), torch.tensor([0.7, 0.3]))
    with pytest.raises(ValueError, match=r"\(H, t, L\)"):
        fastv.attention_scores(torch.zeros(1, 1, 1, 4))


def test_logits_go_through_a_per_head_softmax_first():
    """logits=True equals softmax per head and row, then the mean; masked keys (-inf) get 0."""
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5)
    logits[:, 0, 4] = float("-inf")  # row 0 cannot see key 4
    expected = logits.softmax(dim=-1).mean(dim=(0, 1))
    got = fastv.attention_scores(logits, logits=True)
    assert torch.allclose(got, expected)
    assert float(fastv.attention_scores(logits[:, :1], logits=True)[4]) == 0.0


def test_selection_is_top_k_of_the_last_row_attention():
    """On a full causal attention matrix, FastV keeps the image columns the last row attends most."""
    torch.manual_seed(1)
    h, length = 4, 12
    logits = torch.randn(h, length, length).masked_fill(~torch.ones(length, length).tril().bool(), float("-inf"))
    probs = logits.softmax(dim=-1)  # (H, L, L), what an eager layer returns
    image = torch.arange(3, 9)  # the image's columns
    scores = fastv.attention_scores(probs[:, fastv.query_rows("last", length)])[image]
    kept = fastv.select(scores, 2)
    by_hand = probs[:, -1, 3:9].mean(dim=0)
    assert kept.tolist() == sorted(by_hand.argsort(descending=True)[:2].tolist())


def test_select_ascending_ties_to_the_lower_index_and_bounds():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.5, 0.0])
    assert fastv.select(scores, 2).tolist() == [1, 3]  # three tied at 0.5: the two lowest indices
    assert fastv.select(scores, 4).tolist() == [1, 2, 3, 4]
    assert fastv.select(scores, 0).tolist() == []
    assert fastv.select(scores, 6).tolist() == list(range(6))
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        fastv.select(scores, 7)
    with pytest.raises(ValueError, match=r"\(n,\)"):
        fastv.select(scores[None], 1)


@pytest.mark.parametrize("layers,expected", [(2, 1), (4, 1), (12, 1), (24, 2), (28, 2), (32, 2), (40, 2), (64, 4)])
def test_fastv_layer_depth_scales_the_papers_k(layers, expected):
    """K = 2 of 32 layers, scaled (round) and kept in [1, N-1]; the demo's 4-layer LM prunes after layer 1."""
    assert fastv_layer(layers) == expected


def test_fastv_layer_explicit_and_out_of_range():
    assert fastv_layer(4, 3) == 3
    for bad in (0, 4, 7):
        with pytest.raises(ValueError, match=r"\[1, 3\]"):
            fastv_layer(4, bad)
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        fastv_layer(1)


@pytest.mark.parametrize("layers", [4, 28, 32])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.7])
def test_fastv_stage_meets_the_layer_averaged_ratio(layers, ratio):
    """One stage after K (no pruning before it); its keep makes the layer average 1 - ratio."""
    stages = fastv_stages(layers, ratio)
    assert [s.layer for s in stages] == [0, fastv_layer(layers)]
    assert stages[0] == Stage(0, 1.0)
    assert layer_average_keep(stages, layers) == pytest.approx(1.0 - ratio)


def test_fastv_stage_clamps_above_the_reachable_ratio():
    """Ratios beyond (N-K)/N empty the image after K; the achieved ratio is that maximum."""
    assert fastv_max_ratio(32) == pytest.approx(30 / 32)
    assert fastv_max_ratio(4) == pytest.approx(0.75)
    for ratio in (0.75, 0.9, 0.95):
        stages = fastv_stages(4, ratio)
        assert stages[1] == Stage(1, 0.0)
        assert 1 - layer_average_keep(stages, 4) == pytest.approx(0.75)
    assert stage_counts(fastv_stages(4, 0.9), 16) == [(0, 16), (1, 0)]
    assert stage_counts(fastv_stages(32, 0.9), 576) == [(0, 576), (2, 23)]  # 576 * 0.04 = 23.04
    assert stage_counts(fastv_stages(32, 0.95), 576) == [(0, 576), (2, 0)]
    with pytest.raises(ValueError, match="ratio"):
        fastv_stages(32, 1.0)


def test_fastv_counts_per_layer_on_the_papers_setting():
    """LLaVA-1.5 (32 layers, 576 tokens) at ratio 0.5: layers 0-1 see 576, layers 2-31 see 269."""
    counts = stage_counts(fastv_stages(32, 0.5), 576)
    assert counts_per_layer(counts, 576, 32) == [576, 576] + [269] * 30
