"""`vlmprune visualize`: the kept visual tokens drawn on the image.

End-to-end runs use the micro model of the demo architecture (224 px, patch 14: a 16x16 grid of
256 tokens; trained here in seconds, answers near chance: these tests check which patches are
drawn as kept, not what the model answers). LLaVA-NeXT and Qwen geometry use the session's tiny
models (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmprune.visualize import (
    OUTLINE,
    PANEL_GAP,
    dim,
    grid_boxes,
    kept_token_mask,
    model_input_box,
    render_overlay,
    token_layout,
    visualize,
)

SIDE, PATCH = 16, 14  # the demo architecture: 224 px / patch 14


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from tests.testbed.micro import train_micro

    return str(train_micro(tmp_path_factory.mktemp("micro") / "model"))


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    """A test-split scene at the model's resolution, as a PNG file."""
    from vlmprune.testbed import scenes

    path = tmp_path_factory.mktemp("img") / "scene.png"
    scenes.render(scenes.sample("test", 0).scene, 224).save(path)
    return path


def _visualize(micro_model, image, out, *args, capsys):
    from vlmprune.cli import main

    code = main(["visualize", str(image), "--model", micro_model, *args, "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON line on stdout
    return json.loads(lines[0])


def _patch_states(out_png, original):
    """Per patch (raster order): 'kept' (interior = original pixels, border = the outline colour),
    'pruned' (interior = dim(original)) or 'other'. The image sits below the title band."""
    drawn = np.asarray(Image.open(out_png).convert("RGB"))
    orig = np.asarray(original.convert("RGB"))
    band = drawn.shape[0] - orig.shape[0]
    region = drawn[band:]
    states = []
    for i in range(SIDE * SIDE):
        r, c = divmod(i, SIDE)
        ys, xs = slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)
        got, want = region[ys, xs], orig[ys, xs]
        inner = (slice(1, -1), slice(1, -1))
        border = np.concatenate([got[0], got[-1], got[:, 0], got[:, -1]])
        if np.array_equal(got[inner], want[inner]) and (border == OUTLINE).all():
            states.append("kept")
        elif np.array_equal(got, dim(want)):
            states.append("pruned")
        else:
            states.append("other")
    return states, band


def test_fastervlm_09_keeps_26_and_draws_exactly_those(micro_model, scene_png, tmp_path, capsys):
    """fastervlm@0.9 keeps round(256 * 0.1) = 26; the PNG shows exactly the reported patches as
    kept (original pixels, outlined) and every other patch dimmed, darker than the original."""
    out = tmp_path / "sub" / "fv.png"
    result = _visualize(micro_model, scene_png, out, "--method", "fastervlm", "--ratio", "0.9", capsys=capsys)
    assert {"out", "method", "ratio", "visual_tokens", "kept_tokens", "kept_indices"} <= set(result)
    assert result["out"] == str(out) and result["method"] == "fastervlm" and result["ratio"] == 0.9
    assert result["visual_tokens"] == 256 and result["kept_tokens"] == 26
    kept = result["kept_indices"]
    assert len(kept) == 26 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 256
    assert result["stage"] == "llm_input"

    original = Image.open(scene_png)
    png = Image.open(out)
    assert png.format == "PNG" and png.width == original.width
    states, band = _patch_states(out, original)
    assert 0 < band < 80 and png.height == original.height + band  # the image at its own size under the title
    assert [i for i, s in enumerate(states) if s == "kept"] == kept
    assert states.count("pruned") == 256 - 26 and "other" not in states
    assert png.text["Title"] == "method fastervlm, ratio 0.9: kept 26 of 256 tokens" == result["title"]

    orig = np.asarray(original.convert("RGB"), dtype=np.float64)
    drawn = np.asarray(png.convert("RGB"), dtype=np.float64)[band:]
    mask = np.zeros((SIDE, SIDE), bool)
    mask.flat[kept] = True
    pix = np.kron(mask, np.ones((PATCH, PATCH), bool))
    assert drawn[~pix].mean() < 0.5 * orig[~pix].mean()  # pruned: clearly darker
    assert drawn[~pix].std(axis=-1).mean() < orig[~pix].std(axis=-1).mean()  # and greyer


def test_ratio_zero_keeps_all_256(micro_model, scene_png, tmp_path, capsys):
    out = tmp_path / "all.png"
    result = _visualize(micro_model, scene_png, out, "--ratio", "0", capsys=capsys)
    assert result["kept_tokens"] == result["visual_tokens"] == 256
    assert result["kept_indices"] == list(range(256))
    states, _ = _patch_states(out, Image.open(scene_png))
    assert states == ["kept"] * 256


@pytest.mark.parametrize("method,ratio", [("transprune", "0.75"), ("aim", "0.75"), ("fastv", "0.5")])
def test_in_llm_methods_show_the_last_layer(micro_model, scene_png, tmp_path, capsys, method, ratio):
    """TransPrune / AIM / FastV prune inside the LLM: the drawn tokens are those reaching the last
    layer (the backend's count), a subset of those at the LLM input; the title says so."""
    out = tmp_path / f"{method}.png"
    result = _visualize(micro_model, scene_png, out, "--method", method, "--ratio", ratio,
                        "--question", "what colour is the cross ?", capsys=capsys)
    assert result["stage"] == "last_layer" and "last LLM layer" in result["title"]
    assert 0 < result["kept_tokens"] <= result["input_kept_tokens"] <= 256
    assert result["kept_tokens"] < 256
    states, _ = _patch_states(out, Image.open(scene_png))
    assert [i for i, s in enumerate(states) if s == "kept"] == result["kept_indices"]
    assert states.count("pruned") == 256 - result["kept_tokens"]


def test_non_square_image_uses_the_centre_crop(micro_model, tmp_path, capsys):
    """A 448x300 image: the processor resizes to 334x224 and centre-crops 224, i.e. the model sees
    the centred 300x300 square; outside it nothing is kept. The PNG keeps the image's size."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(40, 255, (300, 448, 3), dtype=np.uint8))
    path = tmp_path / "wide.png"
    image.save(path)
    out = tmp_path / "wide_out.png"
    result = _visualize(micro_model, path, out, "--ratio", "0", capsys=capsys)
    assert result["kept_tokens"] == 256
    png = Image.open(out)
    band = png.height - 300
    assert png.width == 448 and 0 < band < 80
    drawn = np.asarray(png.convert("RGB"))[band:]
    orig = np.asarray(image)
    assert np.array_equal(drawn[:, :74], dim(orig[:, :74])) and np.array_equal(drawn[:, 374:], dim(orig[:, 374:]))
    assert np.array_equal(drawn[2:-2, 76:372][5:10, 5:10], orig[2:-2, 76:372][5:10, 5:10])


@pytest.mark.parametrize(
    "args, message",
    [
        (("--ratio", "1.5"), "ratio"),
        (("--ratio", "abc"), "--ratio"),
        (("--method", "nope"), "nope"),
        (("--set", "oops"), "--set"),
        (("--model", "/no/such/model"), "neither"),
    ],
    ids=["ratio", "ratio-text", "method", "set", "model"],
)
def test_user_errors_exit_2(args, message, scene_png, tmp_path, capsys):
    """Bad arguments exit 2 with one `vlmprune: error:` line naming the problem, before any model loads."""
    from vlmprune.cli import main

    assert main(["visualize", str(scene_png), *args, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmprune: error:") and message in err
    assert not (tmp_path / "x.png").exists()


def test_missing_image_exits_2(tmp_path, capsys):
    from vlmprune.cli import main

    assert main(["visualize", str(tmp_path / "none.png"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "IMAGE: no such file" in err and "none.png" in err


def test_corrupt_image_exits_2_as_a_process(tmp_path):
    """A real process: a file with a PNG signature and garbage after it -> exit status 2, no traceback."""
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vlmprune", "visualize", str(bad), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr and "corrupt.png" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


# --- geometry and drawing, without a model ---------------------------------------------------


def test_model_input_box_follows_clip_preprocessing():
    from transformers import CLIPImageProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    assert model_input_box((224, 224), ip) == pytest.approx((0, 0, 224, 224))
    assert model_input_box((448, 300), ip) == pytest.approx((74, 0, 374, 300))
    assert model_input_box((300, 448), ip) == pytest.approx((0, 74, 300, 374))


def test_grid_boxes_raster_order():
    boxes = grid_boxes(2, 3, (0, 0, 30, 20))
    assert boxes.shape == (6, 4)
    assert boxes[0].tolist() == [0, 0, 10, 10] and boxes[5].tolist() == [20, 10, 30, 20]


def test_kept_token_mask_rejects_out_of_range():
    assert kept_token_mask(4, [0, 2]).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        kept_token_mask(4, [4])


def test_render_overlay_checks_shapes():
    from types import SimpleNamespace

    import torch

    image = Image.new("RGB", (28, 28), (200, 100, 50))
    tokens = SimpleNamespace(features=torch.zeros(4, 2), grid=(2, 2))
    layout = token_layout("llava", tokens, image.size)
    out = render_overlay(image, np.array([True, False, False, True]), layout)
    assert out.size == (28, 28)  # no title: no band
    drawn = np.asarray(out)
    assert tuple(drawn[7, 7]) == (200, 100, 50) and tuple(drawn[0, 0]) == OUTLINE
    assert tuple(drawn[7, 21]) == tuple(dim(np.array([[200, 100, 50]], np.uint8))[0])
    with pytest.raises(ValueError, match="mask"):
        render_overlay(image, np.ones(3, bool), layout)


def test_unknown_family_names_the_model_type():
    from types import SimpleNamespace

    import torch

    with pytest.raises(ValueError, match="gemma3"):
        token_layout("gemma3", SimpleNamespace(features=torch.zeros(4, 2), grid=(2, 2)), (28, 28))


def test_cli_default_question_matches_module():
    from vlmprune import cli, visualize as vis

    assert cli.DEFAULT_QUESTION == vis.DEFAULT_QUESTION


# --- other families (tiny models) ------------------------------------------------------------


def test_llava_next_two_panels_and_no_newlines(llava_next):
    """LLaVA-NeXT: base view and AnyRes crops side by side; image_newline tokens are neither drawn
    nor counted, and every kept index is a prunable token."""
    from vlmprune.backends.hf import ReferenceBackend, Request
    from vlmprune.policy import parse_policy
    from vlmprune.testbed.tiny import make_image

    engine = ReferenceBackend(*llava_next)
    image = make_image(96, 64)
    policy = parse_policy({"method": "fastervlm", "ratio": 0.5})
    overlay, result = visualize(engine, image, policy)
    pre = engine.prefill([Request(result["question"], [image])], policy)[0]
    tokens = pre.images[0]
    assert result["visual_tokens"] == tokens.n_prunable == pre.visual_tokens
    assert result["kept_tokens"] == pre.kept_tokens == tokens.n_prunable // 2
    assert all(bool(tokens.prunable[i]) for i in result["kept_indices"])
    layout = token_layout("llava_next", tokens, image.size)
    assert [p.name.split()[0] for p in layout.panels] == ["base", "AnyRes"]
    assert sum(len(p.tokens) for p in layout.panels) == tokens.n_prunable
    assert overlay.width == 2 * 96 + PANEL_GAP


def test_qwen_grid_covers_the_whole_image(qwen2_vl):
    from vlmprune.backends.hf import ReferenceBackend
    from vlmprune.policy import parse_policy
    from vlmprune.testbed.tiny import make_image

    engine = ReferenceBackend(*qwen2_vl)
    overlay, result = visualize(engine, make_image(96, 64), parse_policy({"method": "fastervlm", "ratio": 0.5}))
    assert result["kept_tokens"] == len(result["kept_indices"]) > 0
    assert overlay.width == 96
