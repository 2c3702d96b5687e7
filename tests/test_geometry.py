"""Visual-token counts from config files alone agree with the real processors."""

from __future__ import annotations

import pytest

from vlmprune.geometry import ImageTokenCounts, ModelVisionSpec
from vlmprune.reduction.anyres import crop_view_sizes
from vlmprune.policy import kept_count
from vlmprune.testbed import tiny

SIZES = [(84, 84), (96, 64), (64, 96), (112, 112), (150, 60), (57, 113), (200, 200)]


def _processor_count(processor, image) -> int:
    """Image placeholder tokens the transformers processor puts in the prompt for one image."""
    tok = processor.tokenizer
    if hasattr(processor, "image_token") and processor.image_token in tok.get_vocab():
        image_token = processor.image_token
    else:
        image_token = "<|image_pad|>"
    text = (image_token if image_token != "<|image_pad|>" else "<|vision_start|><|image_pad|><|vision_end|>") + " what"
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    return ids.count(tok.convert_tokens_to_ids(image_token))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_counts_match_the_transformers_processor(family, tmp_path):
    """For every family and several sizes/aspects: total = what the processor emits."""
    builder = {"llava": tiny.build_llava, "llava_next": tiny.build_llava_next,
               "qwen2_vl": tiny.build_qwen2_vl, "qwen2_5_vl": tiny.build_qwen2_5_vl}[family]
    model, processor = builder(tmp_path / "build")
    processor.save_pretrained(tmp_path / "saved")
    model.config.save_pretrained(tmp_path / "saved")
    spec = ModelVisionSpec.from_pretrained(tmp_path / "saved")
    assert spec.family == family
    for w, h in SIZES:
        tokens = spec.image_tokens(w, h)
        assert tokens.total == _processor_count(processor, tiny.make_image(w, h)), (family, w, h)
        assert tokens.prunable > 0
        if family == "llava":
            assert tokens == ImageTokenCounts(prunable=36)
        if family == "llava_next":
            assert tokens.newline > 0 and tokens.views >= 2
            assert len(tokens.view_sizes) == tokens.views and sum(tokens.view_sizes) == tokens.prunable
        if family.startswith("qwen"):
            t, gh, gw = tokens.grid_thw
            assert t == 1 and tokens.prunable == gh * gw // 4


def _pre_llm(t: ImageTokenCounts, ratio: float):
    from vlmprune.policy import parse_policy
    from vlmprune.reduction.plan import plan_image

    policy = parse_policy({"method": "fastervlm", "ratio": ratio})
    return plan_image(policy, "llava_next", t.view_sizes or (t.prunable,), 32, fixed=t.newline, route="pre_llm")


def test_llava_next_newlines_are_never_pruned():
    """The ratio applies to prunable tokens only; newlines are added back in the placeholders."""
    t = ImageTokenCounts(prunable=80, newline=8, views=5)
    assert _pre_llm(t, 0.9).entering == kept_count(80, 0.9) == 8
    assert _pre_llm(t, 0.9).prompt_tokens == 16 and _pre_llm(t, 0.0).prompt_tokens == t.total == 88


def test_llava_next_views_are_budgeted_one_by_one():
    """672 px LLaVA-NeXT (24x24 patches, 2x2 crops, no padding): 5 views of 576, FasterVLM's per-view
    T = 144 / 58 / 29, 5 T in all; a padded image's crops split the unpadded grid."""
    spec = ModelVisionSpec(family="llava_next", patch_size=14, image_size=336, grid_pinpoints=((672, 672),))
    t = spec.image_tokens(672, 672)
    assert t.view_sizes == (576,) * 5 and t.newline == 48
    assert [_pre_llm(t, r).entering for r in (0.75, 0.9, 0.95)] == [720, 290, 145]
    assert crop_view_sizes(24, (2, 2), (40, 48)) == (20 * 24,) * 4  # 4 rows cut at each end
    assert crop_view_sizes(24, (1, 3), (24, 40)) == (24 * 8, 24 * 24, 24 * 8)  # 16 columns cut at each end
    assert crop_view_sizes(24, (1, 3), (24, 20)) == (0, 24 * 20, 0)  # all-padding side crops
    tall = spec.image_tokens(300, 672)
    assert sum(tall.view_sizes[1:]) == tall.prunable - 576 and _pre_llm(tall, 0.9).entering == sum(kept_count(n, 0.9) for n in tall.view_sizes)


def test_bad_sizes_and_model_types_are_value_errors(tmp_path):
    spec = ModelVisionSpec.from_dicts({"model_type": "llava", "vision_config": {"image_size": 84, "patch_size": 14}})
    with pytest.raises(ValueError, match="positive"):
        spec.image_tokens(0, 10)
    with pytest.raises(ValueError, match="'t5'"):
        ModelVisionSpec.from_dicts({"model_type": "t5"})
    with pytest.raises(ValueError, match="config.json"):
        ModelVisionSpec.from_pretrained(tmp_path)
    qwen = ModelVisionSpec.from_dicts({"model_type": "qwen2_vl", "vision_config": {}})
    with pytest.raises(ValueError, match="aspect"):
        qwen.image_tokens(5000, 10)


def test_geometry_is_lean():
    """The gateway and the plugin import it cheaply: no torch, transformers, vLLM or FastAPI."""
    import subprocess
    import sys

    code = ("import sys, vlmprune.geometry; "
            "print(','.join(m for m in ('torch', 'transformers', 'vllm', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
