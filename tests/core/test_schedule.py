"""Progressive schedules and their scaling to a layer-averaged ratio."""

import pytest

from vlmprune.core.schedule import (
    Stage,
    aim_stages,
    keep_at_layer,
    layer_average_keep,
    scale_to_ratio,
    stage_counts,
    transprune_stages,
)


def test_transprune_paper_schedule_on_32_layers():
    """576 tokens in layers 1-7, 504 in 8-9, 360 in 10-12, 72 after: ratio 1 - 13.125/32."""
    stages = transprune_stages(32)
    assert stages == [Stage(7, 0.875), Stage(9, 0.625), Stage(12, 0.125)]
    assert 1 - layer_average_keep(stages, 32) == pytest.approx(1 - 13.125 / 32)
    counts = stage_counts(scale_to_ratio(stages, 32, 1 - 13.125 / 32), 576)
    assert counts == [(0, 576), (7, 504), (9, 360), (12, 72)]


@pytest.mark.parametrize("layers", [4, 12, 32])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 0.95])
@pytest.mark.parametrize("kind", ["transprune", "aim"])
def test_scaled_schedules_meet_the_ratio(kind, ratio, layers):
    """The scaled schedule's layer-averaged removed fraction equals the requested ratio."""
    stages = transprune_stages(layers) if kind == "transprune" else aim_stages(layers, 0.4375)
    scaled = scale_to_ratio(stages, layers, ratio)
    assert 1 - layer_average_keep(scaled, layers) == pytest.approx(ratio, abs=1e-9)
    keeps = [s.keep for s in scaled]
    assert all(0 <= k <= 1 for k in keeps)
    assert keeps == sorted(keeps, reverse=True)


def test_ratio_zero_prunes_nothing_and_high_ratio_prunes_at_input():
    stages = transprune_stages(32)
    assert all(k == 576 for _, k in stage_counts(scale_to_ratio(stages, 32, 0.0), 576))
    scaled = scale_to_ratio(stages, 32, 0.9)
    assert scaled[0].layer == 0 and scaled[0].keep < 1
    assert keep_at_layer(scaled, 0) == scaled[0].keep


def test_aim_schedule_shape():
    """AIM: merge stage at the input, 12.5 % steps of the merged count, nothing after layer 21."""
    stages = aim_stages(32, 0.4375)
    assert stages[0] == Stage(0, 0.4375)
    assert stages[-1] == Stage(21, 0.0, may_empty=True)
    assert stage_counts(stages, 576)[0] == (0, 252)
    assert stage_counts(stages, 576)[-1] == (21, 0)


def _official_aim_visual_per_layer(num_layers: int, start: int, n_merged: int) -> list[int]:
    """Visual tokens entering each decoder layer under the official AIM code: after (0-based) layer
    ``i >= start`` it keeps ``int(n * retain_rate[i])``, ``retain_rate[i] = max(0, 1 - (i - start + 1)
    * 0.125)`` (``start`` = 13 in the Vicuna code, 14 in the Qwen2 / Qwen2-VL code)."""
    rate = [max(0, 1.0 - (i - start + 1) * 0.125) if i >= start else 1.0 for i in range(num_layers)]
    return [n_merged] + [int(n_merged * rate[i]) for i in range(num_layers - 1)]


@pytest.mark.parametrize(("layers", "start"), [(32, 13), (28, 14)], ids=["vicuna-32", "qwen-28"])
def test_aim_schedule_equals_the_official_retain_rate(layers, start):
    """At the paper's own ratio, every decoder layer sees the official count of visual tokens (576
    merged to 252), within the documented rounding (round half up vs ``int``: at most 1 token), and
    none from the last stage on; at the nearest policy ratio the last stage still keeps none."""
    from vlmprune.core.schedule import counts_per_layer
    from vlmprune.policy import bucket_ratio

    stages = aim_stages(layers, 0.4375)
    paper_ratio = 1 - layer_average_keep(stages, layers)
    official = _official_aim_visual_per_layer(layers, start, 252)
    for ratio in (paper_ratio, bucket_ratio(paper_ratio)):
        counts = stage_counts(scale_to_ratio(stages, layers, ratio), 576)
        ours = counts_per_layer(counts, 576, layers)
        assert [layer for layer, _ in counts] == [0, *range(start + 1, start + 9)]
        assert all(abs(a - b) <= (1 if ratio == paper_ratio else 3) for a, b in zip(ours, official)), (ours, official)
        assert ours[start + 8 :] == official[start + 8 :] == [0] * (layers - start - 8)


def test_counts_per_layer_follows_the_stages():
    """Each layer sees the count of the last stage at or before it; layers before any stage see all."""
    from vlmprune.core.schedule import counts_per_layer

    assert counts_per_layer([(2, 5), (3, 1)], 9, 5) == [9, 9, 5, 1, 1]
    assert counts_per_layer([(0, 4)], 9, 2) == [4, 4]
    assert counts_per_layer([], 9, 2) == [9, 9]
