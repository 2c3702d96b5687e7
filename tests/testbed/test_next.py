"""demo-next (LLaVA-NeXT, AnyRes): its scenes, its token layout, its training, the shipped weights.

The layout tests build demo-next from the shipped ``demo`` (its ViT, projector and LM; only the
newline embedding is new) and compare against transformers' own LLaVA-NeXT code paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlmprune.testbed import scenes
from vlmprune.testbed import grounding as G
from vlmprune.testbed import lm_stage as LM
from vlmprune.testbed import train as T
from vlmprune.testbed import train_next as N
from vlmprune.testbed.registry import MODELS_DIR, resolve_model, scene_layout

SHIPPED = (MODELS_DIR / "demo-next" / "config.json").is_file()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="NOT SHIPPED: vlmprune/testbed/models/demo-next has no weights")


@pytest.fixture(scope="module")
def fresh():
    """demo-next as the recipe starts it (from the shipped demo), eval mode."""
    model, processor = N.build_next(resolve_model("demo"), N.NextConfig())
    return model.eval(), processor


def test_half_scale_scenes_keep_objects_whole_in_one_crop():
    """scale 0.5: objects are half the size and never cross the 2x2 crop seams; scale 1 is unchanged."""
    for i in range(40):
        big, small = scenes.sample("test", i).scene, scenes.sample("test", i, 0.5).scene
        assert small.scale == 0.5 and all(it.scale == 0.5 for it in small.items)
        for it in small.items:
            hx, hy = it.half
            assert abs(it.x - 0.5) > hx and abs(it.y - 0.5) > hy, it
            assert hx == pytest.approx((scenes.BOX_HALF[0] if it.kind == "box" else scenes.RADIUS[it.size]) / 2)
        assert big.scale == 1.0 and all(it.scale == 1.0 for it in big.items)
    with pytest.raises(ValueError, match="scale"):
        scenes.make_scene(1, scale=0)


def test_scene_layout(fresh):
    model, _ = fresh
    assert scene_layout(model.config) == (448, 0.5)
    assert scenes.render_layout(224) == (224, 1.0)
    from transformers import AutoConfig

    assert scene_layout(AutoConfig.from_pretrained(resolve_model("demo"))) == (224, 1.0)


def test_cached_views_pack_like_transformers(fresh):
    """The training path (cached per-view features -> projector -> the model's packing) gives the
    tokens transformers' own get_image_features gives for the same image (up to the fp16 cache)."""
    model, processor = fresh
    canvas, scale = scene_layout(model.config)
    seeds = [scenes.sample("val", i, scale).scene.seed for i in range(2)]
    pixels = N.scene_pixels(processor.image_processor, seeds, canvas, scale)
    assert pixels.shape[:2] == (2, 5)  # thumbnail + 2x2 crops
    with torch.no_grad():
        mine = N.project_next(model, N.view_features(model, pixels, "cpu"))
        inputs = processor.image_processor([scenes.render(scenes.make_scene(s, scale), canvas) for s in seeds],
                                           return_tensors="pt")
        ref = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    assert mine.shape == (2, 256 + 32 * 33, 128)
    for b in range(2):
        scale_ref = ref.pooler_output[b].abs().max()
        assert (mine[b] - ref.pooler_output[b]).abs().max() < 2e-2 * scale_ref


def test_packed_owner_layout(fresh):
    """Thumbnail first, then 32 rows of 32 crop patches + a newline; an object owns patches in its crop
    (at its place on the 32x32 canvas grid) and, if big enough, in the thumbnail."""
    model, _ = fresh
    s = scenes.sample("test", 2, 0.5)
    owner = N.packed_owner(model, N.view_owner_maps(s.scene, 224, 14, 448), 448)
    assert owner.shape == (1312,)
    grid = owner[256:].reshape(32, 33)
    assert (grid[:, 32] == -1).all() and (owner[:256] >= 0).all() and (grid[:, :32] >= 0).all()
    canvas = scenes.patch_owner(s.scene, 448, 14).reshape(32, 32)
    assert (grid[:, :32] == canvas).all()
    for k, it in enumerate(s.scene.items):
        rows, cols = np.nonzero(grid[:, :32] == k + 1)
        assert rows.size, it
        assert abs(cols.mean() - it.x * 32 + 0.5) < 1.5 and abs(rows.mean() - it.y * 32 + 0.5) < 1.5


def test_order_targets_pick_the_first_object():
    """Hop three of a position question: head 0 -> the left / upper object, head 1 -> the other."""
    for i in range(60):
        s = scenes.sample("train", i)
        if s.family != "position":
            continue
        a, b = s.meta["targets"]
        owner = scenes.patch_owner(s.scene, 224, 14)
        first, second = G.order_targets(s.scene, owner, s.family, s.answer, s.meta["targets"], 2)
        axis = "x" if s.answer in ("left", "right") else "y"
        left = a if getattr(a, axis) < getattr(b, axis) else b
        other = b if left is a else a
        assert (first == scenes.item_patches(s.scene, owner, [left])).all()
        assert (second == scenes.item_patches(s.scene, owner, [other])).all()
    s = scenes.sample("train", 0)
    none = G.order_targets(s.scene, scenes.patch_owner(s.scene, 224, 14), "count", "two", [], 2)
    assert not any(m.any() for m in none)


def test_train_next_smoke(tmp_path):
    """The demo-next recipe end to end in miniature: caches, trains, saves a model transformers loads."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = N.NextConfig(cache_scenes=4, steps=2, batch=2, val_samples=2, turns=2)
    out = N.train_next(tmp_path / "next", cfg, threads=1, progress=False, log=lambda _m: None)
    model, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.image_grid_pinpoints == [[224, 448], [448, 224], [448, 448]]
    assert model.config.text_config.max_position_embeddings == 2048
    report = json.loads((out / "training.json").read_text())
    assert report["history"][-1]["step"] == 2 and report["config"]["base"] == "demo"
    assert torch.load(tmp_path / "next.work" / "train_features.pt").shape == (4, 5, 256, 128)


def test_train_cli_flag_checks(capsys):
    """Flags of one model are refused by the others, by name."""
    from vlmprune.cli import main

    for argv, flag in (
        (["train", "demo", "--base", "demo"], "--base"),
        (["train", "demo", "--device", "cuda"], "--device"),
        (["train", "demo-next", "--vit-steps", "3"], "--vit-steps"),
        (["train", "demo-next", "--workers", "0"], "--workers"),
        (["train", "explain", "--model", "demo", "--workers", "2"], "--workers"),
    ):
        assert main(argv) == 2, argv
        assert flag in capsys.readouterr().err


@needs_shipped
def test_shipped_next_answers_test_questions():
    """Real check of the shipped weights through transformers' own generate: 15 test questions."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    path = resolve_model("demo-next")
    model, info = LlavaNextForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(path)
    canvas, scale = scene_layout(model.config)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, total
    correct = 0
    for i in range(15):
        s = scenes.sample("test", i, scale)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            add_generation_prompt=True, tokenize=False,
        )
        inputs = processor(text=text, images=scenes.render(s.scene, canvas), return_tensors="pt")
        assert (inputs["input_ids"] == model.config.image_token_id).sum() == 1312
        with torch.no_grad():
            out = model.eval().generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += answer.strip() == s.answer
    assert correct >= 12, correct


