"""bench/quality.py end to end on a micro model (real transformers backend, real pruning; the
micro model's answers are near chance, so this checks the benchmark's plumbing and outputs, not
accuracy: bench/results/quality_demo.* holds the real run on the shipped demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import load_bench


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    from tests.testbed.micro import train_micro

    return train_micro(tmp_path_factory.mktemp("micro") / "model")


def test_quality_writes_table_plot_and_json(micro, tmp_path, capsys):
    """Two methods x two ratios: ratio 0 shared, kept tokens match the ratio, explain without CNN
    weights is reported as skipped (with the reason) instead of silently dropped."""
    quality = load_bench("quality")
    stem = tmp_path / "q"
    assert quality.main(["--model", str(micro), "--methods", "fastervlm,random,explain", "--ratios", "0.5,0.9",
                         "--samples", "5", "--out", str(stem)]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["ratios"] == [0.0, 0.5, 0.9]
    assert set(data["cells"]) == {"fastervlm", "random"}
    assert "relevance-CNN" in data["skipped"]["explain"]
    for method, row in data["cells"].items():
        assert row["0.0"] is data["cells"]["fastervlm"]["0.0"] or row["0.0"] == data["cells"]["fastervlm"]["0.0"]
        assert row["0.5"]["kept_tokens"] == 128 and row["0.9"]["kept_tokens"] == 26
        assert row["0.9"]["samples"] == 5
    md = stem.with_suffix(".md").read_text()
    assert "| fastervlm |" in md and "| random |" in md and "Skipped `explain`" in md
    assert stem.with_suffix(".png").stat().st_size > 1000
    # Re-rendering an earlier run gives the same table without evaluating anything.
    stem.with_suffix(".md").unlink()
    assert quality.main(["--from-json", str(stem.with_suffix(".json"))]) == 0
    assert stem.with_suffix(".md").read_text() == md


def test_explain_floor_and_ceiling_rows_and_merge(micro, tmp_path):
    """``explain-input`` (the CNN replaced by its raw input) and ``oracle`` (the teacher's relevance)
    run the explain pipeline without CNN weights and keep explain's count; ``--merge`` re-runs one
    row and keeps the saved others; explain_scores outside explain is a ValueError."""
    from vlmprune.evaluate import evaluate

    quality = load_bench("quality")
    stem = tmp_path / "q"
    args = ["--model", str(micro), "--ratios", "0.5", "--samples", "3", "--out", str(stem)]
    assert quality.main([*args, "--methods", "explain-input,oracle"]) == 0
    first = json.loads(stem.with_suffix(".json").read_text())
    assert list(first["cells"]) == ["explain-input", "oracle"]
    for row in first["cells"].values():
        assert row["0.5"]["kept_tokens"] == 128 and row["0.5"]["policy"]["method"] == "explain"
    assert [first["cells"][r]["0.5"]["explain_scores"] for r in ("explain-input", "oracle")] == ["input", "oracle"]
    assert quality.main([*args, "--methods", "random", "--merge"]) == 0
    merged = json.loads(stem.with_suffix(".json").read_text())
    assert list(merged["cells"]) == ["explain-input", "oracle", "random"]
    assert merged["cells"]["oracle"] == first["cells"]["oracle"]
    assert merged["merges"][-1]["rows"] == ["random"]
    with pytest.raises(ValueError, match="--merge"):
        quality.main([*args[:-4], "--samples", "2", "--out", str(stem), "--methods", "random", "--merge"])
    with pytest.raises(ValueError, match="explain_scores"):
        evaluate(micro, "fastervlm", 0.5, samples=1, explain_scores="oracle", progress=False)
    with pytest.raises(ValueError, match="explain_scores"):
        evaluate(micro, "explain", 0.5, samples=1, explain_scores="teacher", progress=False)


def test_explain_rows_on_anyres_demo_next(tmp_path):
    """The shipped AnyRes model (thumbnail + 2x2 crops, newline tokens): ``explain-input`` and
    ``oracle`` keep explain's per-view-summed count (130 of 1280 prunable tokens at 0.9), and
    ``--merge`` takes rows run at some of the saved ratios only (the others are '-'), while a
    ratio the saved run lacks is refused."""
    quality = load_bench("quality")
    stem = tmp_path / "next"
    base = ["--model", "demo-next", "--samples", "2", "--out", str(stem)]
    assert quality.main([*base, "--methods", "random", "--ratios", "0.75,0.9"]) == 0
    assert quality.main([*base, "--methods", "explain-input,oracle", "--ratios", "0.9", "--merge"]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["ratios"] == [0.0, 0.75, 0.9] and list(data["cells"]) == ["random", "explain-input", "oracle"]
    for row in ("explain-input", "oracle"):
        cells = data["cells"][row]
        assert set(cells) == {"0.0", "0.9"}
        assert cells["0.9"]["visual_tokens"] == 1280 and cells["0.9"]["kept_tokens"] == 130
        assert cells["0.0"] == data["cells"]["random"]["0.0"]  # the saved ratio 0, not re-run
    assert data["merges"][-1] == {"rows": ["explain-input", "oracle"], "ratios": [0.0, 0.9],
                                  "wall_s": data["merges"][-1]["wall_s"]}
    md = stem.with_suffix(".md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| oracle |"))
    assert line.split("|")[3].strip() == "-"  # ratio 0.75 was not run for this row
    assert "at ratios 0.9 only" in md
    with pytest.raises(ValueError, match="ratios"):
        quality.main([*base, "--methods", "random", "--ratios", "0.5", "--merge"])


def test_explain_stand_ins_score_the_anyres_input(tmp_path):
    """On demo-next the explain rows' stand-ins receive exactly the CNN's input (the (1280,)
    prunable-token vector of explain_inputs, newlines excluded), once per image, and the prefill
    keeps explain's count beside every newline token."""
    import torch

    from vlmprune.backends.hf import ReferenceBackend, Request
    from vlmprune.evaluate import InputRelevance
    from vlmprune.policy import parse_policy
    from vlmprune.testbed import scenes
    from vlmprune.testbed.registry import resolve_model, scene_layout

    class Spy(InputRelevance):
        seen: list = []

        def relevance(self, attn):
            self.seen.append(attn.clone())
            return attn

    engine = ReferenceBackend.from_pretrained(resolve_model("demo-next"), device="cpu")
    size, scale = scene_layout(engine.model.config)
    s = scenes.sample("test", 0, scale)
    req = Request(s.question, [scenes.render(s.scene, size)])
    spy = Spy()
    (pre,) = engine.prefill([req], parse_policy({"method": "explain", "ratio": 0.9}), spy)
    ((seq, images),) = engine.sequences([req])
    want = engine.explain_inputs(seq, images)[0]
    assert len(spy.seen) == 1 and spy.seen[0].shape == (1280,)
    torch.testing.assert_close(spy.seen[0], want)
    assert pre.kept_tokens == 130 and pre.fixed_tokens == images[0].n_tokens - 1280