def test_coordinate_loss_reads_position_rows_only():
    """The read-out sees only rows of position turns, with targets (xA, yA, xB, yB) mapped to [-1, 1]."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 4)
    layer_in = torch.randn(2, 10, 8)
    coords = [[np.array([0.25, 0.5, 0.75, 1.0]), None], [None]]
    loss = G.coordinate_loss(head, layer_in, [[3, 7], [5]], coords)
    expected = torch.nn.functional.mse_loss(head(layer_in[0, 3][None]), torch.tensor([[-0.5, 0.0, 0.5, 1.0]]))
    assert torch.allclose(loss, expected)
    assert G.coordinate_loss(head, layer_in, [[3], [5]], [[None], [None]]) == 0


def test_question_batch_coordinates_follow_the_question():
    """question_batch gives each position turn the centres of the objects it names, in order."""
    import random

    cfg = T.DemoConfig(batch=6, turns=5)
    seeds = list(range(30))
    batch = LM.question_batch(cfg, random.Random(3), seeds, torch.zeros(30, 1),
                             lambda i, scene: scenes.patch_owner(scene, 224, 14))
    seen = 0
    for i, turns, families, coords in zip(batch.idx, batch.convs, batch.families, batch.coords):
        scene = scenes.make_scene(seeds[i])
        for (question, _), family, c in zip(turns, families, coords):
            assert (c is not None) == (family == "position")
            if c is not None:
                named = [it for it in scene.shapes if f"{it.colour} {it.kind}" in question]
                first = min(named, key=lambda it: question.index(f"{it.colour} {it.kind}"))
                assert (c[0], c[1]) == (first.x, first.y)
                seen += 1
    assert seen
